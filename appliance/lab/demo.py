"""The one-command demo on the embedded lab (the README's first command, ``scripts/demo``).

It builds the demo fleet (:mod:`appliance.lab.fleet`: six target namespaces
with sshd, Samba, a web server and a host that drops everything; moto with
matching EC2 instances, a terminated one and a t3.nano; the IMDS emulator; the
reference platform; Mosquitto), boots the daemon (``vsa run``) as a real
process inside the lab's hub namespace, submits a ``vm_scan`` by EC2 tags with
an SSH and a Windows record, shows progress, prints a results table and writes
an HTML report, then tears the lab down, even on failure or Ctrl-C.

Exit status 0 only when the job completed and every targeted host was
accounted for (one result per host, the set the lab's ground truth expects).

:class:`Scenario` runs the daemon and the job for the demo, the end-to-end
test and ``bench/job`` alike.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.lab.fleet import ExpectedHost, Fleet, build_fleet, fleet_available
from appliance.lab.netns import LabError
from appliance.lab.platform.errors import LabPlatformError
from appliance.results import (
    AuthOutcome,
    Finding,
    HostResult,
    OsInfo,
    Package,
    Packages,
    Port,
    Target,
)
from appliance.scan import report

REGISTER_TIMEOUT_S = 60.0
ACCEPT_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 200.0  # a demo job takes about 7 s; below pytest-timeout (300 s) with boot
PROGRESS_STEP_S = 0.5
RSS_SAMPLE_S = 0.2
DEFAULT_REPORT = Path("out/demo-report.html")
KEEP_LOGS_ENV = "VSA_DEMO_KEEP_LOGS"  # a folder: the daemon's journal and the lab's logs are copied there


def say(message: str) -> None:
    """The demo's own narration (distinct from the appliance's ``vsa:`` lines)."""
    print(f"demo: {message}", flush=True)


class DemoError(RuntimeError):
    """The scenario could not go on (the message says where it stopped)."""


# ---- wire → typed results (for the report renderers) ----------------------------------------


def host_result_from_wire(obj: dict[str, Any]) -> HostResult:
    """A :class:`HostResult` from its PROTOCOL.md JSON (as the platform stored it)."""
    t = obj.get("target") or {}
    facts: dict[str, Any] = {k: t.get(k) for k in ("ip", "hostname", "instance_id", "region", "vpc_id", "subnet_id",
                                                   "instance_type", "image_id", "state", "private_dns",
                                                   "public_dns", "public_ip")}
    target = Target(**facts, tags=dict(t.get("tags") or {}))
    pk = obj.get("packages")
    packages = None
    if pk:
        packages = Packages(pk["manager"], pk["ecosystem"], tuple(Package(**p) for p in pk.get("items", [])))
    return HostResult(
        target=target, status=obj["status"], reason=obj.get("reason"),
        started_at=obj.get("started_at"), finished_at=obj.get("finished_at"),
        ports=[Port(**p) for p in obj.get("ports", [])],
        os=OsInfo(**obj["os"]) if obj.get("os") else None,
        auth=[AuthOutcome(**a) for a in obj.get("auth", [])],
        packages=packages,
        findings=[Finding(**f) for f in obj.get("findings", [])],
        instance_metadata=obj.get("instance_metadata"),
        errors=list(obj.get("errors", [])),
    )


# ---- the results table ---------------------------------------------------------------------------

SEVERITY_NAMES = {5: "crit", 4: "high", 3: "med", 2: "low", 1: "info"}


def _auth_text(result: HostResult) -> str:
    parts = [f"{a.type}:{a.status}{'(root)' if a.privileged else ''}" for a in result.auth
             if a.status != "not_applicable"]
    return " ".join(parts) or "-"


def _findings_text(findings: list[Finding]) -> str:
    counts: dict[int, int] = {}
    for f in findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    return " ".join(f"{SEVERITY_NAMES.get(s, s)}:{n}" for s, n in sorted(counts.items(), reverse=True)) or "-"


def results_table(results: list[HostResult]) -> str:
    """One row per host: name, address, instance, status, open ports, auth, OS, packages, findings by severity."""
    header = ("host", "address", "instance", "status", "open ports", "auth", "os", "pkgs", "findings")
    rows = [header]
    for r in results:
        os_text = " ".join(x for x in ((r.os.name, r.os.version) if r.os else ()) if x) or "-"
        rows.append((
            r.target.tags.get("Name", "-"), r.target.ip, r.target.instance_id or "-",
            f"{r.status} ({r.reason})" if r.reason else r.status,
            ",".join(str(p.port) for p in r.ports) or "-", _auth_text(r), os_text,
            str(len(r.packages.items)) if r.packages else "-", _findings_text(r.findings),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n" + report.summary_line(results) + "\n"


# ---- the scenario ------------------------------------------------------------------------------


@dataclass
class RssSampler:
    """Samples the resident memory of a process and its descendants until stopped."""

    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, main kB, tree kB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        """Sample every :data:`RSS_SAMPLE_S` in a background thread."""
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            main, tree = process_tree_rss_kb(self.pid)
            if main:
                self.samples.append((time.monotonic(), main, tree))
            self._stop.wait(RSS_SAMPLE_S)

    def peak(self, since: float = 0.0) -> tuple[int, int]:
        """Peak (main, tree) RSS in kB of the samples taken after ``since``."""
        chosen = [s for s in self.samples if s[0] >= since] or self.samples
        return (max((s[1] for s in chosen), default=0), max((s[2] for s in chosen), default=0))


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def process_tree_rss_kb(pid: int) -> tuple[int, int]:
    """RSS (kB) of ``pid`` and of ``pid`` with all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _rss_kb(p)
        stack.extend(children.get(p, []))
    return _rss_kb(pid), total


@dataclass
class Outcome:
    """What a scenario run produced: the platform's report, the phases' wall times, the console."""

    job_id: str
    report: dict[str, Any]
    results: list[HostResult]
    phases_s: dict[str, float]
    console: list[str]
    appliance_id: str | None
    timeline: list[tuple[str, float]] = field(default_factory=list)


def timeline(fleet: Fleet, job_id: str, submitted_epoch: float) -> list[tuple[str, float]]:
    """The job's events as the platform recorded them, in seconds after the submission.

    ``accept``, each progress phase as first reported (``phase:discovery`` ...),
    the first and last host result (``first_result``, ``last_result``) and the
    accepted completion (``complete``). Progress bodies and request times come
    from the platform's own request log (its SQLite file, read-only).
    """
    platform = fleet.platform
    base = f"/vsa/v1/jobs/{job_id}"
    events: list[tuple[str, float]] = []
    accepts = platform.requests(path=f"{base}/accept", status=200)
    if accepts:
        events.append(("accept", accepts[0]["at_s"]))
    posts = [r for r in platform.requests(path=f"{base}/progress") if 200 <= r["status"] < 300]
    with contextlib.closing(sqlite3.connect(f"file:{platform.data_dir / 'platform.db'}?mode=ro", uri=True,
                                            timeout=10)) as db:
        phases = [row[0] for row in db.execute("SELECT phase FROM progress WHERE job_id = ? ORDER BY id", (job_id,))]
    seen: set[str] = set()
    for request, phase in zip(posts, phases, strict=False):  # one progress row per accepted POST, in order
        if phase not in seen:
            seen.add(phase)
            events.append((f"phase:{phase}", request["at_s"]))
    puts = [r for r in platform.requests(path_re=rf"^{re.escape(base)}/hosts/") if 200 <= r["status"] < 300]
    if puts:
        events += [("first_result", puts[0]["at_s"]), ("last_result", puts[-1]["at_s"])]
    completes = platform.requests(path=f"{base}/complete", status=200)
    if completes:
        events.append(("complete", completes[-1]["at_s"]))
    return sorted(((name, round(at - submitted_epoch, 3)) for name, at in events), key=lambda e: e[1])


def phase_durations(events: list[tuple[str, float]]) -> dict[str, float]:
    """Seconds per phase from a job's :func:`timeline`: ``pickup``, each progress phase, ``total``.

    A phase lasts from its first progress report to the next phase's (the
    last one to the accepted completion).
    """
    at = dict(events)
    out = {"pickup": at.get("accept", float("nan")), "total": at.get("complete", float("nan"))}
    marks = [(name.split(":", 1)[1], t) for name, t in events if name.startswith("phase:")]
    marks.append(("end", at.get("complete", float("nan"))))
    for (name, start), (_next, end) in zip(marks, marks[1:], strict=False):
        out[name] = round(end - start, 3)
    return out


class Scenario:
    """Boots the daemon in the fleet's hub, submits the demo job and follows it on the platform."""

    def __init__(self, fleet: Fleet, *, narrate: Callable[[str], None] = say,
                 echo: Callable[[str], None] | None = None) -> None:
        self.fleet = fleet
        self.narrate = narrate
        self.echo = echo
        self.console: list[str] = []
        self._reader: threading.Thread | None = None
        self.marks: dict[str, float] = {}
        self.sampler: RssSampler | None = None

    # -- the daemon -------------------------------------------------------------------------------

    def boot(self) -> str:
        """Start ``vsa run`` in the hub; wait until it registered and polled; return the appliance ID."""
        self.marks["boot"] = time.monotonic()
        stderr = open(self.fleet.daemon_log, "ab")  # noqa: SIM115 - handed to the child
        proc = self.fleet.start_daemon(stdout=subprocess.PIPE, stderr=stderr)
        stderr.close()
        self.sampler = RssSampler(proc.pid).start()
        self._reader = threading.Thread(target=self._read, args=(proc,), name="daemon-console", daemon=True)
        self._reader.start()
        self.narrate(f"the appliance runs as a real process (PID {proc.pid}) in the hub namespace; "
                     "its console lines follow, indented")
        appliance_id = self._wait(lambda: self._appliance_id(), REGISTER_TIMEOUT_S, "the appliance to register")
        self.marks["registered"] = time.monotonic()
        self._wait(lambda: self.fleet.platform.count_requests(path="/vsa/v1/poll", status=200) > 0,
                   REGISTER_TIMEOUT_S, "the first poll")
        self.marks["first_poll"] = time.monotonic()
        return str(appliance_id)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.console.append(line)
            if self.echo is not None:
                self.echo(line)

    def _appliance_id(self) -> str | None:
        appliances = self.fleet.platform.list_appliances()
        return str(appliances[0]["appliance_id"]) if appliances else None

    def _wait(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            daemon = self.fleet.daemon
            if daemon is not None and daemon.poll() is not None:
                raise DemoError(f"the appliance exited ({daemon.returncode}) while waiting for {what}")
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(0.1)

    # -- the job ----------------------------------------------------------------------------------

    def wait_signatures(self, timeout_s: float = 60.0) -> None:
        """Wait until the appliance installed the lab's knowledge base (``vsa status``)."""
        def installed() -> bool:
            status = self.fleet.vsa_status() or {}
            return self.fleet.kb_version in str(status.get("signatures") or status.get("signatures_version") or "")
        self._wait(installed, timeout_s, f"the knowledge base {self.fleet.kb_version} to be installed")
        self.marks["signatures"] = time.monotonic()

    def run_job(self, appliance_id: str, *, on_progress: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
        """Submit the demo job, wake the appliance, follow it to completion; the platform's view."""
        platform = self.fleet.platform
        job_id = platform.submit_job(self.fleet.job_spec())
        self.marks["submitted"] = time.monotonic()
        self.submitted_epoch = time.time()
        woken = self.fleet.wake(appliance_id)
        self.narrate(f"job {job_id} submitted ({'the appliance was woken over MQTT' if woken else 'it is picked up at the next poll'})")
        phases: dict[str, float] = {}
        last: tuple[Any, ...] | None = None
        deadline = time.monotonic() + JOB_TIMEOUT_S
        not_accepted_seen = 0
        while True:
            rep = platform.results(job_id)
            progress = rep.get("progress") or {}
            phase = rep["state"]
            if phase == "accepted" and progress.get("phase"):
                phase = progress["phase"]
            if phase not in phases:
                phases[phase] = time.monotonic()
            key = (rep["state"], progress.get("phase"), progress.get("hosts_done"), progress.get("hosts_total"),
                   len(rep["hosts"]))
            if key != last:
                last = key
                if on_progress is not None:
                    on_progress(rep)
            if rep["state"] in ("completed", "canceled"):
                break
            daemon = self.fleet.daemon
            if daemon is not None and daemon.poll() is not None:
                raise DemoError(f"the appliance exited ({daemon.returncode}) during job {job_id}")
            stopped = [line for line in self.console
                       if f"job {job_id} stopped" in line or f"job {job_id} paused" in line]
            if stopped:
                raise DemoError(f"the appliance stopped job {job_id}: {stopped[0]}")
            refused = sum(1 for line in self.console if f"job {job_id} not accepted" in line)
            if rep["state"] == "queued" and refused > not_accepted_seen:
                not_accepted_seen = refused
                if refused >= 3:
                    raise DemoError(f"the appliance does not accept job {job_id}: "
                                    + next(line for line in reversed(self.console) if job_id in line))
            if time.monotonic() > deadline:
                raise DemoError(f"job {job_id} did not complete within {JOB_TIMEOUT_S:g} s (state {rep['state']}, "
                                f"progress {progress or 'none'})")
            time.sleep(PROGRESS_STEP_S)
        self.marks["completed"] = time.monotonic()
        results = [host_result_from_wire(h) for h in rep["hosts"].values()]
        results.sort(key=lambda r: tuple(int(x) for x in r.target.ip.split(".")) if r.target.ip.count(".") == 3
                     else (999,))
        start = self.marks["submitted"]
        phases_s = {name: round(t - start, 3) for name, t in sorted(phases.items(), key=lambda kv: kv[1])}
        return Outcome(job_id, rep, results, phases_s, self.console, appliance_id,
                       timeline(self.fleet, job_id, self.submitted_epoch))

    def stop(self) -> int | None:
        """Stop the daemon (SIGTERM) and the sampler; the daemon's exit status."""
        code = self.fleet.stop_daemon()
        if self.sampler is not None:
            self.sampler.stop()
        if self._reader is not None:
            self._reader.join(5)
        return code


# ---- accounting against the ground truth -------------------------------------------------------------


def accounting(fleet: Fleet, outcome: Outcome) -> list[str]:
    """Problems with the job's accounting: completion, one result per targeted host, statuses."""
    problems = []
    completion = outcome.report.get("completion") or {}
    if outcome.report["state"] != "completed":
        problems.append(f"the job is {outcome.report['state']}, not completed")
    elif completion.get("status") != "finished":
        problems.append(f"the job completed {completion.get('status')} ({completion.get('reason')}): "
                        f"{completion.get('message')}")
    expected: dict[str, ExpectedHost] = {h.host_key: h for h in fleet.targeted()}
    got = {r.host_key: r for r in outcome.results}
    for key in sorted(set(expected) - set(got)):
        problems.append(f"no result for {expected[key].name} ({key})")
    for key in sorted(set(got) - set(expected)):
        problems.append(f"a result for a host outside the selection: {key}")
    for key in sorted(set(got) & set(expected)):
        exp, res = expected[key], got[key]
        if (res.status, res.reason) != (exp.status, exp.reason):
            problems.append(f"{exp.name}: {res.status}/{res.reason}, expected {exp.status}/{exp.reason}")
    puts = outcome.report.get("host_puts") or {}
    problems += [f"{k}: sent {n} times" for k, n in sorted(puts.items()) if n != 1]
    return problems


def ground_truth_differences(fleet: Fleet, outcome: Outcome) -> list[str]:
    """Where the results differ from the lab's ground truth (a summary; the e2e test checks every field)."""
    got = {r.host_key: r for r in outcome.results}
    differences = []
    for exp in fleet.targeted():
        r = got.get(exp.host_key)
        if r is None:
            continue  # accounting() reports it
        facts = {
            "open ports": ([p.port for p in r.ports], list(exp.tcp_ports)),
            "auth": ([(a.record_id, a.type, a.status, a.privileged) for a in r.auth],
                     [(a.record_id, a.type, a.status, a.privileged) for a in exp.auth]),
            "OS": ((r.os.name, r.os.version, r.os.source) if r.os else None,
                   (exp.os["name"], exp.os["version"], exp.os["source"]) if exp.os else None),
            "packages": (len(r.packages.items) if r.packages else None, exp.package_count),
            "findings": (sorted((f.id, f.package or "") for f in r.findings),
                         sorted((f.id, f.package or "") for f in exp.findings)),
            "instance metadata": (r.instance_metadata, exp.instance_metadata),
        }
        differences += [f"{exp.name}: {what} {mine!r}, expected {theirs!r}"
                        for what, (mine, theirs) in facts.items() if mine != theirs]
    return differences


# ---- the demo ---------------------------------------------------------------------------------------


def run_demo(workdir: Path, report_path: Path) -> int:
    """Build the lab, run the scenario, print and write the results, tear down; the exit status."""
    reason = fleet_available()
    if reason:
        say(f"cannot build the lab on this machine: {reason}")
        return 1
    started = time.monotonic()
    ok = False
    say("building the lab: network namespaces, moto, the reference platform, IMDS, Mosquitto, the targets")
    try:
        with build_fleet(workdir, say=say) as fleet:
            say(f"the lab is ready ({time.monotonic() - started:.1f} s)")
            scenario = Scenario(fleet, echo=lambda line: print(f"    {line}", flush=True))
            try:
                appliance_id = scenario.boot()
                say(f"the appliance registered as {appliance_id} with the platform and polls every "
                    f"{fleet.platform.poll_interval()} s")
                total = len(fleet.targeted())

                def progress(rep: dict[str, Any]) -> None:
                    p = rep.get("progress") or {}
                    if rep["state"] != "accepted" or not p:
                        say(f"progress: job {rep['state']}; {len(rep['hosts'])}/{total} results at the platform")
                        return
                    say(f"progress: the appliance reports {p['phase']} ({p['hosts_done']}/{p['hosts_total']} hosts "
                        f"done); {len(rep['hosts'])}/{total} results at the platform")

                outcome = scenario.run_job(appliance_id, on_progress=progress)
            finally:
                code = scenario.stop()
                say(f"the appliance stopped (exit status {code})")
            completion = outcome.report.get("completion") or {}
            say(f"job {outcome.job_id} {completion.get('status')}: {completion.get('message')}")
            durations = phase_durations(outcome.timeline)
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in durations.items() if k not in ("pickup", "total"))
            say(f"the job took {durations['total']:.1f} s from submission to completion: accepted after "
                f"{durations['pickup']:.1f} s, then {steps} (as the platform saw it)")
            print()
            print(results_table(outcome.results), end="", flush=True)
            print()
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(report.render_html(outcome.results))
            say(f"HTML report written to {report_path}")
            differences = ground_truth_differences(fleet, outcome)
            for difference in differences:
                say(f"differs from the lab's ground truth: {difference}")
            if not differences:
                say("every host matches the lab's ground truth: status, open ports, auth, OS, packages, "
                    "findings, instance metadata")
            problems = accounting(fleet, outcome)
            for problem in problems:
                say(f"NOT as expected: {problem}")
            ok = not problems
            if ok:
                say(f"every one of the {len(fleet.targeted())} targeted hosts is accounted for, each sent once; "
                    "the instance outside the tag selection got no result")
    except DemoError as exc:
        say(f"stopped: {exc}")
    except LabError as exc:
        say(f"the lab failed: {exc}")
    except LabPlatformError as exc:
        say(f"the reference platform failed: {exc}")
    except KeyboardInterrupt:
        say("interrupted")
    keep = os.environ.get(KEEP_LOGS_ENV)
    if keep:
        _keep_logs(workdir, Path(keep))
    say(f"lab torn down ({time.monotonic() - started:.1f} s in all)")
    return 0 if ok else 1


def _keep_logs(workdir: Path, dest: Path) -> None:
    """Copy the daemon's journal and the services' logs (debugging aid; no secrets are in them)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("daemon.log", "platform.log", "broker/mosquitto.log"):
        source = workdir / name
        if source.exists():
            (dest / source.name).write_bytes(source.read_bytes())
    say(f"logs copied to {dest}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m appliance.lab.demo`` (``scripts/demo``)."""
    parser = argparse.ArgumentParser(prog="scripts/demo", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT,
                        help=f"where to write the HTML report (default {DEFAULT_REPORT})")
    args = parser.parse_args(argv)

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # the same clean tear-down as Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C tears down even if started with SIGINT ignored
    with tempfile.TemporaryDirectory(prefix="vsa-demo-") as tmp:
        with contextlib.suppress(KeyboardInterrupt):
            return run_demo(Path(tmp), args.report.resolve())
    return 1


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
