"""Bundle download and install against a real HTTP server on 127.0.0.1 (port 0).

A good bundle is installed; a bad signature, a wrong digest, a truncated
download, an oversized download, a redirect, an HTTP error, a signed file that
is not gzip JSON Lines and a URL on another origin are each refused with words,
and the old bundle stays installed, in use and reported.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from appliance.console import Console
from appliance.kb.bundle import (
    SignaturesOffer,
    download_and_install,
    installed_bundle,
    installed_version,
    last_refusal,
    load_installed,
    load_public_key,
    needs_download,
    resolve_bundle_url,
)
from appliance.kb.errors import (
    BundleContentInvalid,
    BundleDigestMismatch,
    BundleDownloadFailed,
    BundleOfferInvalid,
    BundleOriginRefused,
    BundleRefused,
    BundleSignatureInvalid,
    BundleTooLarge,
    KbError,
)
from appliance.results import Package, Packages

DEBIAN_HOST = Packages(manager="dpkg", ecosystem="Debian:12", items=(
    Package(name="libssl3", version="3.0.11-1~deb12u1", source_name="openssl",
            source_version="3.0.11-1~deb12u1"),))


def make_bundle(*advisory_ids: str) -> bytes:
    """A gzip JSON Lines bundle of OSV records, one per id, each affecting openssl on Debian 12."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        for rid in advisory_ids:
            record = {"id": rid, "summary": f"{rid} summary", "affected": [
                {"package": {"ecosystem": "Debian:12", "name": "openssl"},
                 "ranges": [{"type": "ECOSYSTEM",
                             "events": [{"introduced": "0"}, {"fixed": "3.0.15-1~deb12u1"}]}]}]}
            gz.write((json.dumps(record) + "\n").encode())
    return out.getvalue()


@dataclass
class Platform:
    """A real aiohttp server playing the platform's signatures endpoint."""

    private_key: Ed25519PrivateKey
    origin: str = ""
    bodies: dict[str, bytes] = field(default_factory=dict)
    behaviours: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def publish(self, version: str, body: bytes, behaviour: str = "ok") -> SignaturesOffer:
        self.bodies[version] = body
        self.behaviours[version] = behaviour
        return SignaturesOffer.from_wire({
            "version": version, "url": f"/vsa/v1/signatures/{version}",
            "sha256": hashlib.sha256(body).hexdigest(),
            "signature": base64.b64encode(self.private_key.sign(body)).decode()})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        self.requests.append(version)
        body, behaviour = self.bodies[version], self.behaviours[version]
        if behaviour == "redirect":
            raise web.HTTPFound("http://127.0.0.2:1/elsewhere")
        if behaviour == "error":
            return web.json_response({"error": "unavailable", "message": "bundle is being rebuilt"},
                                     status=503)
        response = web.StreamResponse(headers={"Content-Type": "application/gzip"})
        if behaviour in ("ok", "truncate"):
            response.content_length = len(body)
        else:
            response.enable_chunked_encoding()  # "chunked", "cut_chunked": no length announced
        await response.prepare(request)
        if behaviour in ("truncate", "cut_chunked"):
            await response.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()  # the connection dies mid-body
            return response
        for i in range(0, len(body), 4096):
            await response.write(body[i:i + 4096])
        await response.write_eof()
        return response


@pytest.fixture
async def platform() -> AsyncIterator[Platform]:
    plat = Platform(Ed25519PrivateKey.generate())
    app = web.Application()
    app.router.add_get("/vsa/v1/signatures/{version}", plat.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    plat.origin = f"http://127.0.0.1:{port}"
    yield plat
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def installed_v1(platform: Platform, session: aiohttp.ClientSession, tmp_path: Path
                 ) -> Callable[[], Any]:
    async def install() -> None:
        offer = platform.publish("2026.12.01.1", make_bundle("DSA-OLD-1"))
        await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                   public_key=platform.public_key, state_dir=tmp_path)
    return install


def _assert_old_bundle_in_use(state: Path) -> None:
    assert installed_version(state) == "2026.12.01.1"
    bundle = load_installed(state)
    assert bundle is not None and bundle.knowledge_base is not None
    assert [f.id for f in bundle.knowledge_base.match(DEBIAN_HOST)] == ["DSA-OLD-1"]
    leftovers = [p.name for p in (state / "signatures").iterdir() if p.name.endswith(".part")]
    assert leftovers == []


async def test_good_bundle_is_installed_and_reported(platform: Platform, session: aiohttp.ClientSession,
                                                     tmp_path: Path) -> None:
    assert installed_version(tmp_path) is None
    lines = io.StringIO()
    offer = platform.publish("2026.12.04.1", make_bundle("DSA-1", "DSA-2"))
    assert needs_download(tmp_path, offer)
    bundle = await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                        public_key=platform.public_key, state_dir=tmp_path,
                                        console=Console(lines))
    assert bundle.version == installed_version(tmp_path) == "2026.12.04.1"
    assert not needs_download(tmp_path, offer)
    assert bundle.knowledge_base is not None
    assert sorted(f.id for f in bundle.knowledge_base.match(DEBIAN_HOST)) == ["DSA-1", "DSA-2"]
    assert bundle.path.read_bytes() == platform.bodies["2026.12.04.1"]
    sig_dir = tmp_path / "signatures"
    assert stat.S_IMODE(sig_dir.stat().st_mode) == 0o700
    for path in sig_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert "vsa: signatures 2026.12.04.1 installed (2 advisories)" in lines.getvalue()


async def test_new_bundle_replaces_the_old_file_only_after_install(
        platform: Platform, session: aiohttp.ClientSession, tmp_path: Path, installed_v1: Any) -> None:
    await installed_v1()
    old = installed_bundle(tmp_path)
    assert old is not None and old.path.exists()
    offer = platform.publish("2026.12.04.1", make_bundle("DSA-NEW-1"))
    await download_and_install(session, platform_origin=platform.origin, offer=offer,
                               public_key=platform.public_key, state_dir=tmp_path)
    assert installed_version(tmp_path) == "2026.12.04.1"
    assert not old.path.exists()
    names = sorted(p.name for p in (tmp_path / "signatures").iterdir())
    assert len([n for n in names if n.startswith("bundle-")]) == 1 and "current.json" in names


def _tamper_signature(offer: SignaturesOffer) -> SignaturesOffer:
    forged = Ed25519PrivateKey.generate().sign(b"something else")
    return SignaturesOffer(offer.version, offer.url, offer.sha256, forged)


def _tamper_digest(offer: SignaturesOffer) -> SignaturesOffer:
    return SignaturesOffer(offer.version, offer.url, hashlib.sha256(b"other").hexdigest(), offer.signature)


@pytest.mark.parametrize("case, behaviour, tamper, error, words", [
    ("bad signature", "ok", _tamper_signature, BundleSignatureInvalid, "signature does not verify"),
    ("wrong digest", "ok", _tamper_digest, BundleDigestMismatch, "differs from the announced"),
    ("truncated", "truncate", None, BundleDownloadFailed, "cut"),
    ("cut without length", "cut_chunked", None, BundleDownloadFailed, "cut"),
    ("redirect", "redirect", None, BundleOriginRefused, "redirect"),
    ("http error", "error", None, BundleDownloadFailed, "HTTP 503: bundle is being rebuilt"),
])
async def test_bad_bundles_are_refused_and_the_old_one_stays(
        platform: Platform, session: aiohttp.ClientSession, tmp_path: Path, installed_v1: Any,
        case: str, behaviour: str, tamper: Any, error: type[BundleRefused], words: str) -> None:
    await installed_v1()
    offer = platform.publish("2026.12.04.1", make_bundle("DSA-NEW-1", "DSA-NEW-2") * 3, behaviour)
    if tamper:
        offer = tamper(offer)
    lines = io.StringIO()
    with pytest.raises(error, match=words) as caught:
        await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                   public_key=platform.public_key, state_dir=tmp_path,
                                   console=Console(lines))
    assert caught.value.version == "2026.12.04.1"
    _assert_old_bundle_in_use(tmp_path)
    refusal = last_refusal(tmp_path)
    assert refusal is not None and refusal["reason"] == error.reason and refusal["version"] == "2026.12.04.1"
    said = lines.getvalue()
    assert said.startswith("vsa: signatures 2026.12.04.1 refused:") and "Still using 2026.12.01.1" in said


@pytest.mark.parametrize("behaviour", ["ok", "chunked"])
async def test_oversized_bundles_are_refused(platform: Platform, session: aiohttp.ClientSession,
                                             tmp_path: Path, installed_v1: Any, behaviour: str) -> None:
    await installed_v1()
    body = make_bundle(*(f"DSA-{i}" for i in range(400)))
    offer = platform.publish("2026.12.04.1", body, behaviour)
    limit = len(body) - 1
    with pytest.raises(BundleTooLarge, match=f"{limit}-byte limit"):
        await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                   public_key=platform.public_key, state_dir=tmp_path, max_bytes=limit)
    _assert_old_bundle_in_use(tmp_path)


async def test_signed_content_that_is_not_gzip_json_lines_is_refused(
        platform: Platform, session: aiohttp.ClientSession, tmp_path: Path, installed_v1: Any) -> None:
    await installed_v1()
    for body in (b"plain text, not gzip", gzip.compress(b"{not json}\n")):
        offer = platform.publish("2026.12.04.1", body)
        with pytest.raises(BundleContentInvalid, match="not gzip JSON Lines"):
            await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                       public_key=platform.public_key, state_dir=tmp_path)
        _assert_old_bundle_in_use(tmp_path)


@pytest.mark.parametrize("url_template", [
    "https://evil.example/vsa/v1/signatures/x",
    "//evil.example/vsa/v1/signatures/x",
    "http://127.0.0.2:{port}/vsa/v1/signatures/2026.12.04.1",     # another host
    "http://127.0.0.1:{other}/vsa/v1/signatures/2026.12.04.1",    # another port
    "https://127.0.0.1:{port}/vsa/v1/signatures/2026.12.04.1",    # another scheme
    "http://user@127.0.0.1:{port}/vsa/v1/signatures/2026.12.04.1",
    "vsa/v1/signatures/2026.12.04.1",                             # not a path from the root
    "/\\evil.example/x",
])
async def test_other_origin_urls_are_refused_without_a_request(
        platform: Platform, session: aiohttp.ClientSession, tmp_path: Path, installed_v1: Any,
        url_template: str) -> None:
    await installed_v1()
    port = int(platform.origin.rsplit(":", 1)[1])
    offer = platform.publish("2026.12.04.1", make_bundle("DSA-NEW-1"))
    url = url_template.format(port=port, other=port + 1 if port < 65535 else port - 1)
    offer = SignaturesOffer(offer.version, url, offer.sha256, offer.signature)
    before = list(platform.requests)
    with pytest.raises(BundleOriginRefused, match="not on the platform's own origin"):
        await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                   public_key=platform.public_key, state_dir=tmp_path)
    assert platform.requests == before
    _assert_old_bundle_in_use(tmp_path)


async def test_absolute_url_on_the_same_origin_is_accepted(
        platform: Platform, session: aiohttp.ClientSession, tmp_path: Path) -> None:
    offer = platform.publish("2026.12.04.1", make_bundle("DSA-1"))
    offer = SignaturesOffer(offer.version, platform.origin + offer.url, offer.sha256, offer.signature)
    bundle = await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                        public_key=platform.public_key, state_dir=tmp_path)
    assert bundle.version == "2026.12.04.1"


def test_resolve_joins_paths_to_the_origin_only() -> None:
    assert str(resolve_bundle_url("https://platform.example", "/vsa/v1/signatures/1")) == \
        "https://platform.example/vsa/v1/signatures/1"
    assert str(resolve_bundle_url("https://platform.example:8443/base/", "/vsa/v1/signatures/1")) == \
        "https://platform.example:8443/vsa/v1/signatures/1"
    assert str(resolve_bundle_url("https://platform.example", "https://PLATFORM.example:443/x")) == \
        "https://platform.example/x"


@pytest.mark.parametrize("wire, words", [
    (None, "not a JSON object"),
    ({"version": "../../etc", "url": "/x", "sha256": "0" * 64, "signature": ""}, "invalid version"),
    ({"version": "1", "url": "/x", "sha256": "xyz", "signature": ""}, "sha256"),
    ({"version": "1", "url": "/x", "sha256": "0" * 64, "signature": "bm90IDY0IGJ5dGVz"}, "signature"),
    ({"version": "1", "sha256": "0" * 64, "signature": ""}, "no url"),
])
def test_malformed_offers_are_refused(wire: Any, words: str) -> None:
    with pytest.raises(BundleOfferInvalid, match=words):
        SignaturesOffer.from_wire(wire)


def test_public_key_from_configuration() -> None:
    raw = os.urandom(32)
    assert load_public_key(base64.b64encode(raw).decode()) == raw
    with pytest.raises(KbError, match="32 bytes"):
        load_public_key(base64.b64encode(b"short").decode())
    with pytest.raises(KbError, match="not base64"):
        load_public_key("***not base64***")


async def test_wrong_configured_key_is_a_signature_refusal(
        platform: Platform, session: aiohttp.ClientSession, tmp_path: Path, installed_v1: Any) -> None:
    await installed_v1()
    offer = platform.publish("2026.12.04.1", make_bundle("DSA-NEW-1"))
    other_key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with pytest.raises(BundleSignatureInvalid):
        await download_and_install(session, platform_origin=platform.origin, offer=offer,
                                   public_key=other_key, state_dir=tmp_path)
    _assert_old_bundle_in_use(tmp_path)


async def test_download_takes_the_callers_proxy(platform: Platform, session: aiohttp.ClientSession,
                                                tmp_path: Path) -> None:
    # The daemon passes the PROXY_URL tunnel (proxy, proxy_auth) with its mTLS session:
    # a real Squid must see the bundle request, authenticated.
    from conftest import require

    from appliance.lab.squid import Squid, squid_available

    require(squid_available() is None, squid_available() or "")
    with Squid(users={"jdoe": "bundle-proxy-pw"}) as squid:
        offer = platform.publish("2026.12.05.1", make_bundle("DSA-9"))
        bundle = await download_and_install(
            session, platform_origin=platform.origin, offer=offer, public_key=platform.public_key,
            state_dir=tmp_path,
            request_kwargs={"proxy": squid.url, "proxy_auth": aiohttp.BasicAuth("jdoe", "bundle-proxy-pw")})
        assert bundle.version == "2026.12.05.1"
        log = squid.access_log_text()
    assert f"{platform.origin}/vsa/v1/signatures/2026.12.05.1" in log
    assert " jdoe " in log
