"""The appliance's identity: key, CSR, client certificate and the instance it is bound to.

PROTOCOL.md, Identity: at first boot the appliance makes an EC P-256 key pair,
kept only in its state directory (0600), and a PKCS#10 CSR; registration
exchanges the CSR for a client certificate; the registration is bound to the
EC2 instance ID it was made from. A state directory that finds itself on
another instance (a clone, a snapshot restored elsewhere, a moved disk) never
uses the old identity again: it is set aside and the appliance registers afresh.

Layout, under ``<state.dir>/identity/`` (directory 0700, files 0600)::

    key.pem          the private key (PKCS#8 PEM, unencrypted; never leaves this directory)
    csr.pem          the certificate signing request for it
    identity.json    {"schema": 1, "instance_id", "created_at", "appliance_id",
                      "registered_at", "platform_url", "poll_interval_s", "mqtt"}
    certificate.pem  the client certificate the platform issued (after registration)
    ca.pem           the platform's client CA, as register returned it (informational)

An identity set aside is renamed to ``<state.dir>/identity.old-<UTC timestamp>/``.
``vsa reset`` removes ``identity/`` (never the spool or the job journal).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.console import Console, register_secret
from appliance.errors import StateError, VsaError
from appliance.state.files import (
    atomic_write,
    atomic_write_json,
    ensure_private_dir,
    read_json_file,
)

IDENTITY_DIRNAME = "identity"
KEY_FILE = "key.pem"
CSR_FILE = "csr.pem"
CERT_FILE = "certificate.pem"
CA_FILE = "ca.pem"
META_FILE = "identity.json"
SCHEMA = 1

BindingVerdict = Literal["same", "moved", "unchecked"]


def utc_now_iso() -> str:
    """The current time as an RFC 3339 UTC string (seconds precision)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def binding_verdict(bound: str | None, current: str | None) -> BindingVerdict:
    """Whether an identity bound to ``bound`` may be used on instance ``current``.

    ``same``: the instance it was made on. ``moved``: another instance (or an
    identity made without an instance ID now running where one is known): it
    must never be used again. ``unchecked``: the current instance ID is unknown
    (IMDS disabled), so the binding cannot be checked.
    """
    if current is None:
        return "unchecked" if bound is not None else "same"
    return "same" if bound == current else "moved"


def clone_message(bound: str | None, current: str, *, registered: bool) -> str:
    """The console line for an identity found on another instance (names both IDs)."""
    old = bound or "an unknown instance"
    if registered:
        return (
            f"this disk was registered as {old} but runs on {current} "
            "(a clone, a snapshot restored elsewhere or a moved disk): "
            "setting the old identity aside and registering afresh"
        )
    return (
        f"this disk's identity was made on {old} but runs on {current} "
        "(a clone, a snapshot restored elsewhere or a moved disk): "
        "setting it aside and making a new one"
    )


@dataclass(frozen=True)
class Registration:
    """What registration gave the appliance (identity.json, once registered)."""

    appliance_id: str
    registered_at: str
    platform_url: str | None
    poll_interval_s: int | None
    mqtt: dict[str, Any] | None = None


@dataclass(frozen=True)
class Identity:
    """An identity on disk: the key's files, the bound instance, and the registration if any."""

    directory: Path
    instance_id: str | None
    created_at: str
    registration: Registration | None

    @property
    def key_path(self) -> Path:
        """The private key file (0600)."""
        return self.directory / KEY_FILE

    @property
    def cert_path(self) -> Path:
        """The client certificate file (present once registered)."""
        return self.directory / CERT_FILE

    @property
    def ca_path(self) -> Path:
        """The platform's client CA as register returned it."""
        return self.directory / CA_FILE

    @property
    def registered(self) -> bool:
        """True once the platform issued a certificate for this key."""
        return self.registration is not None and self.cert_path.exists()

    def csr_pem(self) -> str:
        """The PEM of the certificate signing request."""
        try:
            return (self.directory / CSR_FILE).read_text(encoding="ascii")
        except OSError as exc:
            raise StateError(f"cannot read the CSR in {self.directory}: {exc.strerror or exc}") from exc


class IdentityStore:
    """The identity in ``<state.dir>/identity``: load, create, bind, register, set aside, wipe."""

    def __init__(self, state_dir: Path) -> None:
        """Prepare a store; nothing is read or written until a method is called."""
        self.state_dir = Path(state_dir)
        self.directory = self.state_dir / IDENTITY_DIRNAME

    # --- reading ---

    def load(self) -> Identity | None:
        """The identity on disk, or None when there is none (or it is incomplete)."""
        meta = read_json_file(self.directory / META_FILE)
        if meta is None or not (self.directory / KEY_FILE).exists():
            return None
        if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
            raise StateError(f"{self.directory / META_FILE} has an unknown layout; run vsa reset")
        # The key is a secret: register it so that it can never reach a log or the console.
        register_secret(self._read_key_text())
        registration = None
        if isinstance(meta.get("appliance_id"), str) and meta["appliance_id"]:
            interval = meta.get("poll_interval_s")
            registration = Registration(
                appliance_id=meta["appliance_id"],
                registered_at=str(meta.get("registered_at") or ""),
                platform_url=meta.get("platform_url"),
                poll_interval_s=interval if isinstance(interval, int) else None,
                mqtt=meta.get("mqtt") if isinstance(meta.get("mqtt"), dict) else None,
            )
        instance = meta.get("instance_id")
        return Identity(
            directory=self.directory,
            instance_id=instance if isinstance(instance, str) else None,
            created_at=str(meta.get("created_at") or ""),
            registration=registration,
        )

    def _read_key_text(self) -> str:
        try:
            return (self.directory / KEY_FILE).read_text(encoding="ascii")
        except OSError as exc:
            raise StateError(f"cannot read the private key in {self.directory}: {exc.strerror or exc}") from exc

    # --- writing ---

    def create(self, instance_id: str | None) -> Identity:
        """Make a fresh key and CSR bound to ``instance_id``, replacing any identity here."""
        ensure_private_dir(self.state_dir)
        if self.directory.exists():
            self._remove_tree(self.directory)
        ensure_private_dir(self.directory)
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        register_secret(key_pem.decode("ascii"))
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vsa appliance"),
                x509.NameAttribute(NameOID.COMMON_NAME, instance_id or "vsa-appliance"),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        atomic_write(self.directory / KEY_FILE, key_pem)
        atomic_write(self.directory / CSR_FILE, csr.public_bytes(serialization.Encoding.PEM))
        created = utc_now_iso()
        self._write_meta(instance_id=instance_id, created_at=created, registration=None)
        return Identity(self.directory, instance_id, created, None)

    def load_or_create(self, instance_id: str | None) -> Identity:
        """The identity on disk, or a new one bound to ``instance_id`` (no binding check here)."""
        return self.load() or self.create(instance_id)

    def save_registration(
        self,
        identity: Identity,
        *,
        appliance_id: str,
        certificate_pem: str,
        ca_pem: str | None,
        platform_url: str | None,
        poll_interval_s: int | None,
        mqtt: dict[str, Any] | None,
    ) -> Identity:
        """Store the certificate the platform issued and the registration facts."""
        self._check_certificate_matches_key(certificate_pem)
        atomic_write(identity.directory / CERT_FILE, certificate_pem.encode("ascii"))
        if ca_pem:
            atomic_write(identity.directory / CA_FILE, ca_pem.encode("ascii"))
        registration = Registration(
            appliance_id=appliance_id,
            registered_at=utc_now_iso(),
            platform_url=platform_url,
            poll_interval_s=poll_interval_s,
            mqtt=mqtt,
        )
        self._write_meta(identity.instance_id, identity.created_at, registration)
        return Identity(identity.directory, identity.instance_id, identity.created_at, registration)

    def update_poll_interval(self, identity: Identity, poll_interval_s: int) -> Identity:
        """Remember the latest poll interval the platform set (so a restart starts with it)."""
        if identity.registration is None or identity.registration.poll_interval_s == poll_interval_s:
            return identity
        if not identity.key_path.exists():
            return identity  # wiped meanwhile (vsa reset): never recreate a partial identity
        reg = identity.registration
        registration = Registration(reg.appliance_id, reg.registered_at, reg.platform_url, poll_interval_s, reg.mqtt)
        self._write_meta(identity.instance_id, identity.created_at, registration)
        return Identity(identity.directory, identity.instance_id, identity.created_at, registration)

    def set_aside(self) -> Path:
        """Rename the identity to ``identity.old-<timestamp>`` and return the new path."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.state_dir / f"{IDENTITY_DIRNAME}.old-{stamp}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.state_dir / f"{IDENTITY_DIRNAME}.old-{stamp}-{suffix}"
        try:
            self.directory.rename(target)
            target.chmod(0o700)
        except OSError as exc:
            raise StateError(f"cannot set the old identity aside to {target}: {exc.strerror or exc}") from exc
        return target

    def wipe(self) -> bool:
        """Remove the identity (key, CSR, certificate, binding); True when there was one."""
        if not self.directory.exists():
            return False
        self._remove_tree(self.directory)
        return True

    # --- helpers ---

    def _write_meta(self, instance_id: str | None, created_at: str, registration: Registration | None) -> None:
        meta: dict[str, Any] = {
            "schema": SCHEMA,
            "instance_id": instance_id,
            "created_at": created_at,
            "appliance_id": None,
            "registered_at": None,
            "platform_url": None,
            "poll_interval_s": None,
            "mqtt": None,
        }
        if registration is not None:
            meta.update(
                appliance_id=registration.appliance_id,
                registered_at=registration.registered_at,
                platform_url=registration.platform_url,
                poll_interval_s=registration.poll_interval_s,
                mqtt=registration.mqtt,
            )
        atomic_write_json(self.directory / META_FILE, meta)

    def _check_certificate_matches_key(self, certificate_pem: str) -> None:
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
            key = serialization.load_pem_private_key(self._read_key_text().encode("ascii"), None)
        except (ValueError, UnicodeEncodeError) as exc:
            raise StateError(f"the certificate the platform issued cannot be read: {exc}") from exc
        cert_pub = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        key_pub = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if cert_pub != key_pub:
            raise StateError("the certificate the platform issued is not for this appliance's key")

    @staticmethod
    def _remove_tree(path: Path) -> None:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror or exc}") from exc


# --- vsa reset ---


def reset_main(args: argparse.Namespace) -> int:
    """``vsa reset [--yes]``: wipe the identity (not the spool or job journal), after confirmation."""
    from appliance.config import load_config  # late: keep `vsa reset` light

    console = Console()
    try:
        config = load_config(getattr(args, "config", None))
    except VsaError as exc:
        print(f"vsa reset: {exc}", file=sys.stderr)
        return 2
    store = IdentityStore(config.state_dir)
    try:
        identity = store.load()
    except StateError:
        identity = None  # an unreadable identity is wiped all the same
    if not store.directory.exists():
        console.say(f"reset: there is no identity in {config.state_dir}; nothing to do")
        return 0
    what = f"the identity in {store.directory}"
    if identity is not None and identity.registration is not None:
        what += f" (appliance {identity.registration.appliance_id}, bound to {identity.instance_id or 'no instance ID'})"
    if not getattr(args, "yes", False):
        if not sys.stdin.isatty():
            print(f"vsa reset: this would wipe {what}; run it again with --yes to confirm", file=sys.stderr)
            return 1
        answer = input(f"Wipe {what}? The spool and job journal are kept. Type 'yes' to confirm: ")
        if answer.strip().lower() != "yes":
            print("vsa reset: nothing wiped", file=sys.stderr)
            return 1
    try:
        store.wipe()
    except StateError as exc:
        print(f"vsa reset: {exc}", file=sys.stderr)
        return 1
    console.say(
        f"reset: wiped {what}; the spool and job journal are kept. "
        "Restart the daemon (systemctl restart vsa) to register afresh with the PERSCODE in user-data"
    )
    return 0
