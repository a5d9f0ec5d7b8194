"""The daemon's live status, written for ``vsa status`` (``<state.dir>/status.json``, 0600).

The daemon rewrites this file atomically whenever something an operator would
ask about changes (phase, registration, each poll); ``vsa status`` reads it
together with the identity, so it works while the daemon runs and after it
stopped. It never holds a secret: the PERSCODE appears only masked (last 4
characters) and the proxy only with its password as ``***``.

Layout (``schema`` 1)::

    {
      "schema": 1,
      "pid": 1234, "version": "0.1.0",
      "started_at": "...Z", "updated_at": "...Z",
      "daemon": "running" | "stopped",
      "phase": "starting" | "imds" | "user-data" | "connectivity" | "identity"
               | "registering" | "polling" | "stopped",
      "detail": "what the daemon is waiting for, in words" | null,
      "imds": "v2" | "v1" | "disabled" | "unavailable" | null,
      "user_data_source": "imds" | "file:/path" | null,
      "perscode": "****1234" | null,
      "proxy": "user:***@host:port" | null,
      "platform": {"url": "...", "reachable": true | false | null, "verdict": "..." | null},
      "registration": {"state": "unregistered" | "registering" | "registered" | "refused",
                       "appliance_id": "..." | null, "instance_id": "..." | null,
                       "registered_at": "...Z" | null, "refusal": "the platform's words" | null},
      "poll": {"interval_s": 180, "asked_s": 180, "count": 12,
               "last_at": "...Z" | null, "last_result": "ok" | "<what failed>" | null,
               "last_ok_at": "...Z" | null, "next_at": "...Z" | null,
               "consecutive_failures": 0},
      "jobs": [{"job_id": "j-42", "hosts_total": 120, "hosts_done": 37}],
      "spool_pending": 0,
      "signatures_version": null
    }
"""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.console import redact
from appliance.state.files import atomic_write_json, read_json_file

STATUS_FILE = "status.json"
SCHEMA = 1


def iso(when: datetime) -> str:
    """RFC 3339 UTC, seconds precision."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    """The current time, RFC 3339 UTC."""
    return iso(datetime.now(UTC))


def later_iso(seconds: float) -> str:
    """The time ``seconds`` from now, RFC 3339 UTC."""
    return iso(datetime.now(UTC) + timedelta(seconds=seconds))


def initial_status() -> dict[str, Any]:
    """The status of a daemon that just started."""
    now = now_iso()
    return {
        "schema": SCHEMA,
        "pid": os.getpid(),
        "version": __version__,
        "started_at": now,
        "updated_at": now,
        "daemon": "running",
        "phase": "starting",
        "detail": None,
        "imds": None,
        "user_data_source": None,
        "perscode": None,
        "proxy": None,
        "platform": {"url": None, "reachable": None, "verdict": None},
        "registration": {
            "state": "unregistered",
            "appliance_id": None,
            "instance_id": None,
            "registered_at": None,
            "refusal": None,
        },
        "poll": {
            "interval_s": None,
            "asked_s": None,
            "count": 0,
            "last_at": None,
            "last_result": None,
            "last_ok_at": None,
            "next_at": None,
            "consecutive_failures": 0,
        },
        "jobs": [],
        "spool_pending": 0,
        "signatures_version": None,
    }


class StatusFile:
    """The daemon's writer of ``status.json``: update sections, write atomically."""

    def __init__(self, state_dir: Path) -> None:
        """Start from a fresh status; nothing is written until :meth:`update`."""
        self.path = Path(state_dir) / STATUS_FILE
        self._data = initial_status()

    @property
    def data(self) -> dict[str, Any]:
        """A copy of the current status."""
        return copy.deepcopy(self._data)

    def update(self, **changes: Any) -> None:
        """Merge ``changes`` (dicts merge one level deep) and write the file."""
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(self._data.get(key), dict):
                self._data[key].update(value)
            else:
                self._data[key] = value
        self._data["updated_at"] = now_iso()
        self.write()

    def write(self) -> None:
        """Write the file atomically; secrets are scrubbed from every string first."""
        atomic_write_json(self.path, _scrub(self._data))


def _scrub(value: Any) -> Any:
    # Belt and braces: the daemon only stores masked values, but any string
    # that came from outside (a platform message, an exception) is scrubbed.
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The last status the daemon wrote, or None when it never ran here."""
    data = read_json_file(Path(state_dir) / STATUS_FILE)
    return data if isinstance(data, dict) else None


def pid_alive(pid: Any) -> bool:
    """True when a process with this PID exists (the daemon may have died without saying so)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True
