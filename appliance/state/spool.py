"""The job journal and the result spool: SQLite in WAL mode, nothing lost.

RUNTIME.md, State directory: every host result is in the spool before it is
sent; a ``2xx`` marks it sent; it leaves the spool only when the platform has
accepted the job's completion (so that a ``409 missing_hosts`` can be answered
from it). A job is in the journal before it is accepted. After a crash the
daemon resumes from here: unsent results are sent again, accepted jobs go on
with only the hosts that have no result yet.

Each result row carries a ``version`` that grows on every replacement, so a
``2xx`` for an older copy never marks a newer one as sent.

All methods are synchronous and short (one small transaction each); the
daemon calls them from the event loop. A full disk surfaces as
:class:`SpoolFullError`, on which the daemon stops accepting work.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from appliance.errors import StateError
from appliance.state.files import FILE_MODE, ensure_private_dir

SPOOL_FILE = "spool.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
OPEN_FREE_MIN_BYTES = 256 * 1024  # below this, a spool that cannot be opened is blamed on a full disk

# A job's life in the journal. "offered": written before the accept call;
# "running": the platform confirmed the accept; "completing": every host has a
# result and the completion is being sent; "done": the platform accepted the
# completion (rows are then deleted); "dropped": the platform ended our
# interest (404/409/410) or the job was canceled.
JobState = Literal["offered", "running", "completing", "done", "dropped"]
ACTIVE_STATES: tuple[JobState, ...] = ("offered", "running", "completing")


class SpoolFullError(StateError):
    """The disk holding the spool is full: stop accepting work; nothing accepted is lost."""


@dataclass(frozen=True)
class JournaledJob:
    """One job the appliance holds or is about to hold."""

    job_id: str
    state: JobState
    spec: dict[str, Any]
    completion: dict[str, Any] | None
    journaled_at: float


@dataclass(frozen=True)
class SpooledResult:
    """One host result waiting to be sent (or re-sent)."""

    job_id: str
    host_key: str
    version: int
    body: dict[str, Any]


class Spool:
    """The durable journal of jobs and spool of host results."""

    def __init__(self, state_dir: Path) -> None:
        ensure_private_dir(state_dir)
        self.path = state_dir / SPOOL_FILE
        try:
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self.path.chmod(FILE_MODE)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transaction survives a power cut, not only a crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise _open_error(exc, state_dir, self.path) from exc
        for suffix in ("-wal", "-shm"):
            sidecar = self.path.with_name(self.path.name + suffix)
            if sidecar.exists():
                sidecar.chmod(FILE_MODE)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _state_error(exc, f"cannot {what}") from exc

    def _migrate(self) -> None:
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS jobs (
                job_id TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                spec TEXT NOT NULL,
                completion TEXT,
                journaled_at REAL NOT NULL
            );
            CREATE TABLE IF NOT EXISTS results (
                job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
                host_key TEXT NOT NULL,
                version INTEGER NOT NULL,
                body TEXT NOT NULL,
                sent_version INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (job_id, host_key)
            );
            CREATE INDEX IF NOT EXISTS results_unsent ON results(job_id) WHERE sent_version < version;
            """
        )
        self._db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    # ---- the job journal ----------------------------------------------------------

    def journal_job(self, job_id: str, spec: dict[str, Any]) -> None:
        """Record a job before accepting it (idempotent: a re-offer keeps the first row)."""
        with self._tx("journal the job") as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs(job_id, state, spec, journaled_at) VALUES (?, 'offered', ?, ?)",
                (job_id, json.dumps(spec), time.time()),
            )

    def set_job_spec(self, job_id: str, spec: dict[str, Any]) -> None:
        """Replace the journaled spec with the platform's authoritative copy."""
        with self._tx("record the job spec") as db:
            db.execute("UPDATE jobs SET spec = ? WHERE job_id = ?", (json.dumps(spec), job_id))

    def set_job_state(
        self, job_id: str, state: JobState, *, completion: dict[str, Any] | None = None
    ) -> None:
        """Move a job to ``state`` (with the completion body when completing)."""
        with self._tx("update the job journal") as db:
            if completion is not None:
                db.execute(
                    "UPDATE jobs SET state = ?, completion = ? WHERE job_id = ?",
                    (state, json.dumps(completion), job_id),
                )
            else:
                db.execute("UPDATE jobs SET state = ? WHERE job_id = ?", (state, job_id))

    def job(self, job_id: str) -> JournaledJob | None:
        """One journaled job, or None."""
        row = self._db.execute(
            "SELECT job_id, state, spec, completion, journaled_at FROM jobs WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        return _job(row) if row else None

    def active_jobs(self) -> list[JournaledJob]:
        """Jobs offered, running or completing, oldest first (what a restart resumes)."""
        rows = self._db.execute(
            "SELECT job_id, state, spec, completion, journaled_at FROM jobs "
            "WHERE state IN ('offered', 'running', 'completing') ORDER BY journaled_at"
        ).fetchall()
        return [_job(r) for r in rows]

    def finish_job(self, job_id: str, state: Literal["done", "dropped"]) -> int:
        """End a job: delete its results (accepted completion, or interest ended). Returns how many."""
        with self._tx("finish the job") as db:
            count = db.execute(
                "SELECT COUNT(*) FROM results WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            db.execute("DELETE FROM results WHERE job_id = ?", (job_id,))
            db.execute("UPDATE jobs SET state = ?, spec = '{}' WHERE job_id = ?", (state, job_id))
        return int(count)

    # ---- the result spool ---------------------------------------------------------

    def put_result(self, job_id: str, host_key: str, body: dict[str, Any]) -> int:
        """Store (or replace) a host's result before it is sent; returns its version."""
        with self._tx("spool the host result") as db:
            db.execute(
                "INSERT INTO results(job_id, host_key, version, body) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(job_id, host_key) DO UPDATE SET version = version + 1, body = excluded.body",
                (job_id, host_key, json.dumps(body)),
            )
            row = db.execute(
                "SELECT version FROM results WHERE job_id = ? AND host_key = ?", (job_id, host_key)
            ).fetchone()
        return int(row[0])

    def mark_sent(self, job_id: str, host_key: str, version: int) -> None:
        """The platform answered 2xx for ``version`` of this result."""
        with self._tx("mark the result sent") as db:
            db.execute(
                "UPDATE results SET sent_version = MAX(sent_version, ?) WHERE job_id = ? AND host_key = ?",
                (version, job_id, host_key),
            )

    def mark_unsent(self, job_id: str, host_keys: list[str]) -> int:
        """The platform lacks these (409 missing_hosts): send them again. Returns how many were found."""
        with self._tx("re-queue missing results") as db:
            found = 0
            for key in host_keys:
                found += db.execute(
                    "UPDATE results SET sent_version = 0 WHERE job_id = ? AND host_key = ?",
                    (job_id, key),
                ).rowcount
        return found

    def unsent(self, *, limit: int = 100, job_id: str | None = None) -> list[SpooledResult]:
        """Results not yet acknowledged, oldest jobs first."""
        query = (
            "SELECT r.job_id, r.host_key, r.version, r.body FROM results r JOIN jobs j USING (job_id) "
            "WHERE r.sent_version < r.version AND j.state IN ('running', 'completing')"
        )
        args: tuple[Any, ...] = ()
        if job_id is not None:
            query += " AND r.job_id = ?"
            args = (job_id,)
        query += " ORDER BY j.journaled_at, r.rowid LIMIT ?"
        rows = self._db.execute(query, (*args, limit)).fetchall()
        return [SpooledResult(r[0], r[1], int(r[2]), json.loads(r[3])) for r in rows]

    def results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Every spooled result body of the job (sent or not), in the order they were spooled."""
        cursor = self._db.execute("SELECT body FROM results WHERE job_id = ? ORDER BY rowid", (job_id,))
        for row in cursor:  # one body at a time: a big job's results never sit in memory together
            yield json.loads(row[0])

    def status_counts(self, job_id: str) -> tuple[dict[str, int], int]:
        """({status: hosts}, findings) over the job's spooled results, counted inside SQLite."""
        rows = self._db.execute(
            "SELECT json_extract(body, '$.status'), COUNT(*), "
            "SUM(COALESCE(json_array_length(json_extract(body, '$.findings')), 0)) "
            "FROM results WHERE job_id = ? GROUP BY 1",
            (job_id,),
        ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}, sum(int(r[2] or 0) for r in rows)

    def host_keys(self, job_id: str) -> list[str]:
        """Every host of the job that has a result in the spool (sent or not)."""
        rows = self._db.execute(
            "SELECT host_key FROM results WHERE job_id = ? ORDER BY rowid", (job_id,)
        ).fetchall()
        return [r[0] for r in rows]

    def unsent_count(self, job_id: str | None = None) -> int:
        """How many results wait to be sent (all jobs, or one)."""
        if job_id is None:
            row = self._db.execute(
                "SELECT COUNT(*) FROM results r JOIN jobs j USING (job_id) "
                "WHERE r.sent_version < r.version AND j.state IN ('running', 'completing')"
            ).fetchone()
        else:
            row = self._db.execute(
                "SELECT COUNT(*) FROM results WHERE job_id = ? AND sent_version < version",
                (job_id,),
            ).fetchone()
        return int(row[0])


def _job(row: tuple[Any, ...]) -> JournaledJob:
    return JournaledJob(
        job_id=row[0],
        state=row[1],
        spec=json.loads(row[2]),
        completion=json.loads(row[3]) if row[3] else None,
        journaled_at=float(row[4]),
    )


def _open_error(exc: sqlite3.Error, state_dir: Path, path: Path) -> StateError:
    """Why the spool cannot be opened; a full disk said as such.

    Opening a WAL database creates its ``-wal`` and ``-shm`` files; on a full disk
    SQLite reports that as "disk I/O error" (SQLITE_IOERR, not SQLITE_FULL), which
    sent an operator looking for a broken disk (issue 11). The free space decides.
    """
    try:
        usage = os.statvfs(state_dir)
        free = usage.f_bavail * usage.f_frsize
    except OSError:
        free = None
    if free is not None and free < OPEN_FREE_MIN_BYTES:
        return SpoolFullError(
            f"cannot open the spool {path}: the disk holding it is full ({free} bytes free; SQLite: {exc}); "
            "nothing in it is lost: free space there and the daemon resumes from it"
        )
    return _state_error(exc, f"cannot open the spool {path}")


def _state_error(exc: sqlite3.Error, what: str) -> StateError:
    text = str(exc)
    if "full" in text.lower() or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return SpoolFullError(
            f"{what}: the disk is full ({text}); no new work is accepted until space is freed"
        )
    return StateError(f"{what}: {text}")
