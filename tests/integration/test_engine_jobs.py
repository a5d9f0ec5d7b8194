"""The job engine end to end: `vsa run` as a real process, inside a namespace lab, against the reference platform.

Everything runs in the lab's hub namespace: the reference platform (a child
process on the hub's 127.0.0.1), the daemon (``vsa run`` with IMDS disabled
and ``--user-data``), and so every probe the daemon sends stays on the lab
bridge. The test process drives the platform through its SQLite store (the
admin :class:`Platform` handle): submit jobs, inject faults, read the request
log and the results.

"Mid-job" is made deterministic with slow jobs: many silent addresses scanned
two at a time (each batch waits for discovery to give up on them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.netns import Host, NetnsLab, lab_available
from appliance.lab.platform.admin import Platform
from appliance.lab.portlab import PortLab, build_port_lab
from appliance.scan.sender import SEND_CONCURRENCY
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
VSA = REPO / ".venv" / "bin" / "vsa"
SILENT_BASE = 100  # 10.77.0.100.. : addresses with no host (discovery gives up on them)
LAB_NAME = "web.lab.test"  # in the hub's /etc/hosts, with two addresses


def vsa_argv() -> list[str]:
    """The venv's `vsa` (else the CLI by module)."""
    return [str(VSA)] if VSA.exists() else [sys.executable, "-m", "appliance.cli"]


@pytest.fixture(scope="module")
def port_lab() -> Iterator[PortLab]:
    """Three answering hosts, one that drops everything, one empty address; shared by the module."""
    reason = lab_available()
    require(reason is None, reason or "")
    with NetnsLab() as lab:
        portlab = build_port_lab(lab, answering=3, ports_per_host=3, dropping=True, empty=True)
        # Names for the hub (the daemon's namespace): one with two addresses; no DNS server answers there.
        hub = Host(name="hub", netns=lab.hub, ip=lab.scanner_ip)
        first, second = portlab.answering_ips[:2]
        lab.write_etc(hub, "hosts", f"127.0.0.1 localhost\n{first} {LAB_NAME}\n{second} {LAB_NAME}\n")
        lab.write_etc(hub, "resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        yield portlab


PLATFORM_OUTAGE_S = 60


class EngineLab:
    """The reference platform and the daemon, both in the hub namespace of ``port_lab``."""

    def __init__(self, tmp: Path, portlab: PortLab) -> None:
        self.tmp = tmp
        self.portlab = portlab
        self.lab = portlab.lab
        self.platform_dir = tmp / "platform"
        self.state_dir = tmp / "state"
        self.stdout_path = tmp / "daemon.stdout"
        self.stderr_path = tmp / "daemon.stderr"
        self.platform_proc: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.aws_endpoint = "http://127.0.0.1:9"  # nothing listens there: STS/EC2 unreachable
        self._run_offset = 0
        Platform.init(self.platform_dir, poll_interval_s=2).close()
        self.platform = Platform(self.platform_dir)
        self.perscode = self.platform.create_perscode()

    # --- the platform process ---

    def start_platform(self) -> None:
        """Serve in the hub on 127.0.0.1 (the same port again after a restart)."""
        port_file = self.tmp / "platform.port"
        port_file.unlink(missing_ok=True)
        self.platform_proc = self.lab.popen(self.lab.hub, [
            sys.executable, "-m", "appliance.lab.platform", "serve", "--data-dir", str(self.platform_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--port-file", str(port_file)],
            stdout=open(self.tmp / "platform.log", "ab"), stderr=subprocess.STDOUT, cwd=REPO)  # noqa: SIM115
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert self.platform_proc.poll() is None, (self.tmp / "platform.log").read_text()
            assert time.monotonic() < deadline, "the platform did not start"
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def stop_platform(self) -> None:
        """Stop the platform process (it becomes unreachable)."""
        if self.platform_proc is not None and self.platform_proc.poll() is None:
            self.platform_proc.send_signal(signal.SIGTERM)
            self.platform_proc.wait(20)
        self.platform_proc = None

    # --- the daemon ---

    def start_daemon(self, **env: str) -> None:
        """``vsa run`` in the hub with test timings; stdout/stderr appended across runs."""
        config = self.tmp / "appliance.toml"
        config.write_text("\n".join([
            "[platform]", f'url = "https://127.0.0.1:{self.port}"', f'ca_file = "{self.platform.ca_file}"',
            "[state]", f'dir = "{self.state_dir}"',
            "[imds]", "disabled = true",
            "[aws]", f'sts_endpoint = "{self.aws_endpoint}"', f'ec2_endpoint = "{self.aws_endpoint}"',
            "[signatures]", f'public_key = "{self.platform.signing_public_key()}"',
        ]) + "\n")
        user_data = self.tmp / "user-data"
        user_data.write_text(f"PERSCODE={self.perscode}\n")
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("VSA_", "AWS_", "NOTIFY_SOCKET", "WATCHDOG_", "HTTP_PROXY", "HTTPS_PROXY",
                                        "http_proxy", "https_proxy"))}
        environ.update({"VSA_POLL_INTERVAL_FLOOR_S": "1", "VSA_WAIT_CAP_S": "2", "PYTHONUNBUFFERED": "1",
                        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "lab-secret-key",
                        **env})
        self._run_offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        self.daemon = self.lab.popen(
            self.lab.hub, [*vsa_argv(), "run", "--config", str(config), "--user-data", str(user_data)],
            stdout=open(self.stdout_path, "ab"), stderr=open(self.stderr_path, "ab"),  # noqa: SIM115
            env=environ, cwd=self.tmp)

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        """Stop the daemon with ``sig`` and wait for it."""
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        self.daemon = None

    def close(self) -> None:
        """Stop both processes and the admin handle."""
        self.kill_daemon(signal.SIGTERM)
        self.stop_platform()
        self.platform.close()

    def console(self) -> str:
        """The daemon's standard output, every run."""
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def diagnostics(self) -> str:
        """Console and the tail of the journal, for assertion messages."""
        journal = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"console:\n{self.console()}\njournal (tail):\n{journal[-4000:]}"

    def wait_for(self, predicate: Any, timeout_s: float, what: str) -> Any:
        """Wait until ``predicate()`` is truthy; fail with the daemon's words otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.daemon.returncode}) before {what}\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.1)

    # --- the platform's view ---

    def job_state(self, job_id: str) -> str:
        """The platform's state of the job (queued, accepted, completed, canceled)."""
        return str(self.platform.results(job_id)["state"])

    def wait_completed(self, job_id: str, timeout_s: float = 90) -> dict[str, Any]:
        """Wait until the platform holds the job's completion; return the report."""
        self.wait_for(lambda: self.job_state(job_id) == "completed", timeout_s, f"job {job_id} completed")
        return self.platform.results(job_id)

    def puts(self, job_id: str, status: int | None = None) -> dict[str, int]:
        """How many PUTs each host key of the job got (answered ``status``, or any)."""
        filters: dict[str, Any] = {"method": "PUT", "path_re": rf"^/vsa/v1/jobs/{job_id}/hosts/"}
        if status is not None:
            filters["status"] = status
        counts: dict[str, int] = {}
        for row in self.platform.requests(**filters):
            key = row["path"].rsplit("/", 1)[1]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def heartbeat(self) -> dict[str, Any]:
        """The last poll's body as the platform recorded it (empty before the first poll)."""
        appliances = self.platform.list_appliances()
        return (appliances[-1].get("heartbeat") or {}) if appliances else {}

    def accepted_puts(self, job_id: str) -> dict[str, int]:
        """PUTs the platform answered 2xx, per host key."""
        counts: dict[str, int] = {}
        for status in (200, 201):
            for key, n in self.puts(job_id, status).items():
                counts[key] = counts.get(key, 0) + n
        return counts


@pytest.fixture
def engine_lab(tmp_path: Path, port_lab: PortLab) -> Iterator[EngineLab]:
    """Platform up, daemon registered and polling."""
    lab = EngineLab(tmp_path, port_lab)
    try:
        lab.start_platform()
        lab.start_daemon()
        lab.wait_for(lambda: "registered with the platform" in lab.console(), 60, "registration")
        yield lab
    finally:
        lab.close()


def silent(count: int) -> list[str]:
    """``count`` lab addresses with no host behind them."""
    return [f"10.77.0.{SILENT_BASE + i}" for i in range(count)]


def slow_job(portlab: PortLab, silent_count: int, **options: Any) -> dict[str, Any]:
    """A discovery job over the lab's hosts and ``silent_count`` empty addresses, two hosts at a time."""
    return {
        "type": "discovery",
        "title": "engine test",
        "targets": {"ips": [*portlab.answering_ips, *silent(silent_count)]},
        "options": {"tcp_ports": "light", "max_parallel_hosts": 2, "host_timeout_s": 60, "rate_pps": 2000,
                    **options},
    }


def assert_exactly_once(lab: EngineLab, job_id: str, report: dict[str, Any], expected: set[str],
                        *, in_flight: int = 0) -> None:
    """Every targeted host has one result at the platform, accepted from exactly one PUT.

    ``in_flight``: how many hosts may have been accepted twice because a PUT was
    on the wire when the daemon was killed or the platform stopped (its 2xx was
    lost, so the spool rightly sends it again); never more than the sender's
    concurrency.
    """
    assert set(report["hosts"]) == expected, lab.diagnostics()
    accepted = lab.accepted_puts(job_id)
    assert set(accepted) == expected
    twice = {k: n for k, n in accepted.items() if n != 1}
    assert all(n == 2 for n in twice.values()) and len(twice) <= in_flight, twice
    assert sorted(report["completion"]["host_keys"]) == sorted(expected)


def test_plain_ips_job_completes_with_one_result_per_target(engine_lab: EngineLab) -> None:
    portlab = engine_lab.portlab
    assert portlab.dropping_ip and portlab.empty_ip
    ips = [*portlab.answering_ips, portlab.dropping_ip, portlab.empty_ip, "10.77.0.1", "127.0.0.1"]
    job_id = engine_lab.platform.submit_job({
        "type": "discovery", "title": "plain ips",
        "targets": {"ips": ips}, "exclude": [portlab.answering_ips[-1]],
        "options": {"tcp_ports": "light", "host_timeout_s": 60},
    })
    report = engine_lab.wait_completed(job_id, 120)
    assert_exactly_once(engine_lab, job_id, report, set(ips))
    hosts = report["hosts"]
    for ip in portlab.answering_ips[:-1]:
        assert hosts[ip]["status"] == "scanned"
        assert {p["port"] for p in hosts[ip]["ports"]} == set(portlab.open_ports[ip])
        assert hosts[ip]["auth"] == [] and hosts[ip]["packages"] is None
    assert hosts[portlab.answering_ips[-1]]["status"] == "excluded"
    assert hosts[portlab.answering_ips[-1]]["reason"] == "excluded_by_job"
    assert hosts["10.77.0.1"] == hosts["10.77.0.1"] | {"status": "excluded", "reason": "out_of_scope"}
    assert hosts["127.0.0.1"]["status"] == "excluded" and hosts["127.0.0.1"]["reason"] == "out_of_scope"
    assert hosts[portlab.empty_ip]["status"] == "down"
    completion = report["completion"]
    alive = len(portlab.answering_ips) - 1 + (hosts[portlab.dropping_ip]["status"] == "scanned")
    assert completion["status"] == "finished" and completion["reason"] is None
    assert completion["summary"] == {"hosts_targeted": len(ips), "hosts_alive": alive, "hosts_excluded": 3,
                                     "hosts_scanned": alive, "findings": 0}
    assert completion["message"].startswith(f"{len(ips)} hosts targeted, {alive} alive, 3 excluded")
    console = engine_lab.console()
    assert f"job accepted: {job_id} (discovery, 'plain ips')" in console
    assert f"job {job_id} finished: {len(ips)} hosts targeted" in console
    journal = engine_lab.stderr_path.read_text(errors="replace")
    assert re.search(rf"job {job_id} completed; wall time per phase: resolving [\d.]+ s, discovery [\d.]+ s, "
                     r"scanning [\d.]+ s, uploading [\d.]+ s", journal), journal[-2000:]
    # Progress reached the platform, and the job left the spool once completed.
    assert engine_lab.platform.count_requests(method="POST", path=f"/vsa/v1/jobs/{job_id}/progress") >= 1
    engine_lab.wait_for(lambda: engine_lab.heartbeat().get("spool_pending") == 0
                        and engine_lab.heartbeat().get("status") == "idle", 20, "an idle appliance, empty spool")


def test_sigkill_mid_job_then_restart_sends_every_result_exactly_once(engine_lab: EngineLab) -> None:
    spec = slow_job(engine_lab.portlab, 16)
    expected = set(spec["targets"]["ips"])
    job_id = engine_lab.platform.submit_job(spec)
    # Mid-job: some results are at the platform, not all.
    engine_lab.wait_for(lambda: 3 <= len(engine_lab.accepted_puts(job_id)) < len(expected) - 4, 90,
                        "some results sent")
    engine_lab.kill_daemon(signal.SIGKILL)
    before = engine_lab.accepted_puts(job_id)
    assert engine_lab.job_state(job_id) == "accepted"
    engine_lab.start_daemon()
    report = engine_lab.wait_completed(job_id, 150)
    assert_exactly_once(engine_lab, job_id, report, expected, in_flight=SEND_CONCURRENCY)
    assert report["completion"]["status"] == "finished"
    assert f"resuming job {job_id}" in engine_lab.console()
    assert before  # results sent before the kill were not sent again (exactly once above)


def test_platform_refusing_then_unreachable_mid_job_loses_nothing(engine_lab: EngineLab) -> None:
    spec = slow_job(engine_lab.portlab, 12)
    expected = set(spec["targets"]["ips"])
    job_id = engine_lab.platform.submit_job(spec)
    engine_lab.wait_for(lambda: len(engine_lab.accepted_puts(job_id)) >= 2, 90, "some results sent")
    engine_lab.platform.fail_next(duration_s=4, status=503, retry_after_s=1)
    time.sleep(4)
    engine_lab.stop_platform()
    time.sleep(PLATFORM_OUTAGE_S)  # unreachable for a minute (issue 9); scanning goes on meanwhile
    assert engine_lab.daemon is not None and engine_lab.daemon.poll() is None, "the daemon must survive the outage"
    spooled_before = engine_lab.accepted_puts(job_id)
    engine_lab.start_platform()
    report = engine_lab.wait_completed(job_id, 150)
    assert_exactly_once(engine_lab, job_id, report, expected, in_flight=SEND_CONCURRENCY)
    assert engine_lab.puts(job_id, 503), "no PUT met the 503 fault"
    assert len(spooled_before) < len(expected)


def test_missing_hosts_are_sent_again_and_the_job_completes(engine_lab: EngineLab) -> None:
    spec = slow_job(engine_lab.portlab, 2)
    expected = set(spec["targets"]["ips"])
    job_id = engine_lab.platform.submit_job(spec)
    engine_lab.platform.lose_hosts(job_id, count=2)
    report = engine_lab.wait_completed(job_id, 120)
    assert set(report["hosts"]) == expected
    completes = engine_lab.platform.requests(method="POST", path=f"/vsa/v1/jobs/{job_id}/complete")
    assert [c["status"] for c in completes] == [409, 200]
    accepted = engine_lab.accepted_puts(job_id)
    assert sorted(n for n in accepted.values() if n == 2) == [2, 2]  # the two lost hosts, sent again
    assert all(n in (1, 2) for n in accepted.values())


def test_cancel_mid_job_stops_it_and_sends_nothing_more(engine_lab: EngineLab) -> None:
    spec = slow_job(engine_lab.portlab, 24)
    job_id = engine_lab.platform.submit_job(spec)
    engine_lab.wait_for(lambda: len(engine_lab.accepted_puts(job_id)) >= 2, 90, "some results sent")
    engine_lab.platform.cancel_job(job_id)
    engine_lab.wait_for(lambda: f"job {job_id} canceled by the platform" in engine_lab.console(), 30,
                        "the cancel said on the console")
    time.sleep(0.5)  # a PUT already on the wire when the cancel arrived may still land
    count_at_cancel = engine_lab.platform.count_requests(path_re=rf"^/vsa/v1/jobs/{job_id}/")
    time.sleep(6)
    assert engine_lab.platform.count_requests(path_re=rf"^/vsa/v1/jobs/{job_id}/") == count_at_cancel
    assert len(engine_lab.puts(job_id)) < len(spec["targets"]["ips"])
    assert engine_lab.platform.count_requests(path=f"/vsa/v1/jobs/{job_id}/complete") == 0
    assert engine_lab.job_state(job_id) == "canceled"
    # The daemon goes on: it reports no running job any more.
    engine_lab.wait_for(lambda: engine_lab.heartbeat().get("running_jobs") == [], 20, "no running job in the poll")


def test_malformed_job_fails_fast_naming_the_field_and_daemon_goes_on(engine_lab: EngineLab) -> None:
    bad = engine_lab.platform.submit_job({
        "job_id": "j-bad-rate", "type": "discovery", "title": "bad",
        "targets": {"ips": [engine_lab.portlab.answering_ips[0]], "hostnames": [], "ec2": None},
        "exclude": [], "options": {"tcp_ports": "light", "rate_pps": -5},
    }, validate=False)
    report = engine_lab.wait_completed(bad, 60)
    completion = report["completion"]
    assert completion["status"] == "failed" and completion["reason"] == "internal_error"
    assert "options.rate_pps" in completion["message"]
    assert completion["host_keys"] == []
    assert f"job {bad} failed (internal_error)" in engine_lab.console()
    # A bundle whose signature is wrong is refused and said; the daemon keeps running and takes the next job.
    engine_lab.platform.publish_signatures([{"id": "VSA-BAD-1", "affected": []}], version="2026.12.04.6",
                                           corrupt="signature")
    engine_lab.wait_for(lambda: "signatures 2026.12.04.6 refused" in engine_lab.console(), 30, "the refusal")
    good = engine_lab.platform.submit_job({"type": "discovery", "targets": {"ips": [engine_lab.portlab.answering_ips[0]]},
                                           "options": {"tcp_ports": "light"}})
    assert engine_lab.wait_completed(good, 60)["completion"]["status"] == "finished"
    assert engine_lab.heartbeat().get("signatures_version") is None


def test_ec2_endpoint_unreachable_still_scans_ips_and_fails_resolution(engine_lab: EngineLab) -> None:
    ip = engine_lab.portlab.answering_ips[0]
    job_id = engine_lab.platform.submit_job({
        "type": "discovery", "title": "ec2 down",
        "targets": {"ips": [ip], "ec2": {"role_arn": None, "regions": ["us-east-1"], "platform": "vpc_all"}},
        "options": {"tcp_ports": "light"},
    })
    report = engine_lab.wait_completed(job_id, 120)
    assert set(report["hosts"]) == {ip}
    assert report["hosts"][ip]["status"] == "scanned"
    completion = report["completion"]
    assert completion["status"] == "failed" and completion["reason"] == "target_resolution_failed"
    assert "127.0.0.1:9" in completion["message"], completion["message"]
    assert f"job {job_id} failed (target_resolution_failed)" in engine_lab.console()


def test_status_shows_job_progress(engine_lab: EngineLab) -> None:
    spec = slow_job(engine_lab.portlab, 10)
    job_id = engine_lab.platform.submit_job(spec)

    def status_jobs() -> list[dict[str, Any]]:
        out = engine_lab.lab.hub_run(*vsa_argv(), "status", "--json", "--config", str(engine_lab.tmp / "appliance.toml"))
        return [j for j in json.loads(out.stdout)["jobs"] if j["job_id"] == job_id and j["hosts_done"] > 0]

    jobs = engine_lab.wait_for(status_jobs, 60, "vsa status showing the job")
    assert jobs[0]["hosts_total"] == len(spec["targets"]["ips"])
    text = engine_lab.lab.hub_run(*vsa_argv(), "status", "--config", str(engine_lab.tmp / "appliance.toml")).stdout
    assert re.search(rf"^  {job_id}: \d+/{len(spec['targets']['ips'])} hosts done \(\d+ %\)$", text, re.MULTILINE), text
    engine_lab.wait_completed(job_id, 120)


# --- vm_scan: JWE auth records, authenticated checks, the knowledge base --------------------------

SSH_USER = "vsa-engine"
SILENT_SSH_SCRIPT = (
    "import socket, time\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 22)); s.listen(64); held = []\n"
    "while True:\n"
    "    c, _ = s.accept(); held.append(c)  # accepts, never says a word\n"
)


@pytest.fixture(scope="module")
def ssh_targets(port_lab: PortLab) -> Iterator[dict[str, Any]]:
    """A real sshd (key login, NOPASSWD sudo) and a host whose port 22 accepts and never answers."""
    from appliance.lab import sshlab

    reason = sshlab.ssh_lab_available()
    require(reason is None, reason or "")
    with tempfile.TemporaryDirectory(prefix="vsa-engine-ssh-") as tmp:
        yield from _ssh_targets(port_lab, Path(tmp))


def _ssh_targets(port_lab: PortLab, workdir: Path) -> Iterator[dict[str, Any]]:
    from appliance.lab import sshlab

    lab = port_lab.lab
    os.chmod(workdir, 0o755)  # sshd reads authorized keys as the user
    keys = sshlab.make_user_keys(workdir / "keys")
    users = sshlab.LabUsers(users=[sshlab.LabUser(SSH_USER, None, "ALL=(ALL) NOPASSWD: ALL",
                                                  (keys["ed25519-openssh"].public,))])
    etc = sshlab.LabEtc.create(workdir / "lab", users)
    server = sshlab.SshServer(lab, lab.add_host("ssh1"), workdir / "ssh1", users, etc)
    server.setup()
    server.start()
    mute = lab.add_host("mute")
    lab.popen(mute.netns, [sys.executable, "-c", SILENT_SSH_SCRIPT], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while lab.hub_run("bash", "-c", f"exec 3<>/dev/tcp/{mute.ip}/22", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the mute listener did not start"
        time.sleep(0.1)
    try:
        yield {"ssh": server.ip, "mute": mute.ip, "key": keys["ed25519-openssh"], "server": server}
    finally:
        server.stop()


def test_vm_scan_decrypts_records_runs_checks_and_matches_the_installed_bundle(
        engine_lab: EngineLab, ssh_targets: dict[str, Any]) -> None:
    version = dpkg_version("openssh-server")
    engine_lab.platform.publish_signatures([{
        "id": "VSA-ENGINE-0001", "summary": "a test advisory for the lab's OpenSSH",
        "affected": [{"package": {"ecosystem": "Debian:12", "name": "openssh"},
                      "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1:99.0-1"}]}]}],
        "database_specific": {"severity": 4},
    }], version="2026.12.04.9")
    engine_lab.wait_for(lambda: "signatures 2026.12.04.9 installed" in engine_lab.console(), 60,
                        "the bundle installed")
    key = ssh_targets["key"]
    ssh_ip, mute_ip = ssh_targets["ssh"], ssh_targets["mute"]
    job_id = engine_lab.platform.submit_job({
        "type": "vm_scan", "title": "vm scan",
        "targets": {"ips": [ssh_ip, mute_ip]},
        "options": {"tcp_ports": "22", "host_timeout_s": 20},
        "auth_records": [
            {"type": "unix", "id": "rec-ssh", "title": "lab", "username": SSH_USER, "password": None,
             "private_keys": [{"pem": key.pem, "passphrase": None, "certificate": None}],
             "root_delegation": {"method": "sudo", "password": None}, "port": 22, "targets": ["10.77.0.0/24"]},
            {"type": "windows", "id": "rec-win", "title": "elsewhere", "domain": None, "username": "scanner",
             "password": "win-secret-0xC0FFEE", "nt_hash": None, "protocols": ["ntlmv2"],
             "targets": ["10.99.0.0/24"]},
        ],
    })
    report = engine_lab.wait_completed(job_id, 120)
    assert_exactly_once(engine_lab, job_id, report, {ssh_ip, mute_ip})
    good, mute = report["hosts"][ssh_ip], report["hosts"][mute_ip]
    assert good["status"] == "scanned" and [p["port"] for p in good["ports"]] == [22]
    assert [(a["record_id"], a["type"], a["status"], a["privileged"]) for a in good["auth"]] == [
        ("rec-ssh", "unix", "success", True), (None, "windows", "not_applicable", False)]
    assert good["os"]["family"] == "linux" and good["os"]["source"] == "ssh"
    assert good["packages"]["ecosystem"] == "Debian:12"
    assert {"openssh-server", version} <= {x for i in good["packages"]["items"] if i["name"] == "openssh-server"
                                           for x in (i["name"], i["version"])}
    finding = next(f for f in good["findings"] if f["id"] == "VSA-ENGINE-0001")
    assert finding["severity"] == 4 and finding["source_package"] == "openssh"
    # The host that never answers SSH still gets its one result, with the record's outcome in words.
    assert mute["status"] == "scanned"
    unix = [a for a in mute["auth"] if a["type"] == "unix"]
    assert len(unix) == 1 and unix[0]["status"] == "error" and unix[0]["message"]
    completion = report["completion"]
    assert completion["status"] == "finished"
    assert completion["summary"]["findings"] == len(good["findings"]) + len(mute["findings"])
    # No secret reached the console, the journal or the state directory.
    texts = [engine_lab.console(), engine_lab.stderr_path.read_text(errors="replace")]
    texts += [p.read_bytes().decode("latin-1") for p in engine_lab.state_dir.rglob("*") if p.is_file()]
    pem_body = key.pem.splitlines()[1]
    for text in texts:
        assert pem_body not in text and "win-secret-0xC0FFEE" not in text


def dpkg_version(package: str) -> str:
    """The installed version of a Debian package on this machine (the lab's hosts share its files)."""
    return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                          timeout=30, check=True).stdout


# --- EC2 targets through moto (in the hub, beside the daemon) -------------------------------------

SEED_SCRIPT = """
import json, sys
from appliance.lab.moto import Ec2Seeder, MotoServer
seeder = Ec2Seeder(MotoServer(port=int(sys.argv[1])))
vpc = seeder.vpc("us-east-1", "10.77.0.0/16")
subnet = seeder.subnet("us-east-1", vpc, "10.77.0.0/24")
out = {"vpc": vpc}
out["web"] = seeder.launch(subnet, private_ip=sys.argv[2], tags={"env": "lab", "Name": "web-1"})[0]
out["nano"] = seeder.launch(subnet, private_ip=sys.argv[3], instance_type="t3.nano", tags={"env": "lab"})[0]
out["gone"] = seeder.launch(subnet, private_ip="10.77.0.70", tags={"env": "lab"})[0]
out["other"] = seeder.launch(subnet, private_ip="10.77.0.71", tags={"env": "prod"})[0]
seeder.terminate("us-east-1", [out["gone"]])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def moto_fleet(port_lab: PortLab) -> Iterator[dict[str, Any]]:
    """moto_server in the hub, seeded with instances on lab hosts (a web host, a t3.nano, a terminated one)."""
    from appliance.lab.moto import free_port, moto_server_path

    lab = port_lab.lab
    web = lab.add_host("ec2web", ip="10.77.0.60")
    nano = lab.add_host("ec2nano", ip="10.77.0.61")
    for host in (web, nano):
        lab.popen(host.netns, [sys.executable, "-m", "appliance.lab.portlab", "serve", "--ports", "22,80"],
                  stdout=subprocess.DEVNULL)
    port = free_port()
    lab.popen(lab.hub, [moto_server_path(), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        seeded = lab.hub_run(sys.executable, "-c", SEED_SCRIPT, str(port), web.ip, nano.ip, check=False)
        if seeded.returncode == 0:
            break
        assert time.monotonic() < deadline, f"moto could not be seeded: {seeded.stderr[-2000:]}"
        time.sleep(0.5)
    for host in (web, nano):
        while lab.hub_run("bash", "-c", f"exec 3<>/dev/tcp/{host.ip}/80", check=False).returncode != 0:
            assert time.monotonic() < deadline + 10, f"the listener of {host.ip} did not start"
            time.sleep(0.1)
    fleet = json.loads(seeded.stdout)
    fleet.update(url=f"http://127.0.0.1:{port}", web_ip=web.ip, nano_ip=nano.ip)
    yield fleet


def test_ec2_selection_targets_instances_by_tag_with_their_facts(engine_lab: EngineLab,
                                                                 moto_fleet: dict[str, Any]) -> None:
    engine_lab.kill_daemon(signal.SIGTERM)
    engine_lab.aws_endpoint = moto_fleet["url"]
    engine_lab.start_daemon()
    empty = engine_lab.portlab.empty_ip
    job_id = engine_lab.platform.submit_job({
        "type": "discovery", "title": "ec2 by tag",
        "targets": {"ips": [empty], "ec2": {"role_arn": None, "regions": ["us-east-1"], "platform": "vpc_all",
                                            "tags_include": [{"key": "env", "value": "lab"}]}},
        "options": {"tcp_ports": "22,80"},
    })
    report = engine_lab.wait_completed(job_id, 120)
    web, nano, gone = moto_fleet["web"], moto_fleet["nano"], moto_fleet["gone"]
    assert_exactly_once(engine_lab, job_id, report, {web, nano, gone, empty})
    hosts = report["hosts"]
    assert hosts[web]["status"] == "scanned" and [p["port"] for p in hosts[web]["ports"]] == [22, 80]
    target = hosts[web]["target"]
    assert (target["ip"], target["instance_id"], target["region"], target["vpc_id"]) == (
        moto_fleet["web_ip"], web, "us-east-1", moto_fleet["vpc"])
    assert target["tags"] == {"env": "lab", "Name": "web-1"}
    assert (hosts[nano]["status"], hosts[nano]["reason"]) == ("excluded", "small_instance_type")
    assert (hosts[gone]["status"], hosts[gone]["reason"]) == ("excluded", "terminated")
    assert hosts[empty]["status"] == "down"
    assert moto_fleet["other"] not in hosts  # outside the selection: not a target
    completion = report["completion"]
    assert completion["status"] == "finished" and completion["reason"] is None
    assert completion["summary"] == {"hosts_targeted": 4, "hosts_alive": 1, "hosts_excluded": 2,
                                     "hosts_scanned": 1, "findings": 0}


def test_hostnames_are_resolved_at_run_time_every_address_scanned(engine_lab: EngineLab) -> None:
    first, second = engine_lab.portlab.answering_ips[:2]
    job_id = engine_lab.platform.submit_job({
        "type": "discovery", "title": "names",
        "targets": {"hostnames": [LAB_NAME, "nowhere.lab.test"]},
        "options": {"tcp_ports": "light"},
    })
    report = engine_lab.wait_completed(job_id, 60)
    assert_exactly_once(engine_lab, job_id, report, {first, second})
    for ip in (first, second):
        assert report["hosts"][ip]["target"]["hostname"] == LAB_NAME
        assert report["hosts"][ip]["status"] == "scanned"
    completion = report["completion"]
    assert completion["status"] == "failed" and completion["reason"] == "target_resolution_failed"
    assert "nowhere.lab.test cannot be resolved" in completion["message"]
