"""The demo as the README runs it: ``python -m appliance.lab.demo``, a whole run and an interrupted one.

A whole run must exit 0, say that every host is accounted for and matches the
ground truth, and write the HTML report where it says. An interrupted run
(SIGINT, as Ctrl-C sends, once the job is accepted) must exit 1 and leave
nothing behind: no namespace of its own (the lab kills every process inside
its namespaces before deleting them) and no ``/etc/netns`` folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.lab.fleet import fleet_available
from tests.conftest import require

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


def demo(report: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "appliance.lab.demo", "--report", str(report)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def leftovers(pid: int) -> list[str]:
    """Anything of the demo process ``pid`` still on the machine."""
    prefix = f"vsa{pid}"
    found = [f"namespace {line.split()[0]}" for line in
             subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.splitlines()
             if line.startswith(prefix)]
    found += [f"/etc/netns/{p.name}" for p in Path("/etc/netns").glob(f"{prefix}*")] if Path("/etc/netns").exists() else []
    return found


def test_whole_demo_exits_0_and_writes_the_report(tmp_path: Path) -> None:
    require(fleet_available() is None, fleet_available() or "")
    report = tmp_path / "out" / "demo-report.html"
    proc = demo(report)
    out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, out
    assert f"demo: HTML report written to {report}" in out
    assert "demo: every host matches the lab's ground truth" in out, out
    assert re.search(r"demo: every one of the 8 targeted hosts is accounted for, each sent once", out)
    assert re.search(r"^8 hosts: 5 scanned, 1 down, 2 excluded; 6 open ports, \d+ findings$", out, re.M), out
    assert re.search(r"^    vsa: job j-\S+ finished: 8 hosts targeted, 5 alive, 2 excluded", out, re.M)
    assert report.read_text().startswith("<!DOCTYPE html>")
    assert "demo: lab torn down" in out.splitlines()[-1]
    assert leftovers(proc.pid) == []


def test_ctrl_c_mid_job_tears_everything_down(tmp_path: Path) -> None:
    require(fleet_available() is None, fleet_available() or "")
    proc = demo(tmp_path / "report.html")
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"vsa: job accepted: ", line):
            break
        assert time.monotonic() < deadline, "".join(lines)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    out = "".join(lines) + rest
    assert proc.returncode == 1, out
    assert "demo: interrupted" in out
    assert "demo: lab torn down" in out.splitlines()[-1]
    assert leftovers(proc.pid) == []
