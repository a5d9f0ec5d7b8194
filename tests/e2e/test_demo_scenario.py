"""The demo's scenario end to end, every HostResult field checked against the lab's ground truth.

One module-scoped run (about 20 s): :func:`appliance.lab.fleet.build_fleet`
builds the lab (six target namespaces with sshd, Samba, a web server and a
host that drops everything; moto with the matching EC2 instances, a terminated
one, a t3.nano and one outside the tag selection; the IMDS emulator; the
reference platform; Mosquitto), ``vsa run`` boots as a real process in the
lab's hub namespace, and the demo's ``vm_scan`` by EC2 tags (an SSH and a
Windows record) runs to completion. Then every field of every HostResult the
platform received is compared with what the lab knows independently of the
appliance (moto's answers, the namespaces' listeners, this machine's dpkg,
os-release, sshd and Samba versions, the knowledge base the lab published).

Nothing leaves the namespaces the fixture built: the daemon, the platform,
moto, IMDS and the broker live in the hub; the targets in their own.
"""

from __future__ import annotations

import datetime as dt
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.demo import DemoError, Outcome, Scenario, accounting, results_table
from appliance.lab.fleet import (
    ExpectedHost,
    Fleet,
    build_fleet,
    fleet_available,
    installed_packages,
)
from appliance.scan import report
from tests.conftest import require

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TARGETED = ("app1", "app2", "legacy", "files", "web", "vault", "old-batch", "tiny")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@dataclass
class Run:
    fleet: Fleet
    outcome: Outcome
    hosts: dict[str, dict[str, Any]]  # by lab name: the HostResult JSON the platform holds
    daemon_exit: int | None
    journal: str
    state_files: list[tuple[Path, bytes]]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    reason = fleet_available()
    require(reason is None, reason or "")
    with tempfile.TemporaryDirectory(prefix="vsa-e2e-demo-") as tmp, build_fleet(Path(tmp)) as fleet:
        scenario = Scenario(fleet, narrate=lambda _m: None)
        try:
            appliance_id = scenario.boot()
            outcome = scenario.run_job(appliance_id)
        except DemoError as exc:
            scenario.stop()
            console = "\n".join(scenario.console)
            journal = fleet.daemon_log.read_text(errors="replace")[-4000:]
            pytest.fail(f"{exc}\nconsole:\n{console}\njournal (end):\n{journal}")
        finally:
            code = scenario.stop()
        by_key = outcome.report["hosts"]
        hosts = {h.name: by_key[h.host_key] for h in fleet.hosts.values() if h.host_key in by_key}
        state_dir = fleet.workdir / "state"
        state_files = [(p, p.read_bytes()) for p in sorted(state_dir.rglob("*")) if p.is_file()]
        yield Run(fleet, outcome, hosts, code, fleet.daemon_log.read_text(errors="replace"), state_files)


def expected(run: Run, name: str) -> ExpectedHost:
    return run.fleet.hosts[name]


# ---- the job as a whole ------------------------------------------------------------------------


def test_job_finished_with_every_targeted_host_once(run: Run) -> None:
    assert accounting(run.fleet, run.outcome) == []
    report_ = run.outcome.report
    assert report_["state"] == "completed"
    completion = report_["completion"]
    assert (completion["status"], completion["reason"]) == ("finished", None)
    targeted = [h for h in run.fleet.hosts.values() if h.targeted]
    assert sorted(h.name for h in targeted) == sorted(TARGETED)
    assert sorted(completion["host_keys"]) == sorted(h.host_key for h in targeted)
    assert sorted(report_["hosts"]) == sorted(h.host_key for h in targeted)
    assert set(report_["host_puts"].values()) == {1}  # each result reached the platform exactly once
    findings = sum(len(h.findings) for h in targeted)
    assert completion["summary"] == {"hosts_targeted": 8, "hosts_alive": 5, "hosts_excluded": 2,
                                     "hosts_scanned": 5, "findings": findings}
    assert completion["message"] == f"8 hosts targeted, 5 alive, 2 excluded, {findings} findings"


def test_instance_outside_the_tag_selection_gets_no_result(run: Run) -> None:
    outside = expected(run, "sandbox")
    assert not outside.targeted
    assert outside.host_key not in run.outcome.report["hosts"]
    assert all(h["target"]["ip"] != outside.ip for h in run.outcome.report["hosts"].values())


def test_daemon_console_tells_the_story_and_stops_cleanly(run: Run) -> None:
    console = "\n".join(run.outcome.console)
    job = run.outcome.job_id
    assert all(line.startswith("vsa: ") for line in run.outcome.console if line.strip())
    for pattern in ("IMDSv2 in use", r"registered with the platform: appliance ID vsa-",
                    rf"signatures {re.escape(run.fleet.kb_version)} installed",
                    r"MQTT broker 127\.0\.0\.1:\d+: connected",
                    rf"job accepted: {job} \(vm_scan",
                    rf"job {job} finished: 8 hosts targeted, 5 alive, 2 excluded"):
        assert re.search(pattern, console), (pattern, console)
    assert run.daemon_exit == 0


def test_progress_reached_the_platform(run: Run) -> None:
    phases = [name for name, _ in run.outcome.timeline]
    assert phases[0] == "accept"
    assert {"phase:resolving", "phase:scanning", "phase:uploading", "first_result", "last_result",
            "complete"} <= set(phases)
    assert phases[-1] == "complete"
    progress = run.outcome.report["progress"]
    assert (progress["hosts_total"], progress["hosts_done"]) == (8, 8)


def test_no_secret_anywhere(run: Run) -> None:
    unix, windows = run.fleet.auth_records
    key_body = unix["private_keys"][0]["pem"].splitlines()[1]
    secrets_ = {"perscode": run.fleet.perscode, "smb password": windows["password"], "private key": key_body}
    console = "\n".join(run.outcome.console)
    for what, secret in secrets_.items():
        assert secret not in console, what
        assert secret not in run.journal, what
        for path, data in run.state_files:
            assert secret.encode() not in data, (what, path)


def test_report_renders_every_host(run: Run) -> None:
    table = results_table(run.outcome.results)
    for name in TARGETED:
        assert re.search(rf"^{re.escape(name)}\s", table, re.M), table
    page = report.render_html(run.outcome.results)
    assert page.startswith("<!DOCTYPE html>") and all(h.host_key in page for h in run.fleet.targeted())


# ---- every field of every HostResult -----------------------------------------------------------


@pytest.mark.parametrize("name", TARGETED)
def test_host_key_and_target(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    assert got["host_key"] == exp.instance_id
    assert got["target"] == exp.target


@pytest.mark.parametrize("name", TARGETED)
def test_status_and_reason(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    assert (got["status"], got["reason"]) == (exp.status, exp.reason)


@pytest.mark.parametrize("name", TARGETED)
def test_times(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    if exp.status == "excluded":  # never scanned: no scan times
        assert (got["started_at"], got["finished_at"]) == (None, None)
        return
    assert RFC3339.match(got["started_at"]) and RFC3339.match(got["finished_at"])
    started, finished = (dt.datetime.fromisoformat(got[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at"))
    accepted = dt.datetime.fromisoformat(run.outcome.report["accepted_at"].replace("Z", "+00:00"))
    completed = dt.datetime.fromisoformat(run.outcome.report["completed_at"].replace("Z", "+00:00"))
    second = dt.timedelta(seconds=1)  # RFC 3339 times here have whole seconds
    assert accepted - second <= started <= finished <= completed + second


@pytest.mark.parametrize("name", TARGETED)
def test_ports(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    assert [p["port"] for p in got["ports"]] == list(exp.tcp_ports)
    for port, want in zip(got["ports"], exp.ports, strict=True):
        assert (port["proto"], port["state"]) == ("tcp", "open")
        assert (port["service"], port["product"], port["version"]) == (want.service, want.product, want.version)
        if want.banner_contains:
            assert all(part in (port["banner"] or "") for part in want.banner_contains), port
        else:
            assert port["banner"] == want.banner


@pytest.mark.parametrize("name", TARGETED)
def test_os(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    assert got["os"] == exp.os


@pytest.mark.parametrize("name", TARGETED)
def test_auth(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    assert [(a["record_id"], a["type"], a["status"], a["privileged"]) for a in got["auth"]] == [
        (a.record_id, a.type, a.status, a.privileged) for a in exp.auth]
    for entry in got["auth"]:
        assert entry["message"], entry  # every outcome says why, in words
        if entry["status"] == "not_applicable":
            assert exp.ip in entry["message"]
    windows = run.fleet.auth_records[1]
    if exp.role == "smb":
        assert windows["username"] in got["auth"][1]["message"]
        assert windows["password"] not in str(got["auth"])


@pytest.mark.parametrize("name", TARGETED)
def test_packages(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    if exp.package_count is None:
        assert got["packages"] is None
        return
    packages = got["packages"]
    assert (packages["manager"], packages["ecosystem"]) == (exp.packages_manager, exp.packages_ecosystem)
    assert len(packages["items"]) == exp.package_count
    local = {(p.name, p.version, p.source_name, p.source_version) for p in installed_packages()}
    assert {(i["name"], i["version"], i["source_name"], i["source_version"]) for i in packages["items"]} == local
    assert all(i["arch"] for i in packages["items"])


@pytest.mark.parametrize("name", TARGETED)
def test_findings(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    assert sorted((f["id"], f["source"], f["severity"], f["package"], f["source_package"], f["installed"],
                   f["fixed"], f["detection"]) for f in got["findings"]) == sorted(
        (f.id, f.source, f.severity, f.package, f.source_package, f.installed, f.fixed, f.detection)
        for f in exp.findings)
    titles = {r["id"]: r["summary"] for r in run.fleet.kb_records}
    for finding in got["findings"]:
        if finding["source"] == "osv":
            assert finding["title"] == titles[finding["id"]]
            assert "evidence" not in finding
        else:
            assert finding["title"] and finding["evidence"]
    # Records that must match nothing did not; the Ubuntu record only where os-release says Ubuntu.
    ids = {f["id"] for f in got["findings"]}
    assert not ids & {"VSA-DEMO-2026-0101", "VSA-DEMO-2026-0102"}
    assert ("VSA-DEMO-2026-0103" in ids) == (exp.packages_ecosystem == "Ubuntu:22.04:LTS")


@pytest.mark.parametrize("name", TARGETED)
def test_instance_metadata(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    assert got["instance_metadata"] == exp.instance_metadata


@pytest.mark.parametrize("name", TARGETED)
def test_errors(run: Run, name: str) -> None:
    exp, got = expected(run, name), run.hosts[name]
    if exp.errors_prefix is None:
        assert got["errors"] == []
        return
    assert got["errors"] and all(e.startswith(exp.errors_prefix) for e in got["errors"])
    for part in exp.errors_include:
        assert any(part in e for e in got["errors"]), (part, got["errors"])


def test_every_field_is_checked(run: Run) -> None:
    """A HostResult field added to the protocol must get a check here too."""
    checked = {"host_key", "target", "status", "reason", "started_at", "finished_at", "ports", "os", "auth",
               "packages", "findings", "instance_metadata", "errors"}
    for got in run.hosts.values():
        assert set(got) == checked
