"""The reference platform as a Python object: what the admin CLI, the tests and the demo drive.

A :class:`Platform` is one data directory (CA, keys, SQLite file, bundles).
Several processes may open the same directory at once: a server
(``python -m appliance.lab.platform serve``) and any number of admin commands
or test fixtures; SQLite in WAL mode keeps them consistent, and a running
server sees every change (codes, jobs, faults) at its next request.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import gzip
import hashlib
import io
import ipaddress
import json
import os
import re
import secrets
import string
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.authrecords import AuthRecordError, parse_auth_record
from appliance.lab.platform.ca import DEFAULT_SERVER_NAMES, CertificateAuthority, write_private
from appliance.lab.platform.errors import LabPlatformError
from appliance.lab.platform.schemas import PATH_ID_RE, schema_errors
from appliance.lab.platform.secrets import Vault, encrypt_auth_record
from appliance.lab.platform.store import DEFAULT_POLL_INTERVAL_S, CallerCert, Store
from appliance.platform.messages import JobSpec as ApplianceJobSpec
from appliance.platform.messages import MessageError

PERSCODE_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
PERSCODE_DIGITS = 14
JOB_ID_RE = PATH_ID_RE
DEFAULT_RETRY_AFTER_S = 5
WAIT_STEP_S = 0.05
DEFAULT_OPTIONS: dict[str, Any] = {
    "tcp_ports": "standard",
    "udp_ports": "none",
    "host_discovery": "default",
    "service_detection": "banner",
    "rate_pps": 10000,
    "max_parallel_hosts": 16,
    "host_timeout_s": 900,
    "authentication": True,
}
DEFAULT_EC2: dict[str, Any] = {
    "role_arn": None,
    "external_id": None,
    "regions": ["us-east-1"],
    "platform": "vpc_all",
    "vpc_ids": [],
    "instance_ids": None,
    "tags_include": [],
    "tags_exclude": [],
    "include_small_types": False,
    "address": "private",
}


class Platform:
    """One reference platform data directory and every administrative operation on it."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.ca = CertificateAuthority(self.data_dir)
        if not self.ca.exists():
            raise LabPlatformError(
                f"{self.data_dir} is not an initialized platform data directory: run "
                "`python -m appliance.lab.platform init --data-dir DIR` first"
            )
        self.vault = Vault(self.data_dir / "vault.key")
        self.store = Store(self.data_dir / "platform.db", (self.data_dir / "pepper.key").read_bytes())
        self.signatures_dir = self.data_dir / "signatures"

    @classmethod
    def init(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        server_names: Iterable[str] = DEFAULT_SERVER_NAMES,
        poll_interval_s: int | None = None,
        mqtt_url: str | None = None,
        force: bool = False,
    ) -> Platform:
        """Create (or, with ``force``, recreate) a data directory: CA, server certificate, keys, database.

        An existing directory is reused as it is unless ``force``; the server
        certificate is reissued when ``server_names`` differ from the current ones.
        """
        path = Path(data_dir).resolve()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        ca = CertificateAuthority(path)
        names = list(server_names)
        if force or not ca.exists():
            for stale in ("platform.db", "platform.db-wal", "platform.db-shm"):
                (path / stale).unlink(missing_ok=True)
            ca.create(names)
        elif _server_names(ca) != names:
            ca.reissue_server(names)
        if force or not (path / "pepper.key").exists():
            write_private(path / "pepper.key", secrets.token_bytes(32))
        Vault(path / "vault.key").create()
        (path / "signatures").mkdir(mode=0o700, exist_ok=True)
        platform = cls(path)
        if force or not (path / "signing.key").exists():
            platform.keygen(force=True)
        if poll_interval_s is not None:
            platform.set_poll_interval(poll_interval_s)
        if mqtt_url is not None:
            platform.set_mqtt(mqtt_url)
        return platform

    def close(self) -> None:
        """Close the database connection."""
        self.store.close()

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- facts ------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The CA certificate file (what an appliance's ``platform.ca_file`` points at)."""
        return self.ca.ca_file

    @property
    def ca_pem(self) -> str:
        """The CA certificate, PEM."""
        return self.ca.ca_pem()

    def server_names(self) -> list[str]:
        """The names and addresses in the server certificate."""
        return _server_names(self.ca)

    # -- settings -----------------------------------------------------------------------

    def set_poll_interval(self, seconds: int, appliance_id: str | None = None) -> None:
        """The poll interval the platform announces (all appliances, or one)."""
        if not isinstance(seconds, int) or seconds < 1:
            raise LabPlatformError("the poll interval must be a positive number of seconds")
        if appliance_id is None:
            self.store.set_setting("poll_interval_s", seconds)
        else:
            self.store.set_appliance_poll_interval(appliance_id, seconds)

    def poll_interval(self) -> int:
        """The platform-wide poll interval."""
        return int(self.store.get_setting("poll_interval_s", DEFAULT_POLL_INTERVAL_S))

    def set_mqtt(self, url: str | None) -> None:
        """The MQTT broker URL sent at registration (None: no broker)."""
        self.store.set_setting("mqtt_url", url)

    def mqtt_for(self, appliance_id: str) -> dict[str, str] | None:
        """The ``mqtt`` object of a registration response."""
        url = self.store.get_setting("mqtt_url")
        if not url:
            return None
        return {"url": url, "wake_topic": f"vsa/{appliance_id}/wake",
                "events_topic": f"vsa/{appliance_id}/events"}

    def wake(self, appliance_id: str, *, timeout_s: float = 10.0) -> None:
        """Publish a wake-up on the appliance's MQTT wake topic (the broker must be configured)."""
        from appliance.lab.platform.mqtt import wake

        wake(self, appliance_id, timeout_s=timeout_s)

    def set_ec2_api_proxy(
        self, url: str | None, username: str | None = None, password: str | None = None
    ) -> None:
        """The ``ec2_api_proxy`` every poll response carries (None: no proxy). Kept sealed."""
        value = None if url is None else {"url": url, "username": username, "password": password}
        self.store.set_setting(
            "ec2_api_proxy", None if value is None else base64.b64encode(self.vault.seal(value)).decode()
        )

    def ec2_api_proxy(self) -> dict[str, Any] | None:
        """The ``ec2_api_proxy`` object of poll responses."""
        sealed = self.store.get_setting("ec2_api_proxy")
        if sealed is None:
            return None
        value: dict[str, Any] = self.vault.open(base64.b64decode(sealed))
        return value

    # -- personalization codes and appliances ----------------------------------------------

    def create_perscode(self, code: str | None = None, label: str | None = None) -> str:
        """Create a personalization code (14 random digits unless given) and return it.

        The code is shown only here: the database keeps a keyed hash and the last 4 characters.
        """
        if code is None:
            code = "".join(secrets.choice(string.digits) for _ in range(PERSCODE_DIGITS))
        if not PERSCODE_RE.match(code):
            raise LabPlatformError("a personalization code is 8-64 characters of A-Z, a-z, 0-9 and -")
        self.store.create_perscode(code, label)
        return code

    def revoke_perscode(self, code: str) -> None:
        """Revoke a code: registrations with it are refused with 403 invalid_perscode."""
        if not self.store.revoke_perscode(code):
            raise LabPlatformError("no such personalization code (or it is revoked already)")

    def list_perscodes(self) -> list[dict[str, Any]]:
        """Every code (last 4 characters only), with its binding."""
        return self.store.list_perscodes()

    def list_appliances(self) -> list[dict[str, Any]]:
        """Every appliance: binding, registrations, last heartbeat."""
        return self.store.list_appliances()

    def appliance(self, appliance_id: str) -> dict[str, Any]:
        """One appliance, as :meth:`list_appliances` shows it."""
        for entry in self.list_appliances():
            if entry["appliance_id"] == appliance_id:
                return entry
        raise LabPlatformError(f"no appliance {appliance_id}")

    def forget_appliance(self, appliance_id: str) -> None:
        """Forget an appliance: its next request is answered 401 unknown_appliance.

        The code stays bound to its instance, so the appliance registers again
        (same instance, same code) and gets the same ``appliance_id`` back.
        """
        if not self.store.forget_appliance(appliance_id):
            raise LabPlatformError(f"no appliance {appliance_id}")

    # -- jobs -----------------------------------------------------------------------------

    def submit_job(
        self,
        spec: dict[str, Any],
        *,
        appliances: list[str] | None = None,
        validate: bool = True,
    ) -> str:
        """Queue a job and return its ID; it is offered at the next polls.

        ``spec`` is a JobSpec whose ``auth_records`` are plaintext JSON objects
        (PROTOCOL.md, Authentication records); each is sealed at rest and
        encrypted per appliance, to its certified key, when the job is offered or
        accepted. Missing fields get the defaults (:data:`DEFAULT_OPTIONS`).
        ``appliances`` restricts the offer to those appliance IDs (default: every
        appliance). ``validate=False`` queues ``spec`` as it is (tests of how an
        appliance handles a malformed job); strings in ``auth_records`` are then
        sent untouched.
        """
        spec = copy.deepcopy(spec)
        records = spec.pop("auth_records", None) or []
        if not isinstance(records, list):
            raise LabPlatformError("auth_records must be a list")
        if validate:
            spec = normalize_job(spec)
            for record in records:
                if not isinstance(record, dict):
                    raise LabPlatformError("each auth record must be a plaintext JSON object")
                try:
                    parse_auth_record(record)
                except AuthRecordError as exc:
                    raise LabPlatformError(f"auth record refused: {exc}") from exc
        elif "job_id" not in spec:
            spec["job_id"] = new_job_id()
        sealed = self.vault.seal(records) if records else None
        self.store.add_job(spec, sealed, appliances)
        return str(spec["job_id"])

    def cancel_job(self, job_id: str) -> None:
        """Cancel a queued or running job (offers stop, the holder is told, its calls get 410)."""
        if not self.store.cancel_job(job_id):
            raise LabPlatformError(f"job {job_id} is unknown or already completed/canceled")

    def results(self, job_id: str) -> dict[str, Any]:
        """A job's state, holder, completion and host results (``hosts`` by host_key)."""
        report = self.store.job_report(job_id)
        if report is None:
            raise LabPlatformError(f"no job {job_id}")
        return report

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job in brief."""
        return self.store.list_jobs()

    def job_spec_for(self, job_id: str, caller: CallerCert) -> dict[str, Any]:
        """The JobSpec as sent to this appliance: auth records encrypted to its current key."""
        row = self.store.job_row(job_id)
        if row is None:
            raise LabPlatformError(f"no job {job_id}")
        spec: dict[str, Any] = json.loads(row["spec_json"])
        auth = self.store.offer_auth(job_id, caller.appliance_id, caller.fingerprint)
        if auth is None:
            plain = self.vault.open(row["auth_sealed"]) if row["auth_sealed"] is not None else []
            auth = [
                encrypt_auth_record(r, caller.public_key_pem) if isinstance(r, dict) else r
                for r in plain
            ]
            self.store.save_offer(job_id, caller.appliance_id, caller.fingerprint, auth)
        spec["auth_records"] = auth
        return spec

    # -- signatures -----------------------------------------------------------------------

    def keygen(self, force: bool = False) -> str:
        """Create the Ed25519 bundle-signing key (unless one exists) and return its public key.

        The return value is base64 of the raw 32-byte public key: the appliance's
        ``signatures.public_key``.
        """
        key_file = self.data_dir / "signing.key"
        if force or not key_file.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            write_private(key_file, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ))
        return self.signing_public_key()

    def _signing_key(self) -> ed25519.Ed25519PrivateKey:
        key = serialization.load_pem_private_key((self.data_dir / "signing.key").read_bytes(), None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key

    def signing_public_key(self) -> str:
        """Base64 of the raw Ed25519 public key that verifies published bundles."""
        raw = self._signing_key().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode("ascii")

    def publish_signatures(
        self,
        records: Iterable[dict[str, Any]] | str | os.PathLike[str],
        *,
        version: str | None = None,
        corrupt: str | None = None,
        url: str | None = None,
    ) -> dict[str, Any]:
        """Publish a knowledge-base bundle: OSV records as gzip JSON Lines, signed with Ed25519.

        ``records`` is an iterable of OSV objects, or a file: JSON Lines (``.jsonl``),
        gzip JSON Lines (``.gz``, republished byte for byte) or a JSON array. The
        new bundle becomes the one poll responses offer. Returns the offer
        (``version``, ``url``, ``sha256``, ``signature``) and ``size``.

        Lab only, to test how an appliance refuses a bad bundle: ``corrupt`` is
        ``"signature"`` (signed over other bytes), ``"sha256"`` (a wrong digest in
        the offer) or ``"bytes"`` (the served file differs from what was digested
        and signed); ``url`` replaces the offer's URL (e.g. another origin).
        """
        if corrupt not in (None, "signature", "sha256", "bytes"):
            raise LabPlatformError("corrupt is one of signature, sha256, bytes")
        if isinstance(records, str | os.PathLike):
            bundle = _bundle_from_file(Path(records))
        else:
            bundle = _gzip_jsonl(list(records))
        version = version or self._next_version()
        if not PATH_ID_RE.match(version):
            raise LabPlatformError("a signatures version is 1-64 characters of A-Z, a-z, 0-9, . _ -")
        digest = hashlib.sha256(bundle).hexdigest()
        signed = bundle + b"tampered" if corrupt == "signature" else bundle
        signature = base64.b64encode(self._signing_key().sign(signed)).decode("ascii")
        if corrupt == "sha256":
            digest = hashlib.sha256(b"not the bundle").hexdigest()
        served = bundle[:-1] + bytes([bundle[-1] ^ 0xFF]) if corrupt == "bytes" else bundle
        target = self.signatures_dir / f"{version}.jsonl.gz"
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(served)
        os.replace(tmp, target)
        self.store.add_signatures(version, digest, signature, len(served), target.name, url)
        offer = self.signatures_offer()
        assert offer is not None
        return offer | {"size": len(bundle)}

    def _next_version(self) -> str:
        today = dt.datetime.now(dt.UTC).strftime("%Y.%m.%d")
        n = 1
        while self.store.signatures(f"{today}.{n}") is not None:
            n += 1
        return f"{today}.{n}"

    def signatures_offer(self) -> dict[str, Any] | None:
        """The ``signatures`` object of poll responses (the newest bundle), or None."""
        row = self.store.current_signatures()
        if row is None:
            return None
        return {"version": row["version"],
                "url": row["offer_url"] or f"/vsa/v1/signatures/{row['version']}",
                "sha256": row["sha256"], "signature": row["signature"]}

    def signatures_file(self, version: str) -> Path | None:
        """The bundle file of a published version."""
        row = self.store.signatures(version)
        return self.signatures_dir / row["file"] if row is not None else None

    # -- waiting (tests and the demo) -----------------------------------------------------------

    def wait_for_requests(self, count: int, *, timeout_s: float = 30.0, **filters: Any) -> list[dict[str, Any]]:
        """Block until at least ``count`` recorded requests match ``filters``; return them."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.requests(**filters)
            if len(rows) >= count:
                return rows
            if time.monotonic() > deadline:
                raise LabPlatformError(
                    f"waited {timeout_s:.0f} s for {count} requests matching {filters}; saw {len(rows)}"
                )
            time.sleep(WAIT_STEP_S)

    def wait_for_job(self, job_id: str, states: tuple[str, ...] = ("completed",), *,
                     timeout_s: float = 60.0) -> dict[str, Any]:
        """Block until the job is in one of ``states``; return :meth:`results`."""
        deadline = time.monotonic() + timeout_s
        while True:
            report = self.results(job_id)
            if report["state"] in states:
                return report
            if time.monotonic() > deadline:
                raise LabPlatformError(
                    f"waited {timeout_s:.0f} s for job {job_id} to be {'/'.join(states)}; "
                    f"it is {report['state']}"
                )
            time.sleep(WAIT_STEP_S)

    # -- fault injection (lab only) ---------------------------------------------------------

    def fail_next(
        self,
        count: int | None = None,
        *,
        duration_s: float | None = None,
        status: int = 503,
        retry_after_s: int | None = DEFAULT_RETRY_AFTER_S,
        path_re: str | None = None,
        method: str | None = None,
    ) -> int:
        """Answer ``status`` (503 by default, with ``Retry-After``) to the next ``count``
        matching requests and/or for ``duration_s`` seconds. Returns the fault ID."""
        code = {429: "rate_limited", 503: "unavailable"}.get(status, "injected_fault")
        return self.store.add_fault(
            "status", path_re=path_re, method=method, count=count, duration_s=duration_s,
            params={"status": status, "retry_after_s": retry_after_s, "code": code},
        )

    def drop_next(
        self, count: int | None = None, *, duration_s: float | None = None,
        path_re: str | None = None, method: str | None = None,
    ) -> int:
        """Close the connection without an answer for the next matching requests."""
        return self.store.add_fault("drop", path_re=path_re, method=method, count=count,
                                    duration_s=duration_s)

    def delay_next(
        self, delay_s: float, count: int | None = None, *, duration_s: float | None = None,
        path_re: str | None = None, method: str | None = None,
    ) -> int:
        """Hold the next matching requests ``delay_s`` seconds before handling them."""
        return self.store.add_fault("delay", path_re=path_re, method=method, count=count,
                                    duration_s=duration_s, params={"delay_s": delay_s})

    def lose_hosts(self, job_id: str | None = None, count: int = 1, times: int = 1) -> int:
        """At the next ``times`` completions (of ``job_id``, or any job), forget the first
        ``count`` reported host results first, so that the completion is answered
        ``409 missing_hosts`` for real and the appliance must send them again."""
        path_re = rf"^/vsa/v1/jobs/{re.escape(job_id)}/complete$" if job_id else r"/complete$"
        return self.store.add_fault("lose_hosts", path_re=path_re, method="POST", count=times,
                                    params={"count": count})

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self.store.clear_faults()

    def list_faults(self) -> list[dict[str, Any]]:
        """The active faults."""
        return [f.__dict__ for f in self.store.list_faults()]

    # -- request log ----------------------------------------------------------------------

    def requests(self, **filters: Any) -> list[dict[str, Any]]:
        """Recorded requests; filters: method, path, path_re, status, appliance_id."""
        return self.store.requests(**filters)

    def count_requests(self, **filters: Any) -> int:
        """How many recorded requests match the filters."""
        return len(self.store.requests(**filters))


def new_job_id() -> str:
    """A fresh job ID."""
    return f"j-{secrets.token_hex(4)}"


def normalize_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Fill a submitted JobSpec's defaults and check it as the appliance will (raise with words)."""
    out: dict[str, Any] = {
        "job_id": spec.get("job_id") or new_job_id(),
        "type": spec.get("type", "vm_scan"),
        "title": spec.get("title") or "",
        "targets": {"ips": [], "hostnames": [], "ec2": None} | dict(spec.get("targets") or {}),
        "exclude": list(spec.get("exclude") or []),
        "options": DEFAULT_OPTIONS | dict(spec.get("options") or {}),
    }
    out["title"] = out["title"] or out["job_id"]
    for key, value in spec.items():
        out.setdefault(key, value)  # unknown fields travel as they are
    if out["targets"].get("ec2") is not None:
        out["targets"]["ec2"] = DEFAULT_EC2 | dict(out["targets"]["ec2"])
    problem = schema_errors("JobSpec", out | {"auth_records": []})
    if problem:
        raise LabPlatformError(f"job refused: {problem}")
    targets = out["targets"]
    if not (targets["ips"] or targets["hostnames"] or targets["ec2"]):
        raise LabPlatformError("job refused: targets name no ips, no hostnames and no ec2 selection")
    for where, items in (("targets/ips", targets["ips"]), ("exclude", out["exclude"])):
        for item in items:
            if not _is_address_spec(item):
                raise LabPlatformError(f"job refused: {where}: {item!r} is not an address, CIDR or range")
    for name in ("tcp_ports", "udp_ports"):
        _check_port_list(name, out["options"][name])
    # Last, the appliance's own parser: what it would fail fast is refused here.
    try:
        ApplianceJobSpec.parse(out | {"auth_records": []})
    except MessageError as exc:
        raise LabPlatformError(f"job refused: {exc}") from exc
    return out


def _is_address_spec(text: str) -> bool:
    try:
        if "-" in text:
            first, last = (ipaddress.ip_address(p.strip()) for p in text.split("-", 1))
            return first.version == last.version and int(first) <= int(last)
        if "/" in text:
            ipaddress.ip_network(text, strict=False)
        else:
            ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_port_list(name: str, value: str) -> None:
    if value in ("light", "standard", "full", "none"):
        return
    for part in value.split(","):
        bounds = [int(p) for p in part.split("-")]
        if not all(1 <= b <= 65535 for b in bounds) or bounds != sorted(bounds):
            raise LabPlatformError(f"job refused: options/{name}: {part!r} is not a port or range in 1-65535")


def _server_names(ca: CertificateAuthority) -> list[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(ca.server_cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in san]


def _gzip_jsonl(records: list[dict[str, Any]]) -> bytes:
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise LabPlatformError(f"record {i + 1} is not an OSV object with an id")
    text = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records)
    buf = io.BytesIO()
    # mtime=0: the same records give the same bytes, hence the same digest.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as fh:
        fh.write(text.encode("utf-8"))
    return buf.getvalue()


def _bundle_from_file(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        # Already a bundle: check that it is gzip JSON Lines, publish it byte for byte.
        for n, line in enumerate(gzip.decompress(data).splitlines(), 1):
            if line.strip() and not isinstance(json.loads(line), dict):
                raise LabPlatformError(f"{path}: line {n} is not a JSON object")
        return data
    text = data.decode("utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return _gzip_jsonl(records)
