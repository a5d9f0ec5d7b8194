"""Issue 11: faults at the boundaries, with `vsa run` as a real process.

- A full disk for the spool, mid-job (the state directory on a small tmpfs, in
  the namespace lab of the engine tests): the daemon says so, does not accept
  new work while the disk is full, keeps and sends what it had spooled, and
  resumes (the paused job and the new one) when space is freed.
- IMDS flapping at boot and while running: retried, never fatal.
- The platform's name does not resolve (a name under the reserved ``.invalid``
  TLD, with the daemon in a network namespace that has no route out, so not
  one DNS query can leave the machine).
- The proxy refusing CONNECT (Squid with a deny-all ACL).
- A TLS handshake failure (plain HTTP on the platform port; a TLS 1.0-only server).

- EC2 throttling that persists, at the job level (awsfaults in front of moto, in
  the hub): the job still scans its ips and completes failed /
  target_resolution_failed after a bounded number of DescribeInstances calls.

Already covered elsewhere (referenced, not repeated): EC2 throttling retried and
bounded at the resolver (tests/integration/test_ec2_moto.py::test_throttling_*),
an EC2 endpoint that does not answer at all, at the job level
(test_engine_jobs.py::test_ec2_endpoint_unreachable_*),
the proxy's 407 and a proxy that is down (test_daemon_proxy.py), a refused port and
IMDS disabled (test_daemon_e2e.py, test_daemon_systemd.py).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonLab, vsa_command

from appliance.lab.hostile import BadTlsServer, HostilePlatform
from appliance.lab.portlab import PortLab
from appliance.lab.squid import free_port, squid_available
from tests.conftest import require
from tests.integration.test_engine_jobs import (  # noqa: F401 - module fixtures shared with the engine tests
    REPO,
    EngineLab,
    assert_exactly_once,
    engine_lab,
    moto_fleet,
    port_lab,
    slow_job,
)

pytestmark = pytest.mark.slow

STATE_TMPFS = "size=16m"


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the disk is full; return the bytes written."""
    written = 0
    block = b"\0" * 65536
    with open(path, "wb") as handle:
        while True:
            try:
                written += os.write(handle.fileno(), block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    # The last bytes: fill the remainder exactly.
    with open(path, "ab") as handle:
        for size in (4096, 512, 1):
            while True:
                try:
                    written += os.write(handle.fileno(), b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


@pytest.fixture
def full_disk_lab(tmp_path: Path, port_lab: PortLab) -> Iterator[EngineLab]:  # noqa: F811
    """The engine lab with its state directory on a small tmpfs of its own."""
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    lab = EngineLab(tmp_path, port_lab)
    lab.state_dir.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"{STATE_TMPFS},mode=0700", "tmpfs", str(lab.state_dir)],
                   check=True)
    try:
        lab.start_platform()
        lab.start_daemon()
        lab.wait_for(lambda: "registered with the platform" in lab.console(), 60, "registration")
        yield lab
    finally:
        lab.close()
        subprocess.run(["umount", "-l", str(lab.state_dir)], check=False)


def test_full_disk_mid_job_pauses_refuses_new_work_loses_nothing_and_resumes(full_disk_lab: EngineLab) -> None:
    lab = full_disk_lab
    portlab = lab.portlab
    first = lab.platform.submit_job(slow_job(portlab, 6))
    expected = set(portlab.answering_ips) | {f"10.77.0.{100 + i}" for i in range(6)}
    lab.wait_for(lambda: len(lab.accepted_puts(first)) >= 2, 90, "the first results sent")
    filler = lab.state_dir / "filler"
    fill(filler)
    # The job's next result cannot be spooled: it pauses, and the console says why.
    lab.wait_for(lambda: f"job {first} paused: the disk of the state directory is full" in lab.console(), 90,
                 "the job paused")
    assert "the disk of the state directory is full (" in lab.console()
    sent_before = set(lab.accepted_puts(first))
    assert sent_before

    # New work is not accepted while the disk is full.
    second = lab.platform.submit_job({"type": "discovery", "title": "while full",
                                      "targets": {"ips": [portlab.answering_ips[0]]},
                                      "options": {"tcp_ports": "light"}})
    lab.wait_for(lambda: f"job {second} not accepted" in lab.console(), 30, "the refusal of new work")
    time.sleep(3)
    assert lab.job_state(second) == "queued", lab.diagnostics()
    assert lab.platform.requests(path=f"/vsa/v1/jobs/{second}/accept") == []  # not even tried
    assert lab.daemon is not None and lab.daemon.poll() is None

    # Space is freed: the paused job resumes, the new one is accepted; nothing was lost.
    filler.unlink()
    report = lab.wait_completed(first, 180)
    assert sent_before <= set(report["hosts"])
    assert_exactly_once(lab, first, report, expected, in_flight=4)
    assert lab.wait_completed(second, 90)["completion"]["status"] == "finished"
    console = lab.console()
    print(console)
    assert "accepting work again" in console
    assert "internal error" not in console, console
    assert lab.daemon is not None and lab.daemon.poll() is None


THROTTLING_PROXY = """
import asyncio, json, sys
from appliance.lab.awsfaults import AwsFaultProxy
async def main():
    proxy = await AwsFaultProxy(upstream=sys.argv[1], throttle={"DescribeInstances": 10**9}).start()
    print(proxy.port, flush=True)
    while True:
        counts = {"DescribeInstances": proxy.count("DescribeInstances"),
                  "throttled": proxy.count("DescribeInstances", fault=True)}
        with open(sys.argv[2] + ".tmp", "w") as handle:
            json.dump(counts, handle)
        import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
        await asyncio.sleep(0.2)
asyncio.run(main())
"""


def test_ec2_throttling_that_persists_fails_resolution_and_still_scans_ips(
        engine_lab: EngineLab, moto_fleet: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    """EC2 answers RequestLimitExceeded to every DescribeInstances (awsfaults in front of moto, in the hub)."""
    lab = engine_lab
    counts = tmp_path / "throttle.json"
    proxy = lab.lab.popen(lab.lab.hub, [sys.executable, "-c", THROTTLING_PROXY, moto_fleet["url"], str(counts)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    assert proxy.stdout is not None
    port = int(proxy.stdout.readline().decode().strip())
    lab.kill_daemon(signal.SIGTERM)
    lab.aws_endpoint = f"http://127.0.0.1:{port}"
    lab.start_daemon()
    ip = lab.portlab.answering_ips[0]
    job_id = lab.platform.submit_job({
        "type": "discovery", "title": "ec2 throttled",
        "targets": {"ips": [ip], "ec2": {"role_arn": None, "regions": ["us-east-1"], "platform": "vpc_all"}},
        "options": {"tcp_ports": "light"},
    })
    report = lab.wait_completed(job_id, 150)
    assert set(report["hosts"]) == {ip} and report["hosts"][ip]["status"] == "scanned"
    completion = report["completion"]
    assert (completion["status"], completion["reason"]) == ("failed", "target_resolution_failed"), completion
    assert "RequestLimitExceeded" in completion["message"] or "thrott" in completion["message"].lower(), completion
    seen = json.loads(counts.read_text())
    print(completion["message"], seen)  # for the record (pytest -s)
    # Retried, and bounded: every DescribeInstances was throttled, and there were only a few.
    assert seen["throttled"] == seen["DescribeInstances"] and 2 <= seen["DescribeInstances"] <= 8, seen
    assert f"job {job_id} failed (target_resolution_failed)" in lab.console()
    assert lab.daemon is not None and lab.daemon.poll() is None


# --- daemon boundaries on 127.0.0.1 (no scanning) ---


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DaemonLab]:
    with DaemonLab(tmp_path) as daemon_lab:
        yield daemon_lab


def point_platform_at(lab: DaemonLab, url: str, ca_file: Path | None = None) -> None:
    """Rewrite the daemon's configuration so that platform.url (and the CA) are ``url``/``ca_file``."""
    lab.write_config()
    config = lab.config_path.read_text().replace(lab.server.url, url)  # type: ignore[union-attr]
    if ca_file is not None:
        config = config.replace(str(lab.platform.ca_file), str(ca_file))  # type: ignore[union-attr]
    lab.config_path.write_text(config)


def test_imds_flapping_at_boot_and_while_running_is_never_fatal(lab: DaemonLab) -> None:
    assert lab.imds is not None and lab.platform is not None
    lab.set_user_data(f"PERSCODE={lab.platform.create_perscode()}\n")
    # At boot: the first answers are 503s, then the endpoint is switched off, then on again.
    lab.imds.fail_next(4, status=503)
    lab.imds.mode = "disabled"
    lab.start_daemon()
    lab.wait_for(r"HttpEndpoint=enabled.*\(the appliance keeps trying\)$", timeout_s=30)
    lab.imds.mode = "v2-optional"
    lab.wait_for(r"^vsa: IMDSv2 in use", timeout_s=30)
    lab.wait_for(r"registered with the platform")
    # While running: IMDS flaps (off, 503s, v1 only, back) for a while; polling never stops.
    polls = len(lab.polls())
    for mode in ("disabled", "v1-only", "disabled", "v2-optional"):
        lab.imds.mode = mode  # type: ignore[assignment]
        lab.imds.fail_next(3, status=503)
        time.sleep(1.5)
    lab.wait_until(lambda: len(lab.polls()) >= polls + 3, timeout_s=20, what="polls while IMDS flaps")
    # IMDS is down exactly when the daemon needs it again: the platform forgets the appliance, which
    # must read its user-data afresh to register again. It says so, waits, and registers when IMDS is back.
    appliance_id = lab.status()["registration"]["appliance_id"]
    lab.imds.mode = "disabled"
    lab.platform.forget_appliance(appliance_id)
    lab.wait_for(r"user-data cannot be read from IMDS: .*HttpEndpoint=enabled", timeout_s=30)
    time.sleep(2)
    assert lab.proc is not None and lab.proc.poll() is None
    lab.imds.mode = "v2-optional"
    lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$", count=2, timeout_s=30)
    lab.wait_until(lambda: lab.status()["poll"]["last_result"] == "ok", timeout_s=20, what="a good poll")
    assert lab.proc is not None and lab.proc.poll() is None
    assert "stopped" not in lab.run_console()
    assert lab.stop_daemon() == 0


def test_platform_name_that_does_not_resolve_is_said(lab: DaemonLab, tmp_path: Path) -> None:
    """`.invalid` never resolves (RFC 6761); the daemon runs in a namespace of its own with no route
    (only a loopback that is down), so its resolver cannot send a single query off this machine."""
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "unshare --net needs root and util-linux")
    assert lab.platform is not None
    name = "platform.vsa-lab.invalid"
    point_platform_at(lab, f"https://{name}")
    user_data = tmp_path / "user-data"
    user_data.write_text(f"PERSCODE={lab.platform.create_perscode()}\n")
    env = lab.env(AWS_EC2_METADATA_DISABLED="true")
    out = open(lab.stdout_path, "ab")  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(["unshare", "--net", *vsa_command(), "run", "--config", str(lab.config_path),
                                 "--user-data", str(user_data)], stdout=out, stderr=subprocess.DEVNULL, env=env)
        try:
            lab.wait_until(lambda: f"unable to connect to {name}:443" in lab.console(), timeout_s=30,
                           what="the DNS verdict")
            time.sleep(2)
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    finally:
        out.close()
    assert (f"vsa: platform: unable to connect to {name}:443 - please fix: the name {name} cannot be resolved; "
            "check platform.url and the VPC's DNS settings") in lab.console(), lab.console()


def squid_denying_all(workdir: Path) -> subprocess.Popen[bytes]:
    """A Squid whose only rule is ``http_access deny all`` (CONNECT refused with 403)."""
    port = free_port()
    conf = workdir / "squid.conf"
    conf.write_text(f"http_port 127.0.0.1:{port}\nhttp_access deny all\ncache deny all\n"
                    f"pid_filename {workdir}/squid.pid\naccess_log stdio:{workdir}/access.log\n"
                    f"cache_log {workdir}/cache.log\ncoredump_dir {workdir}\nshutdown_lifetime 0 seconds\n"
                    "logfile_rotate 0\n")
    try:  # Squid drops to the proxy user, which must own its files (as appliance.lab.squid does)
        proxy_user = pwd.getpwnam("proxy")
        for path in (workdir, conf):
            os.chown(path, proxy_user.pw_uid, proxy_user.pw_gid)
    except KeyError:
        pass  # no "proxy" user: Squid runs as root
    proc = subprocess.Popen(["squid", "-N", "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    proc.port = port  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, f"squid exited ({proc.returncode}); see {workdir}/cache.log"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            assert time.monotonic() < deadline, "squid did not start"
            time.sleep(0.1)


def test_proxy_refusing_connect_is_said_and_fixing_it_works(lab: DaemonLab, tmp_path: Path) -> None:
    require(squid_available() is None, squid_available() or "")
    assert lab.platform is not None and lab.server is not None
    # Not under pytest's tmp_path: the proxy user must be able to reach it.
    workdir = Path(tempfile.mkdtemp(prefix="vsa-squid-deny-"))
    os.chmod(workdir, 0o755)
    proxy = squid_denying_all(workdir)
    code = lab.platform.create_perscode()
    try:
        lab.set_user_data(f"PERSCODE={code}\nPROXY_URL=127.0.0.1:{proxy.port}\n")  # type: ignore[attr-defined]
        lab.start_daemon()
        lab.wait_for(rf"^vsa: platform: unable to connect to 127\.0\.0\.1:{lab.server.port} - please fix: the proxy "
                     rf"127\.0\.0\.1:{proxy.port} refused the connection to the platform \(403 Forbidden\); "  # type: ignore[attr-defined]
                     rf"allow CONNECT to 127\.0\.0\.1:{lab.server.port} on the proxy", timeout_s=30)
        time.sleep(2)
        assert lab.proc is not None and lab.proc.poll() is None
        assert lab.registers() == []
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)
        proxy.wait(20)
        shutil.rmtree(workdir, ignore_errors=True)
    # The operator removes the proxy from user-data: the daemon connects directly.
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.wait_for(r"registered with the platform", timeout_s=30)
    assert lab.stop_daemon() == 0


def test_tls_handshake_failures_are_said(lab: DaemonLab, tmp_path: Path) -> None:
    hostile = HostilePlatform(tmp_path / "certs")
    bad = BadTlsServer(hostile.good_cert, hostile.good_key, mode="plain")
    assert lab.platform is not None
    lab.set_user_data(f"PERSCODE={lab.platform.create_perscode()}\n")
    with bad.serve_in_thread() as port:
        point_platform_at(lab, f"https://127.0.0.1:{port}", hostile.ca_file)
        lab.start_daemon()
        verdict = rf"^vsa: platform: unable to connect to 127\.0\.0\.1:{port} - please fix: the TLS handshake failed"
        lab.wait_for(verdict + r" \(.*(WRONG_VERSION_NUMBER|wrong version number).*\); check that the platform "
                     r"speaks TLS 1\.2 or newer on this port", timeout_s=30)
        bad.mode = "tls10"
        lab.wait_until(lambda: bad.connections["tls10"] >= 1, timeout_s=30, what="a TLS 1.0 handshake")
        lab.wait_for(verdict + r" \(.*(PROTOCOL_VERSION|protocol version|UNSUPPORTED_PROTOCOL|no protocols).*\)",
                     timeout_s=30)
        # A handshake reset by the server: words, not "the connection failed ()".
        bad.mode = "reset"
        lab.wait_for(rf"^vsa: platform: unable to connect to 127\.0\.0\.1:{port} - please fix: the connection "
                     r"failed \(Connection reset by peer\)", timeout_s=30)
        assert lab.proc is not None and lab.proc.poll() is None
    assert lab.stop_daemon() == 0


def test_full_disk_while_polling_and_at_start(lab: DaemonLab) -> None:
    """A reboot with the state directory's disk full: `vsa run` says the disk is full (not "disk I/O
    error") and exits 1 (systemd restarts it every 5 s); once space is freed it starts as before."""
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    assert lab.platform is not None
    lab.state_dir.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(lab.state_dir)], check=True)
    try:
        lab.set_user_data(f"PERSCODE={lab.platform.create_perscode()}\n")
        lab.start_daemon()
        appliance_id = lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$").group(1)
        lab.wait_until(lambda: len(lab.polls()) >= 1, timeout_s=10, what="a poll")
        # While running, the disk fills and the platform changes the poll interval (which the identity
        # remembers on disk): the daemon takes the new interval and goes on.
        filler = lab.state_dir / "filler"
        fill(filler)
        lab.platform.set_poll_interval(3)
        lab.wait_for(r"^vsa: polling the platform every 3 s$", timeout_s=20)
        polls = len(lab.polls())
        lab.wait_until(lambda: len(lab.polls()) >= polls + 2, timeout_s=20, what="polls on a full disk")
        assert lab.proc is not None and lab.proc.poll() is None
        filler.unlink()
        assert lab.stop_daemon() == 0
        for name in ("spool.sqlite3-wal", "spool.sqlite3-shm"):
            (lab.state_dir / name).unlink(missing_ok=True)  # as after a clean close
        fill(filler)
        lab.start_daemon()
        assert lab.proc is not None and lab.proc.wait(30) == 1
        lab.wait_for(r"^vsa: cannot start: cannot open the spool .*: the disk holding it is full", timeout_s=5,
                     current_run=False)
        lab.stop_daemon()
        filler.unlink()
        lab.start_daemon()
        lab.wait_for(rf"^vsa: registered as {appliance_id} \(since ", timeout_s=30)
        lab.wait_until(lambda: lab.status()["poll"]["last_result"] == "ok", timeout_s=20, what="a good poll")
        assert len(lab.registers()) == 1
        assert lab.stop_daemon() == 0
    finally:
        lab.stop_daemon()
        subprocess.run(["umount", "-l", str(lab.state_dir)], check=False)
