"""``vsa status [--json]``: what the appliance is and does, read from the state directory.

Reads ``identity/identity.json`` (registration, bound instance) and the
daemon's ``status.json`` (phase, last poll, interval, jobs, spool, signatures);
both are written atomically, so this works while the daemon runs. It never
talks to the platform or IMDS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from appliance.config import load_config
from appliance.errors import VsaError
from appliance.state.identity import IdentityStore
from appliance.state.runtime import pid_alive, read_status


def collect(state_dir: Path) -> dict[str, Any]:
    """The status as one JSON-ready dict (the ``--json`` output)."""
    store = IdentityStore(state_dir)
    identity_error = None
    try:
        identity = store.load()
    except VsaError as exc:
        identity, identity_error = None, str(exc)
    runtime = read_status(state_dir) or {}
    reg = identity.registration if identity else None
    runtime_reg = runtime.get("registration") or {}
    if identity is not None and identity.registered and reg is not None:
        registration = {"state": "registered", "appliance_id": reg.appliance_id,
                        "instance_id": identity.instance_id, "registered_at": reg.registered_at,
                        "refusal": None}
    else:
        registration = {"state": runtime_reg.get("state") if runtime_reg.get("state") in ("registering", "refused") else "unregistered",
                        "appliance_id": None,
                        "instance_id": identity.instance_id if identity else runtime_reg.get("instance_id"),
                        "registered_at": None, "refusal": runtime_reg.get("refusal")}
    running = runtime.get("daemon") == "running" and pid_alive(runtime.get("pid"))
    if not runtime:
        daemon_state = "never ran"
    elif running:
        daemon_state = "running"
    elif runtime.get("daemon") == "running":
        daemon_state = "not running (it stopped without saying so)"
    else:
        daemon_state = "stopped"
    poll = runtime.get("poll") or {}
    return {
        "state_dir": str(state_dir),
        "daemon": {
            "state": daemon_state,
            "pid": runtime.get("pid") if running else None,
            "version": runtime.get("version"),
            "started_at": runtime.get("started_at"),
            "updated_at": runtime.get("updated_at"),
            "phase": runtime.get("phase"),
            "detail": runtime.get("detail"),
        },
        "registration": registration,
        "identity_error": identity_error,
        "imds": runtime.get("imds"),
        "perscode": runtime.get("perscode"),
        "proxy": runtime.get("proxy"),
        "platform": runtime.get("platform") or {"url": reg.platform_url if reg else None, "reachable": None, "verdict": None},
        "poll": {
            "interval_s": poll.get("interval_s", reg.poll_interval_s if reg else None),
            "last_at": poll.get("last_at"),
            "last_result": poll.get("last_result"),
            "last_ok_at": poll.get("last_ok_at"),
            "next_at": poll.get("next_at") if running else None,
            "consecutive_failures": poll.get("consecutive_failures", 0),
            "count": poll.get("count", 0),
        },
        "jobs": runtime.get("jobs") or [],
        "spool_pending": runtime.get("spool_pending", 0),
        "signatures_version": runtime.get("signatures_version"),
    }


def render(status: dict[str, Any], out: TextIO) -> None:
    """The human form: one fact per line."""
    d, r, p = status["daemon"], status["registration"], status["poll"]

    def line(label: str, value: Any) -> None:
        out.write(f"{label + ':':<20} {value}\n")

    daemon = d["state"] + (f" (pid {d['pid']}, vsa {d['version']}, since {d['started_at']})" if d["pid"] else "")
    line("daemon", daemon)
    if d.get("phase") and d["state"] == "running":
        detail = d.get("detail") if d.get("detail") != r.get("refusal") else None
        line("phase", d["phase"] + (f" - {detail}" if detail else ""))
    if r["state"] == "registered":
        line("registration", f"registered as {r['appliance_id']} (since {r['registered_at']})")
    elif r.get("refusal"):
        line("registration", f"{r['state']} - {str(r['refusal']).removeprefix('registration refused: ')}")
    else:
        line("registration", r["state"])
    line("appliance ID", r.get("appliance_id") or "-")
    line("bound instance", r.get("instance_id") or "-")
    if status.get("identity_error"):
        line("identity problem", status["identity_error"])
    platform = status.get("platform") or {}
    line("platform", f"{platform.get('url') or '-'}" + (f" ({platform['verdict']})" if platform.get("verdict") else ""))
    if status.get("proxy"):
        line("proxy", status["proxy"])
    if status.get("perscode"):
        line("personalization", status["perscode"])
    line("imds", status.get("imds") or "-")
    line("poll interval", f"{_num(p['interval_s'])} s" if p.get("interval_s") is not None else "-")
    if p.get("last_at"):
        line("last poll", f"{p['last_at']} ({p['last_result']})")
        if p.get("last_result") != "ok" and p.get("last_ok_at"):
            line("last good poll", p["last_ok_at"])
    else:
        line("last poll", "never")
    if p.get("next_at"):
        line("next poll", p["next_at"])
    jobs = status.get("jobs") or []
    if jobs:
        line("running jobs", len(jobs))
        for job in jobs:
            share = f" ({100 * job['hosts_done'] // job['hosts_total']} %)" if job.get("hosts_total") else ""
            out.write(f"  {job['job_id']}: {job['hosts_done']}/{job['hosts_total']} hosts done{share}\n")
    else:
        line("running jobs", "none")
    line("spool backlog", status.get("spool_pending", 0))
    line("signatures", status.get("signatures_version") or "none installed")


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``vsa status``."""
    try:
        config = load_config(getattr(args, "config", None))
        status = collect(config.state_dir)
    except VsaError as exc:
        print(f"vsa status: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        render(status, sys.stdout)
    return 0
