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

Already covered elsewhere (referenced, not repeated): EC2 throttling retried and
bounded at the resolver (tests/integration/test_ec2_moto.py::test_throttling_*),
a job whose EC2 selection cannot be resolved still scanning its ips and completing
failed/target_resolution_failed (test_engine_jobs.py::test_ec2_endpoint_unreachable_*),
the proxy's 407 and a proxy that is down (test_daemon_proxy.py), a refused port and
IMDS disabled (test_daemon_e2e.py, test_daemon_systemd.py).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab.portlab import PortLab
from tests.conftest import require
from tests.integration.test_engine_jobs import EngineLab, assert_exactly_once, port_lab, slow_job  # noqa: F401

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
