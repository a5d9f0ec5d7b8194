"""The SYN engine itself, in the lab's hub namespace: source ports, RST suppression, guards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool

from appliance.lab.portlab import build_port_lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

ENGINE_SCRIPT = """
import json, sys
from appliance.scan.synscan import syn_scan_blocking, SynScanError
cfg = json.loads(sys.argv[1])
out = []
for suppress in cfg["suppress"]:
    results, report = syn_scan_blocking(cfg["hosts"], cfg["ports"], rate_pps=50000, suppress_kernel_rst=suppress)
    out.append({"open": {ip: sorted(h.open) for ip, h in results.items()},
                "closed": {ip: h.closed for ip, h in results.items()},
                "filtered": {ip: h.filtered for ip, h in results.items()},
                "sport": report.source_port, "suppressed": report.rst_suppressed,
                "rejected": report.rejected_answers, "notes": report.notes})
try:
    syn_scan_blocking(cfg["hosts"], [22], may_probe=lambda ip: False)
    out.append("probed")
except SynScanError as exc:
    out.append(str(exc))
print(json.dumps(out))
"""


def run_engine(lab, config):
    argv = lab.hub_argv([sys.executable, "-c", ENGINE_SCRIPT, json.dumps(config)])
    argv[0] = shutil.which("ip") or argv[0]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_consecutive_scans_fresh_ports_suppression_and_scope_guard(netns_lab):
    require_tool("nft")
    portlab = build_port_lab(netns_lab, answering=2, ports_per_host=6)
    hosts = [*portlab.answering_ips, portlab.dropping_ip]
    ports = sorted({p for ps in portlab.open_ports.values() for p in ps} | set(range(1, 3000)))
    runs = run_engine(netns_lab, {"hosts": hosts, "ports": ports, "suppress": [False, True, False]})
    *scans, guard = runs
    for scan in scans:
        for ip, truth in portlab.open_ports.items():
            assert scan["open"][ip] == sorted(truth)
            assert scan["closed"][ip] == len(ports) - len(truth) and scan["filtered"][ip] == 0
        assert scan["open"][portlab.dropping_ip] == [] and scan["filtered"][portlab.dropping_ip] == len(ports)
    # A fresh random source port per scan: stale half-open state never answers a new scan.
    assert len({s["sport"] for s in scans}) == 3
    assert all(61000 <= s["sport"] <= 65535 for s in scans)
    assert [s["suppressed"] for s in scans] == [False, True, False]
    # The nft table of the suppressed scan is gone afterwards.
    tables = netns_lab.hub_run("nft", "list", "tables").stdout
    assert "vsa_syn_" not in tables
    assert "out of scope" in guard
