"""One host's authenticated checks: SSH and SMB records, then knowledge-base matching.

The job engine and ``vsa scan`` both call :func:`run_host_checks` once per host,
after the port scan, with the context :func:`make_check_context` built once per
daemon (or per ``vsa scan``). It fills the host's ``auth``, ``os``,
``packages``, ``instance_metadata``, ``findings`` and ``errors``
(PROTOCOL.md, HostResult) and never raises for anything a host does.

Rules (decided here, one place for both callers):

- Only a host with status ``scanned`` is checked; any other host (down,
  excluded, unreachable, error) gets no ``auth`` entry at all: nothing was tried
  on it and its status already says why.
- A ``discovery`` job, or a ``vm_scan`` job with ``authentication`` false, checks
  nothing and gets no ``auth`` entry (PROTOCOL.md: discovery means hosts and
  ports only; with authentication off, the job's records are not used, so no
  record "applies"). Neither does it match packages (there are none).
- ``auth[]`` (PROTOCOL.md): one entry per record that applies to the host, in
  the job's order, unix entries first, then windows; for each record type
  present in the job with no record applying to the host, one entry with
  ``record_id`` null and status ``not_applicable``; a type absent from the job
  has no entry.
- Every applying record is tried, each in turn (one SSH session per host at a
  time, so that a real sshd's MaxStartups is never approached), so that each
  entry says the truth about its own credentials; there is no "not tried"
  status in PROTOCOL.md. The host's ``os``, ``packages`` and
  ``instance_metadata`` come from the best unix check: a privileged success
  before an unprivileged one, the job's order between equals. The target's
  instance metadata is read (EC2 targets) only until one check has it.
- A record's port that the port scan covered and did not find open (closed or
  filtered) is not tried: the entry is ``error`` with words saying so (no
  connect timeout is spent on it). A port the scan did not cover is tried.
  Callers say which TCP ports the scan covered with ``scanned_tcp_ports``;
  without it every record is tried.
- Windows records run alongside the unix ones (another protocol, another
  port); each adds its entry, network findings are not repeated. The OS learnt
  over SSH wins over the one learnt over SMB.
- Knowledge-base matching runs once the packages are known: one finding per
  (advisory, installed package); with no knowledge base, the host's ``errors``
  say its packages were not matched.
- Cancelled (the caller's ``host_timeout_s`` through ``asyncio.wait_for``, or a
  stop), the host still gets one entry per applying record (``error``, "stopped
  before this record's check finished") and its ``not_applicable`` entries
  before the cancellation goes on; the same on an internal error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from appliance.authrecords import AuthRecord, UnixRecord, WindowsRecord
from appliance.console import redact
from appliance.kb.match import KnowledgeBase
from appliance.results import AuthOutcome, AuthType, HostResult
from appliance.scan.smb import DEFAULT_TIMEOUT_S as SMB_TIMEOUT_S
from appliance.scan.smb import SMB_PORT, WindowsCheck, check_windows
from appliance.scan.ssh import (
    PreflightReport,
    SshTimeouts,
    Stage,
    UnixCheck,
    check_unix,
    preflight_unix,
)
from appliance.state.hostkeys import HostKeyPins

log = logging.getLogger("vsa.hostchecks")

JobType = Literal["vm_scan", "discovery"]
ExecutorFactory = Callable[[int, str], concurrent.futures.ThreadPoolExecutor]  # (workers, name)
# Threads beyond one per host: a step whose guard fired may hold its thread a
# little longer while paramiko notices its socket was closed.
EXECUTOR_SPARE_THREADS = 4
NO_KB_NOTE = "packages not matched against vulnerabilities: no knowledge base is installed"
TYPE_ORDER: tuple[AuthType, ...] = ("unix", "windows")


@dataclass(frozen=True)
class CheckContext:
    """What every host's checks share, built once per daemon or ``vsa scan`` run.

    The two pools run blocking SSH (paramiko) and SMB (impacket) work; size them
    to the number of hosts checked at once. Call :meth:`close` when done.
    """

    ssh_executor: concurrent.futures.ThreadPoolExecutor
    smb_executor: concurrent.futures.ThreadPoolExecutor
    pins: HostKeyPins
    kb: KnowledgeBase | None
    ssh_timeouts: SshTimeouts = field(default_factory=SshTimeouts)
    smb_timeout_s: float = SMB_TIMEOUT_S
    smb_port: int = SMB_PORT
    no_kb_note: str | None = NO_KB_NOTE  # None: say nothing when there is no knowledge base

    def with_kb(self, kb: KnowledgeBase | None) -> CheckContext:
        """The same context (same pools and pins) matching against another knowledge base."""
        return replace(self, kb=kb)

    def close(self) -> None:
        """Shut both pools down (queued work is cancelled; running steps end on their timeouts)."""
        self.ssh_executor.shutdown(wait=False, cancel_futures=True)
        self.smb_executor.shutdown(wait=False, cancel_futures=True)


def _default_executor(workers: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)


def make_check_context(
    state_dir: Path,
    *,
    kb: KnowledgeBase | None,
    max_parallel_hosts: int,
    ssh_timeouts: SshTimeouts | None = None,
    smb_timeout_s: float = SMB_TIMEOUT_S,
    executor_factory: ExecutorFactory | None = None,
    no_kb_note: str | None = NO_KB_NOTE,
) -> CheckContext:
    """A :class:`CheckContext` for up to ``max_parallel_hosts`` hosts checked at once.

    Host-key pins live under ``state_dir``. ``executor_factory(workers, name)``
    builds the pools (tests give pools whose threads live in a lab namespace);
    by default plain thread pools, created lazily thread by thread.
    """
    if max_parallel_hosts < 1:
        raise ValueError("max_parallel_hosts must be at least 1")
    factory = executor_factory or _default_executor
    # One blocking step at a time per host and protocol (records are tried in turn).
    workers = max_parallel_hosts + EXECUTOR_SPARE_THREADS
    return CheckContext(
        ssh_executor=factory(workers, "vsa-ssh"),
        smb_executor=factory(workers, "vsa-smb"),
        pins=HostKeyPins(state_dir),
        kb=kb,
        ssh_timeouts=ssh_timeouts or SshTimeouts(),
        smb_timeout_s=smb_timeout_s,
        no_kb_note=no_kb_note,
    )


# ---- pure decisions -------------------------------------------------------------------


def applying_records(ip: str, records: Sequence[AuthRecord]) -> tuple[list[UnixRecord], list[WindowsRecord]]:
    """The unix and windows records whose ``targets`` include ``ip``, in the job's order."""
    unix = [r for r in records if isinstance(r, UnixRecord) and r.applies_to(ip)]
    windows = [r for r in records if isinstance(r, WindowsRecord) and r.applies_to(ip)]
    return unix, windows


def not_applicable_entries(ip: str, records: Sequence[AuthRecord]) -> list[AuthOutcome]:
    """One ``not_applicable`` entry per record type present in the job with no record for ``ip``."""
    present = {r.type for r in records}
    entries = []
    for kind in TYPE_ORDER:
        if kind in present and not any(r.type == kind and r.applies_to(ip) for r in records):
            entries.append(AuthOutcome(None, kind, "not_applicable", False,
                                       f"no {kind} authentication record applies to {ip}"))
    return entries


def port_not_open(result: HostResult, port: int, scanned_tcp_ports: Collection[int] | None) -> str | None:
    """Words when the port scan covered ``port`` and did not find it open, else None."""
    if scanned_tcp_ports is None or port not in scanned_tcp_ports:
        return None
    if any(p.proto == "tcp" and p.port == port for p in result.ports):
        return None
    return f"port {port}/tcp was not open in this scan (closed or filtered): not tried"


def best_unix(checks: Sequence[UnixCheck]) -> UnixCheck | None:
    """The check whose inventory the host keeps: privileged success first, then any success."""
    successes = [c for c in checks if c.auth.status == "success"]
    privileged = [c for c in successes if c.auth.privileged]
    chosen = privileged or successes
    return chosen[0] if chosen else None


# ---- the per-host step ----------------------------------------------------------------


async def run_host_checks(
    result: HostResult,
    records: Sequence[AuthRecord],
    ctx: CheckContext,
    *,
    job_type: JobType,
    authentication: bool,
    is_ec2: bool,
    scanned_tcp_ports: Collection[int] | None = None,
) -> None:
    """Run the authenticated checks and the knowledge-base match of one host into ``result``.

    See the module's docstring for the rules. Never raises for a host's problem
    (only cancellation propagates); a surprise in this code becomes a line of
    the host's ``errors`` and, if no entry was written yet, ``error`` entries.
    """
    if result.status != "scanned" or job_type != "vm_scan" or not authentication:
        return
    ip = result.target.ip
    try:
        unix, windows = applying_records(ip, records)
        unix_task = _run_unix(result, unix, ctx, is_ec2=is_ec2, scanned_tcp_ports=scanned_tcp_ports)
        windows_task = _run_windows(result, windows, ctx, scanned_tcp_ports=scanned_tcp_ports)
        unix_checks, windows_checks = await asyncio.gather(unix_task, windows_task)
        _apply_unix(result, unix_checks)
        for wcheck in windows_checks:
            _apply_windows(result, wcheck)
        complete_auth(result, records, "not tried")
    except asyncio.CancelledError:
        # The caller's host timeout (or a stop): the entries still say what happened.
        complete_auth(result, records, "stopped before this record's check finished "
                                       "(the host's time ran out or the scan was stopped)")
        raise
    except Exception as exc:  # noqa: BLE001 - one host's surprise must not end the job
        log.error("host checks of %s: unexpected failure: %s", ip, redact(repr(exc)))
        result.errors.append(f"internal error in the authenticated checks ({type(exc).__name__}); "
                             "see the journal")
        complete_auth(result, records, "not checked: internal error in the authenticated checks")
        return
    _match(result, ctx)


def complete_auth(result: HostResult, records: Sequence[AuthRecord], words: str) -> None:
    """Make ``result.auth`` whole per PROTOCOL.md, whatever was reached.

    Adds an ``error`` entry (with ``words``) for each applying record that has
    none yet, the ``not_applicable`` entries that are missing, and orders the
    entries unix first, then windows (the job's order within a type).
    """
    ip = result.target.ip
    unix, windows = applying_records(ip, records)
    have = {(a.record_id, a.type) for a in result.auth}
    applying: list[AuthRecord] = [*unix, *windows]
    for record in applying:
        if (record.id, record.type) not in have:
            result.auth.append(AuthOutcome(record.id, record.type, "error", False, words))
    for entry in not_applicable_entries(ip, records):
        if (None, entry.type) not in have:
            result.auth.append(entry)
    result.auth.sort(key=lambda a: TYPE_ORDER.index(a.type))  # stable: the job's order stays


async def _run_unix(result: HostResult, records: Sequence[UnixRecord], ctx: CheckContext, *,
                    is_ec2: bool, scanned_tcp_ports: Collection[int] | None) -> list[UnixCheck]:
    checks: list[UnixCheck] = []
    have_metadata = False
    for record in records:
        closed = port_not_open(result, record.port, scanned_tcp_ports)
        if closed is not None:
            checks.append(UnixCheck(ip=result.target.ip, port=record.port,
                                    auth=AuthOutcome(record.id, "unix", "error", False, closed)))
            continue
        check = await check_unix(result.target.ip, record, pins=ctx.pins, host_key=result.host_key,
                                 executor=ctx.ssh_executor, timeouts=ctx.ssh_timeouts,
                                 is_ec2=is_ec2 and not have_metadata)
        have_metadata = have_metadata or check.instance_metadata is not None
        checks.append(check)
    return checks


async def _run_windows(result: HostResult, records: Sequence[WindowsRecord], ctx: CheckContext, *,
                       scanned_tcp_ports: Collection[int] | None) -> list[WindowsCheck]:
    checks: list[WindowsCheck] = []
    for record in records:
        closed = port_not_open(result, ctx.smb_port, scanned_tcp_ports)
        if closed is not None:
            checks.append(WindowsCheck(ip=result.target.ip,
                                       auth=AuthOutcome(record.id, "windows", "error", False, closed)))
            continue
        checks.append(await check_windows(result.target.ip, record, executor=ctx.smb_executor,
                                          timeout_s=ctx.smb_timeout_s, port=ctx.smb_port))
    return checks


def _apply_unix(result: HostResult, checks: Sequence[UnixCheck]) -> None:
    for check in checks:
        result.auth.append(check.auth)
        for line in (f"ssh {check.ip}: {e}" for e in check.errors):
            if line not in result.errors:
                result.errors.append(line)
    best = best_unix(checks)
    if best is not None:
        if best.os is not None:
            result.os = best.os
        if best.packages is not None:
            result.packages = best.packages
    metadata = next((c.instance_metadata for c in checks if c.instance_metadata is not None), None)
    if metadata is not None:
        result.instance_metadata = metadata


def _apply_windows(result: HostResult, check: WindowsCheck) -> None:
    kept = result.os
    result.os = None  # let the check put its SMB-learnt OS, then decide which stays
    check.apply_to(result)
    if kept is not None and (kept.source in ("ssh", "smb") or result.os is None):
        result.os = kept  # SSH beats SMB beats a banner; the first SMB check beats later ones


def _match(result: HostResult, ctx: CheckContext) -> None:
    if result.packages is None:
        return
    if ctx.kb is None:
        if ctx.no_kb_note and ctx.no_kb_note not in result.errors:
            result.errors.append(ctx.no_kb_note)
        return
    try:
        found = ctx.kb.match(result.packages)
    except Exception as exc:  # noqa: BLE001 - a matching bug must not lose the host's inventory
        log.error("matching %s: unexpected failure: %s", result.target.ip, redact(repr(exc)))
        result.errors.append(f"vulnerability matching failed ({type(exc).__name__}); see the journal")
        return
    known = {(f.id, f.package) for f in result.findings}
    for finding in found:
        if (finding.id, finding.package) not in known:
            known.add((finding.id, finding.package))
            result.findings.append(finding)


# ---- preflight (vsa scan --check-auth) ------------------------------------------------


def windows_preflight(check: WindowsCheck, host_key: str) -> PreflightReport:
    """A :class:`PreflightReport` for a Windows check: connect, authenticate, admin, collectors.

    ``admin`` (whether the account reaches ``ADMIN$``) is informational: a
    non-administrator can still log in and read what SMB tells it.
    """
    status, message = check.auth.status, check.auth.message or ""
    reached = bool(check.dialects) or status in ("success", "failed")
    connect = Stage("connect", reached, f"SMB dialects {', '.join(check.dialects)}" if check.dialects
                    else ("SMB answered" if reached else message))
    if status == "success":
        authenticate = Stage("authenticate", True, message)
    elif reached:
        authenticate = Stage("authenticate", False, message)
    else:
        authenticate = Stage("authenticate", None, "not reached")
    if status != "success":
        admin = Stage("admin", None, "not reached")
        collectors = Stage("collectors", None, "not reached")
    else:
        admin = Stage("admin", True if check.auth.privileged else None,
                      "administrator (ADMIN$ reachable)" if check.auth.privileged
                      else "not an administrator: the registry may say less")
        learnt = []
        if check.os is not None:
            learnt.append(f"OS {check.os.name or '?'} {check.os.version or ''}".rstrip())
        if check.windows is not None:
            learnt.append("registry read")
        if check.updates is not None:
            learnt.append(f"{len(check.updates)} updates")
        detail = ", ".join(learnt) or "nothing learnt"
        if check.notes:
            detail += "; " + "; ".join(check.notes)
        collectors = Stage("collectors", check.os is not None, detail)
    return PreflightReport(ip=check.ip, host_key=host_key, record_id=check.auth.record_id or "?",
                           connect=connect, authenticate=authenticate, root=admin,
                           collectors=collectors, host_key_fingerprint=None)


async def preflight_host(result: HostResult, records: Sequence[AuthRecord],
                         ctx: CheckContext) -> list[PreflightReport]:
    """``vsa scan --check-auth`` for one host: a report per applying record, unix first.

    Each report says for connect, authenticate, root (admin on Windows) and the
    collectors whether it works and exactly why not. SSH host keys are pinned
    on first use, as a scan would.
    """
    ip = result.target.ip
    unix, windows = applying_records(ip, records)
    reports = [await preflight_unix(ip, record, pins=ctx.pins, host_key=result.host_key,
                                    executor=ctx.ssh_executor, timeouts=ctx.ssh_timeouts)
               for record in unix]
    for wrecord in windows:
        check = await check_windows(ip, wrecord, executor=ctx.smb_executor,
                                    timeout_s=ctx.smb_timeout_s, port=ctx.smb_port)
        reports.append(windows_preflight(check, result.host_key))
    return reports


__all__ = [
    "NO_KB_NOTE", "CheckContext", "applying_records", "best_unix", "complete_auth",
    "make_check_context", "not_applicable_entries", "port_not_open", "preflight_host",
    "run_host_checks", "windows_preflight",
]
