"""Download, verify and install the signed knowledge-base bundle (PROTOCOL.md, signatures).

The platform offers a bundle in a poll response (``signatures``: version, url,
sha256, signature). :func:`download_and_install` fetches it from the platform's
own origin only, streams it to a private temporary file (never more than the
size limit, never whole in memory), checks the SHA-256 and the Ed25519 signature
of the raw bytes against the public key the appliance was built with, checks that
it is gzip JSON Lines of OSV records, and only then installs it atomically. On any
failure it raises a :class:`~appliance.kb.errors.BundleRefused` subclass whose
message says why in words; the bundle installed before stays installed and in use.

Layout under ``<state.dir>/signatures/`` (directory 0700, files 0600)::

    current.json               {"version", "file", "sha256", "installed_at"}: what is in use
    bundle-<version>-<sha256 prefix>.jsonl.gz  the installed bundle named by current.json
    last_refusal.json          the last bundle refused and why (for `vsa status`)
    .download-*.part           a download in progress (removed on failure)

``current.json`` is the durable record of the installed version: it is written
(write, fsync, rename, fsync the directory) after the bundle file is in place,
and the previous bundle file is deleted only after that.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import mmap
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from yarl import URL

from appliance.console import Console
from appliance.kb.errors import (
    BundleContentInvalid,
    BundleDigestMismatch,
    BundleDownloadFailed,
    BundleInstallFailed,
    BundleOfferInvalid,
    BundleOriginRefused,
    BundleRefused,
    BundleSignatureInvalid,
    BundleTooLarge,
    KbError,
    KbFormatError,
)
from appliance.kb.match import KnowledgeBase
from appliance.state.files import FILE_MODE, ensure_private_dir, fsync_dir

MAX_BUNDLE_BYTES = 256 * 1024 * 1024  # PROTOCOL.md: 256 MiB for a signatures bundle
DOWNLOAD_TOTAL_TIMEOUT_S = 1800.0  # a 256 MiB bundle on a slow link
DOWNLOAD_READ_TIMEOUT_S = 60.0  # no byte for this long: the download is dead
ERROR_BODY_MAX_BYTES = 4096
CHUNK_BYTES = 64 * 1024
ED25519_PUBLIC_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
SIGNATURES_DIR = "signatures"
CURRENT_FILE = "current.json"
REFUSAL_FILE = "last_refusal.json"
# A version names a file: keep it to characters that cannot leave the directory.
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_DEFAULT_PORTS = {"https": 443, "http": 80}


@dataclass(frozen=True)
class SignaturesOffer:
    """The ``signatures`` object of a poll response, validated."""

    version: str
    url: str
    sha256: str  # lowercase hex
    signature: bytes  # the raw 64-byte Ed25519 signature

    @classmethod
    def from_wire(cls, obj: Any) -> SignaturesOffer:
        """Parse the poll's ``signatures`` object; BundleOfferInvalid naming the bad field."""
        if not isinstance(obj, dict):
            raise BundleOfferInvalid("the platform's signatures offer is not a JSON object")
        version = obj.get("version")
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise BundleOfferInvalid(
                f"the signatures offer has an invalid version {version!r} "
                "(1-64 characters of letters, digits, '.', '_' and '-')")
        url, digest, signature = obj.get("url"), obj.get("sha256"), obj.get("signature")
        if not isinstance(url, str) or not url:
            raise BundleOfferInvalid(f"the signatures offer {version} has no url", version=version)
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise BundleOfferInvalid(
                f"the signatures offer {version} has no valid sha256 (64 hex digits)", version=version)
        try:
            raw_signature = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
        except (binascii.Error, ValueError):
            raw_signature = b""
        if len(raw_signature) != ED25519_SIGNATURE_BYTES:
            raise BundleOfferInvalid(
                f"the signatures offer {version} has no valid signature "
                "(base64 of a 64-byte Ed25519 signature)", version=version)
        return cls(version=version, url=url, sha256=digest.lower(), signature=raw_signature)


@dataclass(frozen=True)
class InstalledBundle:
    """The bundle in use: its version, file and digest, and its index once loaded."""

    version: str
    path: Path
    sha256: str
    knowledge_base: KnowledgeBase | None = None


# ------------------------------------------------------------------ keys and origins

def load_public_key(text: str) -> bytes:
    """The raw 32-byte Ed25519 key from ``signatures.public_key`` (base64), or KbError."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KbError("signatures.public_key is not base64 "
                      "(it must be base64 of the raw 32-byte Ed25519 public key)") from exc
    if len(raw) != ED25519_PUBLIC_KEY_BYTES:
        raise KbError(f"signatures.public_key is {len(raw)} bytes; an Ed25519 public key is 32 bytes")
    return raw


def _origin(url: URL) -> tuple[str, str, int]:
    scheme = (url.scheme or "").lower()
    port = url.explicit_port or _DEFAULT_PORTS.get(scheme, -1)
    return scheme, (url.host or "").lower().rstrip("."), port


def resolve_bundle_url(platform_origin: str, url: str, *, version: str | None = None) -> URL:
    """The absolute bundle URL, or BundleOriginRefused when it is not on the platform's origin.

    Accepted: a path starting with a single ``/``, joined to the platform's origin;
    or an absolute URL with exactly the platform's scheme, host and port and no
    user information. Anything else (another host, port or scheme, ``//host/...``,
    backslashes, relative paths) is refused.
    """
    base = URL(platform_origin)
    if base.scheme not in _DEFAULT_PORTS or not base.host:
        raise BundleOriginRefused(f"platform.url {platform_origin!r} is not an http(s) origin",
                                  version=version)
    refused = BundleOriginRefused(
        f"the bundle URL {url!r} is not on the platform's own origin "
        f"{base.scheme}://{base.host}:{_origin(base)[2]}; only bundles from the platform are installed",
        version=version)
    if "\\" in url or any(ord(c) < 0x21 for c in url):
        raise refused
    if url.startswith("/") and not url.startswith("//"):
        return base.with_path("/").join(URL(url))
    try:
        target = URL(url)
    except (ValueError, IndexError) as exc:  # yarl: IndexError on "http://[][h@" (an empty bracketed host)
        raise refused from exc
    if not target.is_absolute() or target.user is not None or target.password is not None:
        raise refused
    if _origin(target) != _origin(base):
        raise refused
    return target


# ------------------------------------------------------------------ state

def signatures_dir(state_dir: Path) -> Path:
    """``<state.dir>/signatures``, created 0700 if missing."""
    return ensure_private_dir(Path(state_dir) / SIGNATURES_DIR)


def _write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_current(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / SIGNATURES_DIR / CURRENT_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # an unreadable record is no bundle: the platform will offer one again
    if not isinstance(value, dict) or not isinstance(value.get("version"), str) \
            or not isinstance(value.get("file"), str):
        return None
    return value


def installed_bundle(state_dir: Path) -> InstalledBundle | None:
    """The bundle recorded as installed (its file present), without loading it; None if none."""
    current = _read_current(state_dir)
    if current is None:
        return None
    path = Path(state_dir) / SIGNATURES_DIR / Path(current["file"]).name
    if not path.is_file():
        return None
    return InstalledBundle(version=current["version"], path=path, sha256=str(current.get("sha256", "")))


def installed_version(state_dir: Path) -> str | None:
    """The version the poll reports as ``signatures_version``: None before the first bundle."""
    bundle = installed_bundle(state_dir)
    return bundle.version if bundle else None


def load_installed(state_dir: Path) -> InstalledBundle | None:
    """The installed bundle with its index built (daemon start); None if none is installed."""
    bundle = installed_bundle(state_dir)
    if bundle is None:
        return None
    try:
        kb = KnowledgeBase.load(bundle.path)
    except KbFormatError as exc:
        raise KbError(f"the installed signatures {bundle.version} cannot be read: {exc}") from exc
    return InstalledBundle(bundle.version, bundle.path, bundle.sha256, kb)


def last_refusal(state_dir: Path) -> dict[str, Any] | None:
    """The last refused bundle (version, reason, message, at), for `vsa status`; None if none."""
    path = Path(state_dir) / SIGNATURES_DIR / REFUSAL_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _record_refusal(state_dir: Path, error: BundleRefused) -> None:
    with contextlib.suppress(OSError):
        _write_json_atomically(signatures_dir(state_dir) / REFUSAL_FILE, {
            "version": error.version, "reason": error.reason, "message": str(error),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


# ------------------------------------------------------------------ download

async def _error_text(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.content.read(ERROR_BODY_MAX_BYTES)
        message = json.loads(body.decode("utf-8", "replace")).get("message")
        return f": {message}" if isinstance(message, str) else ""
    except (ValueError, AttributeError, aiohttp.ClientError, TimeoutError):
        return ""


async def _download(session: aiohttp.ClientSession, url: URL, handle: Any, *, version: str,
                    max_bytes: int, client_timeout: aiohttp.ClientTimeout,
                    request_kwargs: Mapping[str, Any]) -> tuple[int, str]:
    """Stream the bundle into ``handle``; (bytes received, sha256 hex)."""
    digest = hashlib.sha256()
    received = 0
    what = f"signatures {version}"
    try:
        async with session.get(url, allow_redirects=False, timeout=client_timeout,
                               **request_kwargs) as response:
            if 300 <= response.status < 400:
                raise BundleOriginRefused(
                    f"{what}: the platform answered {response.status} with a redirect to "
                    f"{response.headers.get('Location', '?')}; bundles are only taken from the "
                    "platform's own URL", version=version)
            if response.status != 200:
                raise BundleDownloadFailed(
                    f"{what}: the platform answered HTTP {response.status}{await _error_text(response)}",
                    version=version)
            expected = response.content_length
            if expected is not None and expected > max_bytes:
                raise BundleTooLarge(
                    f"{what} is {expected} bytes, more than the {max_bytes}-byte limit", version=version)
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                received += len(chunk)
                if received > max_bytes:
                    raise BundleTooLarge(
                        f"{what} is larger than the {max_bytes}-byte limit; download stopped",
                        version=version)
                digest.update(chunk)
                handle.write(chunk)
            if expected is not None and received != expected:
                raise BundleDownloadFailed(
                    f"{what} download was cut: {received} of {expected} bytes received", version=version)
    except BundleRefused:
        raise
    except aiohttp.ClientPayloadError as exc:
        raise BundleDownloadFailed(
            f"{what} download was cut after {received} bytes ({exc})", version=version) from exc
    except TimeoutError as exc:
        raise BundleDownloadFailed(
            f"{what} download timed out after {received} bytes", version=version) from exc
    except aiohttp.ClientError as exc:
        raise BundleDownloadFailed(f"{what} could not be downloaded: {exc}", version=version) from exc
    return received, digest.hexdigest()


def _verify_signature(path: Path, size: int, signature: bytes, public_key: bytes, version: str) -> None:
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        raise BundleSignatureInvalid(
            "the configured signatures.public_key is not a 32-byte Ed25519 public key",
            version=version) from exc
    try:
        if size == 0:
            key.verify(signature, b"")
            return
        # Ed25519 signs the whole message: map the file rather than read it into memory.
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data, \
                memoryview(data) as view:  # released before the map closes
            key.verify(signature, view)
    except InvalidSignature as exc:
        raise BundleSignatureInvalid(
            f"signatures {version}: the Ed25519 signature does not verify with the configured "
            "public key (signatures.public_key); the bundle is discarded", version=version) from exc


def _verify_and_load(path: Path, size: int, offer: SignaturesOffer, public_key: bytes) -> KnowledgeBase:
    _verify_signature(path, size, offer.signature, public_key, offer.version)
    try:
        return KnowledgeBase.load(path)
    except KbFormatError as exc:
        raise BundleContentInvalid(
            f"signatures {offer.version} is signed but is not gzip JSON Lines of OSV records: {exc}",
            version=offer.version) from exc


def _install(directory: Path, tmp: Path, offer: SignaturesOffer) -> Path:
    previous = _read_current(directory.parent)
    # The digest in the name: reinstalling a version never overwrites the file in use.
    final = directory / f"bundle-{offer.version}-{offer.sha256[:16]}.jsonl.gz"
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, final)
    fsync_dir(directory)
    _write_json_atomically(directory / CURRENT_FILE, {
        "version": offer.version, "file": final.name, "sha256": offer.sha256,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    # Only now that the new version is recorded may the old bundle go.
    if previous is not None and Path(previous["file"]).name != final.name:
        with contextlib.suppress(FileNotFoundError):
            (directory / Path(previous["file"]).name).unlink()
    with contextlib.suppress(FileNotFoundError):
        (directory / REFUSAL_FILE).unlink()
    return final


async def download_and_install(
    session: aiohttp.ClientSession,
    *,
    platform_origin: str,
    offer: SignaturesOffer,
    public_key: bytes,
    state_dir: Path,
    max_bytes: int = MAX_BUNDLE_BYTES,
    total_timeout_s: float = DOWNLOAD_TOTAL_TIMEOUT_S,
    read_timeout_s: float = DOWNLOAD_READ_TIMEOUT_S,
    console: Console | None = None,
    request_kwargs: Mapping[str, Any] | None = None,
) -> InstalledBundle:
    """Fetch, verify and install ``offer``; the installed bundle with its index.

    ``session`` is the caller's (with its mTLS settings) and ``request_kwargs``
    the options each request needs on it (the PROXY_URL tunnel: ``proxy`` and
    ``proxy_auth``, as :meth:`PlatformClient.authenticated_transport` gives them); ``public_key``
    the raw 32-byte Ed25519 key (:func:`load_public_key`). On failure raises a
    :class:`BundleRefused` subclass; the previously installed bundle stays
    installed and :func:`installed_version` still reports it. When ``console`` is
    given, the outcome is said there too.
    """
    directory = signatures_dir(state_dir)
    old = installed_version(state_dir)
    tmp: Path | None = None
    try:
        url = resolve_bundle_url(platform_origin, offer.url, version=offer.version)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".download-", suffix=".part")
        tmp = Path(tmp_name)  # mkstemp creates it 0600
        timeout = aiohttp.ClientTimeout(total=total_timeout_s, sock_read=read_timeout_s)
        with os.fdopen(fd, "wb") as handle:
            size, digest = await _download(session, url, handle, version=offer.version,
                                           max_bytes=max_bytes, client_timeout=timeout,
                                           request_kwargs=request_kwargs or {})
            handle.flush()
            os.fsync(handle.fileno())
        if not hmac.compare_digest(digest, offer.sha256):
            raise BundleDigestMismatch(
                f"signatures {offer.version}: SHA-256 {digest} differs from the announced "
                f"{offer.sha256}; the bundle is discarded", version=offer.version)
        kb = await asyncio.to_thread(_verify_and_load, tmp, size, offer, public_key)
        try:
            final = await asyncio.to_thread(_install, directory, tmp, offer)
        except OSError as exc:
            raise BundleInstallFailed(
                f"signatures {offer.version} verified but could not be installed in {directory}: "
                f"{exc.strerror or exc}", version=offer.version) from exc
        tmp = None
    except BundleRefused as exc:
        _record_refusal(state_dir, exc)
        if console is not None:
            console.say(f"signatures {offer.version} refused: {exc}. "
                        f"Still using {old or 'no signatures (none installed yet)'}.")
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    if console is not None:
        console.say(f"signatures {offer.version} installed ({kb.stats.records} advisories"
                    f"{', replacing ' + old if old and old != offer.version else ''})")
    return InstalledBundle(offer.version, final, offer.sha256, kb)


def needs_download(state_dir: Path, offer: SignaturesOffer | None) -> bool:
    """PROTOCOL.md: download only when the offered version differs from the installed one."""
    return offer is not None and offer.version != installed_version(state_dir)
