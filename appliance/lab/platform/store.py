"""The reference platform's state: one SQLite file (WAL), shared by the server and the admin CLI.

Every protocol decision that changes state (registration, accept, host results,
completion) is one transaction here, so that the server and an admin process
working on the same file never see half a change. The file is also the admin
interface: faults, perscodes and jobs written by ``python -m
appliance.lab.platform`` are seen by a running server at its next request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.lab.platform.errors import LabPlatformError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
DEFAULT_POLL_INTERVAL_S = 180
# A poll response carries at most this many offers (oldest first), which keeps
# it far below the appliance's 4 MiB response limit.
MAX_OFFERS_PER_POLL = 50
APPLIANCE_ID_HEX_CHARS = 6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS perscodes (
  code_hash TEXT PRIMARY KEY, last4 TEXT NOT NULL, label TEXT, created_at TEXT NOT NULL,
  revoked_at TEXT, bound_instance_id TEXT, appliance_id TEXT);
CREATE TABLE IF NOT EXISTS appliances (
  appliance_id TEXT PRIMARY KEY, code_hash TEXT NOT NULL, instance_id TEXT NOT NULL,
  registered_at TEXT NOT NULL, registrations INTEGER NOT NULL DEFAULT 1,
  instance_json TEXT, capabilities_json TEXT, software_version TEXT,
  poll_interval_s INTEGER, last_poll_at TEXT, polls INTEGER NOT NULL DEFAULT 0,
  heartbeat_json TEXT, forgotten_at TEXT);
CREATE TABLE IF NOT EXISTS certificates (
  fingerprint TEXT PRIMARY KEY, serial TEXT NOT NULL, appliance_id TEXT NOT NULL,
  public_key_pem TEXT NOT NULL, pem TEXT NOT NULL, issued_at TEXT NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY, spec_json TEXT NOT NULL, auth_sealed BLOB, audience_json TEXT,
  state TEXT NOT NULL, holder TEXT, created_at TEXT NOT NULL, created_s REAL NOT NULL,
  accepted_at TEXT, canceled_at TEXT, completed_at TEXT, completion_json TEXT);
CREATE TABLE IF NOT EXISTS offers (
  job_id TEXT NOT NULL, appliance_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
  auth_records_json TEXT NOT NULL, offered_at TEXT NOT NULL,
  cancel_delivered INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job_id, appliance_id));
CREATE TABLE IF NOT EXISTS host_results (
  job_id TEXT NOT NULL, host_key TEXT NOT NULL, appliance_id TEXT NOT NULL,
  result_json TEXT NOT NULL, first_at TEXT NOT NULL, updated_at TEXT NOT NULL,
  puts INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (job_id, host_key));
CREATE TABLE IF NOT EXISTS progress (
  id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, appliance_id TEXT NOT NULL, phase TEXT NOT NULL,
  hosts_total INTEGER NOT NULL, hosts_done INTEGER NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
  id INTEGER PRIMARY KEY, at TEXT NOT NULL, at_s REAL NOT NULL, method TEXT NOT NULL,
  path TEXT NOT NULL, status INTEGER NOT NULL, appliance_id TEXT, fault TEXT,
  user_agent TEXT);
CREATE TABLE IF NOT EXISTS faults (
  id INTEGER PRIMARY KEY, kind TEXT NOT NULL, path_re TEXT, method TEXT,
  remaining INTEGER, until_s REAL, params_json TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS signatures (
  version TEXT PRIMARY KEY, sha256 TEXT NOT NULL, signature TEXT NOT NULL, size INTEGER NOT NULL,
  file TEXT NOT NULL, published_at TEXT NOT NULL, seq INTEGER NOT NULL, offer_url TEXT);
CREATE INDEX IF NOT EXISTS requests_path ON requests (path);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_s);
"""


class ProtocolRefusal(LabPlatformError):
    """A protocol error answer: HTTP status, error code, words, and extra body fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON error body of PROTOCOL.md: ``{"error", "message"}`` plus extras."""
        return {"error": self.code, "message": self.message, **self.extra}


@dataclass(frozen=True)
class Fault:
    """One injected fault, active while it has ``remaining`` uses and ``until_s`` is ahead."""

    id: int
    kind: str  # status | drop | delay | lose_hosts
    path_re: str | None
    method: str | None
    remaining: int | None
    until_s: float | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallerCert:
    """What the platform knows of a presented client certificate."""

    appliance_id: str
    fingerprint: str
    state: str  # active | superseded | forgotten
    public_key_pem: str


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with a ``Z``, seconds precision."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


class Store:
    """Data access and the transactional protocol decisions of the reference platform."""

    def __init__(self, db_file: Path, pepper: bytes) -> None:
        self.db_file = db_file
        self._pepper = pepper
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            db_file, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            self._db.executescript(_SCHEMA)
        os.chmod(db_file, 0o600)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: writers queue, readers go on)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # -- settings -------------------------------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        """A setting (JSON value), or ``default``."""
        row = self._one("SELECT value FROM settings WHERE key = ?", key)
        return json.loads(row["value"]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        """Set (or, with None, delete) a setting."""
        with self.tx() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, json.dumps(value)),
                )

    # -- personalization codes ---------------------------------------------------------

    def code_hash(self, code: str) -> str:
        """The keyed hash the database knows a code by (codes are never stored in clear)."""
        return hmac.new(self._pepper, code.encode("utf-8"), hashlib.sha256).hexdigest()

    def create_perscode(self, code: str, label: str | None) -> None:
        """Store a new personalization code."""
        with self.tx() as db:
            try:
                db.execute(
                    "INSERT INTO perscodes (code_hash, last4, label, created_at) VALUES (?, ?, ?, ?)",
                    (self.code_hash(code), code[-4:], label, now_rfc3339()),
                )
            except sqlite3.IntegrityError as exc:
                raise LabPlatformError("that personalization code exists already") from exc

    def revoke_perscode(self, code: str) -> bool:
        """Revoke a code (later registrations with it get 403); False when unknown."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE perscodes SET revoked_at = ? WHERE code_hash = ? AND revoked_at IS NULL",
                (now_rfc3339(), self.code_hash(code)),
            )
            return cur.rowcount == 1

    def list_perscodes(self) -> list[dict[str, Any]]:
        """Every code as the admin may see it (last 4 characters only)."""
        rows = self._all(
            "SELECT last4, label, created_at, revoked_at, bound_instance_id, appliance_id "
            "FROM perscodes ORDER BY created_at"
        )
        return [dict(r) | {"code": "****" + r["last4"]} for r in rows]

    # -- registration ----------------------------------------------------------------

    def register(
        self,
        *,
        perscode: str,
        instance_id: str,
        sign: Any,
        instance: dict[str, Any],
        capabilities: Any,
        software_version: str,
    ) -> tuple[str, bool]:
        """Bind the code, (re-)register the appliance and record its new certificate.

        ``sign(appliance_id)`` issues the certificate (an ``IssuedCertificate``);
        it runs inside the transaction so that two racing first registrations of
        one code cannot both win. Returns ``(appliance_id, re_registered)``.
        """
        h = self.code_hash(perscode)
        with self.tx() as db:
            code = db.execute("SELECT * FROM perscodes WHERE code_hash = ?", (h,)).fetchone()
            if code is None or code["revoked_at"] is not None:
                raise ProtocolRefusal(
                    403, "invalid_perscode",
                    "this personalization code is unknown or revoked: create one on the platform "
                    "and put it in the instance's user-data as PERSCODE",
                )
            bound = code["bound_instance_id"]
            if bound is not None and bound != instance_id:
                raise ProtocolRefusal(
                    409, "perscode_in_use",
                    f"this personalization code is already bound to instance {bound}; "
                    f"instance {instance_id} needs a code of its own",
                )
            appliance_id = code["appliance_id"] or f"vsa-{secrets.token_hex(APPLIANCE_ID_HEX_CHARS // 2)}"
            issued = sign(appliance_id)
            now = now_rfc3339()
            re_registered = code["appliance_id"] is not None
            db.execute(
                "UPDATE perscodes SET bound_instance_id = ?, appliance_id = ? WHERE code_hash = ?",
                (instance_id, appliance_id, h),
            )
            db.execute(
                "INSERT INTO appliances (appliance_id, code_hash, instance_id, registered_at, "
                "instance_json, capabilities_json, software_version) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (appliance_id) DO UPDATE SET registered_at = excluded.registered_at, "
                "registrations = registrations + 1, instance_json = excluded.instance_json, "
                "capabilities_json = excluded.capabilities_json, "
                "software_version = excluded.software_version, forgotten_at = NULL",
                (appliance_id, h, instance_id, now, json.dumps(instance),
                 json.dumps(capabilities), software_version),
            )
            db.execute(
                "UPDATE certificates SET state = 'superseded' WHERE appliance_id = ? AND state = 'active'",
                (appliance_id,),
            )
            db.execute(
                "INSERT INTO certificates (fingerprint, serial, appliance_id, public_key_pem, pem, "
                "issued_at, state) VALUES (?, ?, ?, ?, ?, ?, 'active')",
                (issued.fingerprint_sha256, str(issued.serial), appliance_id,
                 issued.public_key_pem, issued.pem, now),
            )
        return appliance_id, re_registered

    def caller(self, fingerprint: str) -> CallerCert | None:
        """The appliance a certificate fingerprint belongs to, and the certificate's state."""
        row = self._one("SELECT * FROM certificates WHERE fingerprint = ?", fingerprint)
        if row is None:
            return None
        return CallerCert(row["appliance_id"], row["fingerprint"], row["state"], row["public_key_pem"])

    def active_certificate_pem(self, appliance_id: str) -> str:
        """The PEM of the appliance's active certificate."""
        row = self._one(
            "SELECT pem FROM certificates WHERE appliance_id = ? AND state = 'active'", appliance_id
        )
        if row is None:
            raise LabPlatformError(f"appliance {appliance_id} has no active certificate")
        return str(row["pem"])

    def forget_appliance(self, appliance_id: str) -> bool:
        """Forget an appliance: its certificates are answered 401 until it registers again."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE appliances SET forgotten_at = ? WHERE appliance_id = ?",
                (now_rfc3339(), appliance_id),
            )
            db.execute(
                "UPDATE certificates SET state = 'forgotten' WHERE appliance_id = ? AND state = 'active'",
                (appliance_id,),
            )
            return cur.rowcount == 1

    def list_appliances(self) -> list[dict[str, Any]]:
        """Every appliance with its binding, registration count and last heartbeat."""
        rows = self._all("SELECT * FROM appliances ORDER BY registered_at")
        out = []
        for r in rows:
            active = self._one(
                "SELECT fingerprint FROM certificates WHERE appliance_id = ? AND state = 'active'",
                r["appliance_id"],
            )
            out.append({
                "appliance_id": r["appliance_id"],
                "instance_id": r["instance_id"],
                "registered_at": r["registered_at"],
                "registrations": r["registrations"],
                "software_version": r["software_version"],
                "poll_interval_s": r["poll_interval_s"],
                "last_poll_at": r["last_poll_at"],
                "polls": r["polls"],
                "heartbeat": _loads(r["heartbeat_json"]),
                "instance": _loads(r["instance_json"]),
                "capabilities": _loads(r["capabilities_json"]),
                "forgotten": r["forgotten_at"] is not None,
                "certificate_fingerprint": active["fingerprint"] if active else None,
            })
        return out

    def set_appliance_poll_interval(self, appliance_id: str, seconds: int | None) -> None:
        """Override the poll interval of one appliance (None: the platform's default)."""
        with self.tx() as db:
            db.execute(
                "UPDATE appliances SET poll_interval_s = ? WHERE appliance_id = ?",
                (seconds, appliance_id),
            )

    def poll_interval_for(self, appliance_id: str) -> int:
        """The interval this appliance is told to poll at."""
        row = self._one("SELECT poll_interval_s FROM appliances WHERE appliance_id = ?", appliance_id)
        if row is not None and row["poll_interval_s"] is not None:
            return int(row["poll_interval_s"])
        return int(self.get_setting("poll_interval_s", DEFAULT_POLL_INTERVAL_S))

    def record_heartbeat(self, appliance_id: str, body: dict[str, Any]) -> None:
        """Remember the facts of a poll (the fields of PROTOCOL.md's poll request)."""
        keys = ("appliance_id", "instance_id", "software_version", "signatures_version", "lan_ip",
                "status", "running_jobs", "spool_pending")
        heartbeat = {k: body.get(k) for k in keys}
        with self.tx() as db:
            db.execute(
                "UPDATE appliances SET last_poll_at = ?, polls = polls + 1, heartbeat_json = ?, "
                "software_version = ? WHERE appliance_id = ?",
                (now_rfc3339(), json.dumps(heartbeat), body.get("software_version"), appliance_id),
            )

    # -- jobs --------------------------------------------------------------------------

    def add_job(self, spec: dict[str, Any], auth_sealed: bytes | None, audience: list[str] | None) -> None:
        """Queue a job (spec without auth records; those are sealed apart)."""
        with self.tx() as db:
            try:
                db.execute(
                    "INSERT INTO jobs (job_id, spec_json, auth_sealed, audience_json, state, "
                    "created_at, created_s) VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                    (spec["job_id"], json.dumps(spec), auth_sealed,
                     json.dumps(audience) if audience is not None else None,
                     now_rfc3339(), time.time()),
                )
            except sqlite3.IntegrityError as exc:
                raise LabPlatformError(f"a job with id {spec['job_id']} exists already") from exc

    def job_row(self, job_id: str) -> sqlite3.Row | None:
        """The raw job row."""
        return self._one("SELECT * FROM jobs WHERE job_id = ?", job_id)

    def cancel_job(self, job_id: str) -> bool:
        """Cancel a job that is not complete; False when unknown or already finished/canceled."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'canceled', canceled_at = ? "
                "WHERE job_id = ? AND state IN ('queued', 'accepted')",
                (now_rfc3339(), job_id),
            )
            return cur.rowcount == 1

    def queued_jobs_for(self, appliance_id: str) -> list[sqlite3.Row]:
        """Jobs nobody holds yet that may be offered to this appliance, oldest first."""
        rows = self._all("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_s, job_id")
        out = []
        for r in rows:
            audience = _loads(r["audience_json"])
            if audience is None or appliance_id in audience:
                out.append(r)
            if len(out) >= MAX_OFFERS_PER_POLL:
                break
        return out

    def offer_auth(self, job_id: str, appliance_id: str, fingerprint: str) -> list[str] | None:
        """The JWEs already made for this appliance's current certificate, if any."""
        row = self._one(
            "SELECT fingerprint, auth_records_json FROM offers WHERE job_id = ? AND appliance_id = ?",
            job_id, appliance_id,
        )
        if row is None or row["fingerprint"] != fingerprint:
            return None
        records: list[str] = json.loads(row["auth_records_json"])
        return records

    def save_offer(self, job_id: str, appliance_id: str, fingerprint: str, auth_records: list[str]) -> None:
        """Remember an offer (and its JWEs, so that repeated offers carry the same copy)."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO offers (job_id, appliance_id, fingerprint, auth_records_json, offered_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id, appliance_id) DO UPDATE SET "
                "fingerprint = excluded.fingerprint, auth_records_json = excluded.auth_records_json",
                (job_id, appliance_id, fingerprint, json.dumps(auth_records), now_rfc3339()),
            )

    def take_cancellations(self, appliance_id: str, running: list[str]) -> list[str]:
        """Canceled jobs to tell this appliance about (see the poll operation's description)."""
        with self.tx() as db:
            undelivered = [
                r["job_id"] for r in db.execute(
                    "SELECT o.job_id FROM offers o JOIN jobs j ON j.job_id = o.job_id "
                    "WHERE o.appliance_id = ? AND j.state = 'canceled' AND o.cancel_delivered = 0",
                    (appliance_id,),
                ).fetchall()
            ]
            held = [
                r["job_id"] for r in db.execute(
                    "SELECT job_id FROM jobs WHERE holder = ? AND state = 'canceled'", (appliance_id,)
                ).fetchall()
            ]
            db.execute(
                "UPDATE offers SET cancel_delivered = 1 WHERE appliance_id = ? AND job_id IN "
                "(SELECT job_id FROM jobs WHERE state = 'canceled')",
                (appliance_id,),
            )
            # A held job gets an offer row at accept time; a canceled job still
            # running on this appliance is named again in every poll.
            running_set = set(running)
            again = [j for j in held if j in running_set]
        return sorted(set(undelivered) | set(again))

    def accept(self, job_id: str, appliance_id: str) -> sqlite3.Row:
        """Claim a job for this appliance; the first accept wins (PROTOCOL.md, accept)."""
        with self.tx() as db:
            job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if job is None:
                raise ProtocolRefusal(404, "unknown_job", f"the platform does not know job {job_id}")
            if job["state"] == "canceled":
                raise ProtocolRefusal(410, "job_canceled", f"job {job_id} was canceled")
            if job["holder"] == appliance_id:
                return job
            if job["holder"] is not None:
                raise ProtocolRefusal(409, "job_taken", f"job {job_id} was accepted by another appliance")
            audience = _loads(job["audience_json"])
            if audience is not None and appliance_id not in audience:
                raise ProtocolRefusal(409, "job_taken", f"job {job_id} is meant for other appliances")
            cur = db.execute(
                "UPDATE jobs SET holder = ?, state = 'accepted', accepted_at = ? "
                "WHERE job_id = ? AND holder IS NULL AND state = 'queued'",
                (appliance_id, now_rfc3339(), job_id),
            )
            if cur.rowcount != 1:  # cannot happen inside BEGIN IMMEDIATE; kept as a guard
                raise ProtocolRefusal(409, "job_taken", f"job {job_id} was accepted by another appliance")
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            assert row is not None
            return row

    def held_job(self, job_id: str, appliance_id: str) -> sqlite3.Row:
        """The job if this appliance holds it and it is not canceled, else the protocol's refusal."""
        job = self.job_row(job_id)
        if job is None:
            raise ProtocolRefusal(404, "unknown_job", f"the platform does not know job {job_id}")
        if job["holder"] != appliance_id:
            raise ProtocolRefusal(409, "job_not_accepted", f"this appliance does not hold job {job_id}")
        if job["state"] == "canceled":
            raise ProtocolRefusal(410, "job_canceled", f"job {job_id} was canceled")
        return job

    def put_host(self, job_id: str, host_key: str, appliance_id: str, result: dict[str, Any]) -> tuple[bool, str]:
        """Store (or replace) one host's result; returns (created, received_at)."""
        now = now_rfc3339()
        with self.tx() as db:
            job = db.execute("SELECT state, holder FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            # Re-checked inside the transaction: a cancel may have landed meanwhile.
            if job is None or job["holder"] != appliance_id or job["state"] == "canceled":
                raise ProtocolRefusal(410, "job_canceled", f"job {job_id} was canceled")
            existing = db.execute(
                "SELECT 1 FROM host_results WHERE job_id = ? AND host_key = ?", (job_id, host_key)
            ).fetchone()
            db.execute(
                "INSERT INTO host_results (job_id, host_key, appliance_id, result_json, first_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, host_key) DO UPDATE SET "
                "result_json = excluded.result_json, updated_at = excluded.updated_at, "
                "appliance_id = excluded.appliance_id, puts = puts + 1",
                (job_id, host_key, appliance_id, json.dumps(result), now, now),
            )
        return existing is None, now

    def add_progress(self, job_id: str, appliance_id: str, body: dict[str, Any]) -> None:
        """Record one progress report."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO progress (job_id, appliance_id, phase, hosts_total, hosts_done, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, appliance_id, body["phase"], body["hosts_total"], body["hosts_done"],
                 now_rfc3339()),
            )

    def drop_host_results(self, job_id: str, host_keys: list[str]) -> list[str]:
        """Delete stored results (the lose_hosts fault); returns the keys that were held."""
        dropped = []
        with self.tx() as db:
            for key in host_keys:
                cur = db.execute(
                    "DELETE FROM host_results WHERE job_id = ? AND host_key = ?", (job_id, key)
                )
                if cur.rowcount:
                    dropped.append(key)
        return dropped

    def complete(self, job_id: str, appliance_id: str, completion: dict[str, Any]) -> int:
        """Accept a completion when every host of ``host_keys`` is held; returns the host count."""
        with self.tx() as db:
            job = db.execute("SELECT state, holder FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if job is None or job["holder"] != appliance_id or job["state"] == "canceled":
                raise ProtocolRefusal(410, "job_canceled", f"job {job_id} was canceled")
            held = {
                r["host_key"] for r in db.execute(
                    "SELECT host_key FROM host_results WHERE job_id = ?", (job_id,)
                ).fetchall()
            }
            missing = [k for k in completion["host_keys"] if k not in held]
            if missing:
                raise ProtocolRefusal(
                    409, "missing_hosts",
                    f"the platform lacks {len(missing)} of the {len(completion['host_keys'])} "
                    f"host results of job {job_id}: send them again, then complete again",
                    host_keys=missing,
                )
            db.execute(
                "UPDATE jobs SET state = 'completed', completed_at = ?, completion_json = ? "
                "WHERE job_id = ?",
                (now_rfc3339(), json.dumps(completion), job_id),
            )
            return len(held)

    def job_report(self, job_id: str) -> dict[str, Any] | None:
        """Everything known of a job: spec (without auth), state, holder, hosts, completion."""
        job = self.job_row(job_id)
        if job is None:
            return None
        hosts = self._all(
            "SELECT host_key, result_json, puts, appliance_id, first_at, updated_at "
            "FROM host_results WHERE job_id = ? ORDER BY host_key", job_id,
        )
        progress = self._one(
            "SELECT phase, hosts_total, hosts_done, at FROM progress WHERE job_id = ? "
            "ORDER BY id DESC LIMIT 1", job_id,
        )
        return {
            "job_id": job_id,
            "state": job["state"],
            "holder": job["holder"],
            "created_at": job["created_at"],
            "accepted_at": job["accepted_at"],
            "canceled_at": job["canceled_at"],
            "completed_at": job["completed_at"],
            "spec": json.loads(job["spec_json"]),
            "audience": _loads(job["audience_json"]),
            "completion": _loads(job["completion_json"]),
            "progress": dict(progress) if progress else None,
            "hosts": {h["host_key"]: json.loads(h["result_json"]) for h in hosts},
            "host_puts": {h["host_key"]: h["puts"] for h in hosts},
        }

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, oldest first, in brief."""
        rows = self._all(
            "SELECT j.job_id, j.state, j.holder, j.created_at, j.completed_at, "
            "(SELECT COUNT(*) FROM host_results h WHERE h.job_id = j.job_id) AS hosts "
            "FROM jobs j ORDER BY j.created_s, j.job_id"
        )
        return [dict(r) for r in rows]

    # -- signatures ------------------------------------------------------------------

    def add_signatures(
        self, version: str, sha256: str, signature: str, size: int, file: str,
        offer_url: str | None = None,
    ) -> None:
        """Record a published bundle; the newest published is the current one."""
        with self.tx() as db:
            seq_row = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM signatures").fetchone()
            try:
                db.execute(
                    "INSERT INTO signatures (version, sha256, signature, size, file, published_at, "
                    "seq, offer_url) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (version, sha256, signature, size, file, now_rfc3339(), seq_row["s"], offer_url),
                )
            except sqlite3.IntegrityError as exc:
                raise LabPlatformError(f"signatures version {version} was published already") from exc

    def current_signatures(self) -> sqlite3.Row | None:
        """The newest published bundle."""
        return self._one("SELECT * FROM signatures ORDER BY seq DESC LIMIT 1")

    def signatures(self, version: str) -> sqlite3.Row | None:
        """One published bundle."""
        return self._one("SELECT * FROM signatures WHERE version = ?", version)

    # -- faults ----------------------------------------------------------------------

    def add_fault(
        self, kind: str, *, path_re: str | None = None, method: str | None = None,
        count: int | None = None, duration_s: float | None = None, params: dict[str, Any] | None = None,
    ) -> int:
        """Add a fault for the next ``count`` matching requests and/or ``duration_s`` seconds."""
        if count is None and duration_s is None:
            count = 1
        if path_re is not None:
            re.compile(path_re)  # refuse a bad pattern now, not at the next request
        until = time.time() + duration_s if duration_s is not None else None
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO faults (kind, path_re, method, remaining, until_s, params_json, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, path_re, method.upper() if method else None, count, until,
                 json.dumps(params or {}), now_rfc3339()),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self.tx() as db:
            db.execute("DELETE FROM faults")

    def list_faults(self) -> list[Fault]:
        """Faults that are still active."""
        now = time.time()
        rows = self._all(
            "SELECT * FROM faults WHERE (remaining IS NULL OR remaining > 0) "
            "AND (until_s IS NULL OR until_s > ?) ORDER BY id", now,
        )
        return [
            Fault(r["id"], r["kind"], r["path_re"], r["method"], r["remaining"], r["until_s"],
                  json.loads(r["params_json"]))
            for r in rows
        ]

    def take_fault(self, kinds: tuple[str, ...], method: str, path: str) -> Fault | None:
        """The first active fault of ``kinds`` matching the request, one use consumed."""
        for fault in self.list_faults():
            if fault.kind not in kinds:
                continue
            if fault.method and fault.method != method.upper():
                continue
            if fault.path_re and not re.search(fault.path_re, path):
                continue
            if fault.remaining is not None:
                with self.tx() as db:
                    cur = db.execute(
                        "UPDATE faults SET remaining = remaining - 1 WHERE id = ? AND remaining > 0",
                        (fault.id,),
                    )
                    if cur.rowcount != 1:
                        continue  # another process used the last one
            return fault
        return None

    # -- request log -------------------------------------------------------------------

    def log_request(
        self, method: str, path: str, status: int, appliance_id: str | None,
        fault: str | None = None, user_agent: str | None = None,
    ) -> None:
        """Record one request (status 0: the connection was dropped)."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO requests (at, at_s, method, path, status, appliance_id, fault, user_agent) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now_rfc3339(), time.time(), method, path, status, appliance_id, fault, user_agent),
            )

    def requests(
        self, *, method: str | None = None, path: str | None = None, path_re: str | None = None,
        status: int | None = None, appliance_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Recorded requests matching every given filter, oldest first."""
        clauses, args = [], []
        for column, value in (("method", method and method.upper()), ("path", path),
                              ("status", status), ("appliance_id", appliance_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = [dict(r) for r in self._all(f"SELECT * FROM requests{where} ORDER BY id", *args)]
        if path_re is not None:
            pattern = re.compile(path_re)
            rows = [r for r in rows if pattern.search(r["path"])]
        return rows
