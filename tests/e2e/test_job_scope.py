"""Scope at the job level (issue 11): forbidden, excluded and out-of-job addresses get not one packet.

One module-scoped run on the demo fleet (:func:`appliance.lab.fleet.build_fleet`):
``vsa run`` boots as a real process in the hub namespace and the reference
platform offers it one ``vm_scan`` of plain addresses naming

- two lab hosts that must be scanned (``app1`` 10.77.0.10 with sshd, ``web``
  10.77.0.14 with HTTP and HTTPS);
- two lab hosts with listeners that the job also lists in ``exclude``
  (``10.77.0.12/31``: ``legacy``'s sshd and ``files``' Samba);
- forbidden addresses, several of which answer in the hub: 127.0.0.5 (the
  hub's loopback), 169.254.169.254 (the IMDS emulator listens there, on the
  hub's loopback), the appliance's own 10.77.0.1, 224.0.0.1, 0.0.0.1,
  240.0.0.1 and 255.255.255.255;

while two lab hosts with listeners are not named at all (``app2`` 10.77.0.11
and ``vault`` 10.77.0.15). tcpdump captures everything in the hub namespace
(``-i any``: the bridge ``br0`` and ``lo``; only the loopback chatter between
127.0.0.1 and itself, i.e. the platform, moto and the broker, is left out by
the filter) from before the job is submitted until it completed.

Shown: the in-job hosts' packets are in the capture and they were scanned; not
one IP packet (nor an ARP request) went to any forbidden, excluded or
out-of-job address; forbidden ones got ``excluded``/``out_of_scope``, excluded
ones ``excluded``/``excluded_by_job``, and out-of-job hosts no result at all.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.demo import DemoError, Scenario
from appliance.lab.fleet import Fleet, build_fleet, fleet_available
from appliance.lab.netns import netns_executor
from tests.conftest import require, require_tool

pytestmark = [pytest.mark.netns, pytest.mark.slow]

IN_JOB = {"10.77.0.10": {22}, "10.77.0.14": {80, 443}}
EXCLUDE = ["10.77.0.12/31"]
EXCLUDED = ("10.77.0.12", "10.77.0.13")
OUT_OF_JOB = ("10.77.0.11", "10.77.0.15")
FORBIDDEN = ("127.0.0.5", "169.254.169.254", "224.0.0.1", "0.0.0.1", "240.0.0.1", "255.255.255.255")
SCANNER_IP = "10.77.0.1"
TCP_PORTS = "22,80,443,445,3128,5000,8443,8883"  # the hub's own service ports too
JOB_TIMEOUT_S = 120.0
CONTROL_IP, CONTROL_PORT = "127.0.0.9", 9  # the test's own packet on the hub's lo: proves lo is captured
# Everything but 127.0.0.1 talking to itself (the platform, moto, Mosquitto): that one is not in any test set.
CAPTURE_FILTER = "arp or ((ip or ip6) and not (src host 127.0.0.1 and dst host 127.0.0.1))"


@dataclass
class Run:
    """The job's report at the platform and the packets captured in the hub while it ran."""

    fleet: Fleet
    report: dict[str, Any]
    packets: list[Any]
    console: list[str]


def start_capture(fleet: Fleet, pcap: Path) -> subprocess.Popen[bytes]:
    """tcpdump on every interface of the hub, written unbuffered to ``pcap``; returns once it listens."""
    tcpdump = require_tool("tcpdump")
    proc = fleet.lab.popen(fleet.lab.hub, [tcpdump, "-i", "any", "-n", "-U", "-w", str(pcap), CAPTURE_FILTER],
                           stderr=subprocess.PIPE)
    assert proc.stderr is not None
    deadline = time.monotonic() + 10
    line = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if b"listening on" in line:
            return proc
    pytest.fail(f"tcpdump did not start: {line!r}")


def _touch(ip: str, port: int) -> None:
    """One TCP connection attempt (refused or not) from the calling thread's namespace."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        sock.connect_ex((ip, port))


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    reason = fleet_available()
    require(reason is None, reason or "")
    with tempfile.TemporaryDirectory(prefix="vsa-e2e-scope-") as tmp, build_fleet(Path(tmp), mqtt=False) as fleet:
        fleet.lab.add_hub_address("127.0.0.5/32")  # answers on the hub's loopback, as 169.254.169.254 does
        scenario = Scenario(fleet, narrate=lambda _m: None)
        pcap = Path(tmp) / "job.pcap"
        try:
            scenario.boot()
            capture = start_capture(fleet, pcap)
            try:
                # Control: a connection of our own to another loopback address must show in the capture.
                with netns_executor(fleet.lab.hub, 1) as hub:
                    hub.submit(_touch, CONTROL_IP, CONTROL_PORT).result(timeout=10)
                job_id = fleet.platform.submit_job({
                    "type": "vm_scan", "title": "scope: forbidden, excluded and out-of-job addresses",
                    "targets": {"ips": [*IN_JOB, *EXCLUDED, *FORBIDDEN, SCANNER_IP], "hostnames": [], "ec2": None},
                    "exclude": EXCLUDE,
                    "options": {"tcp_ports": TCP_PORTS, "udp_ports": "none", "host_discovery": "default",
                                "service_detection": "banner", "authentication": False},
                })
                report = fleet.platform.wait_for_job(job_id, ("completed", "canceled"), timeout_s=JOB_TIMEOUT_S)
            finally:
                time.sleep(1.0)  # let tcpdump write the last packets
                capture.terminate()
                capture.wait(timeout=10)
        except DemoError as exc:
            pytest.fail(f"{exc}\nconsole:\n" + "\n".join(scenario.console))
        finally:
            scenario.stop()
        # The link layers first: without them scapy reads ``-i any``'s cooked frames as raw bytes.
        import scapy.layers.inet  # noqa: F401
        import scapy.layers.l2  # noqa: F401
        from scapy.utils import rdpcap

        yield Run(fleet, report, list(rdpcap(str(pcap))), list(scenario.console))


def _ip_packets(run: Run) -> list[Any]:
    from scapy.layers.inet import IP

    return [p[IP] for p in run.packets if IP in p]


def test_the_job_completed(run: Run) -> None:
    completion = run.report.get("completion") or {}
    assert (run.report["state"], completion.get("status")) == ("completed", "finished"), run.console


def test_in_job_hosts_were_scanned_and_their_packets_captured(run: Run) -> None:
    destinations = {p.dst for p in _ip_packets(run)}
    for ip, ports in IN_JOB.items():
        assert ip in destinations, f"the capture does not see the scan of {ip}"
        got = run.report["hosts"][ip]
        assert got["status"] == "scanned", got
        assert {p["port"] for p in got["ports"] if p["state"] == "open"} == ports, got["ports"]


def test_forbidden_addresses_are_out_of_scope(run: Run) -> None:
    for ip in (*FORBIDDEN, SCANNER_IP):
        got = run.report["hosts"][ip]
        assert (got["status"], got["reason"], got["ports"]) == ("excluded", "out_of_scope", []), got


def test_excluded_addresses_are_excluded_by_job(run: Run) -> None:
    for ip in EXCLUDED:
        got = run.report["hosts"][ip]
        assert (got["status"], got["reason"], got["ports"]) == ("excluded", "excluded_by_job", []), got


def test_out_of_job_hosts_get_no_result(run: Run) -> None:
    assert set(run.report["hosts"]) == {*IN_JOB, *EXCLUDED, *FORBIDDEN, SCANNER_IP}
    for ip in OUT_OF_JOB:
        assert all(h["target"]["ip"] != ip for h in run.report["hosts"].values())


def test_the_capture_sees_the_loopback_too(run: Run) -> None:
    assert CONTROL_IP in {p.dst for p in _ip_packets(run)}, "the test's own packet to lo was not captured"


def test_not_one_packet_to_forbidden_excluded_or_out_of_job_addresses(run: Run) -> None:
    packets = _ip_packets(run)
    assert packets, "tcpdump captured nothing"
    untouchable = {*FORBIDDEN, *EXCLUDED, *OUT_OF_JOB}
    sent = sorted({(p.src, p.dst, p.sprintf("%IP.proto%")) for p in packets if p.dst in untouchable})
    assert sent == [], f"packets went to addresses outside the scope: {sent}"
    # The appliance's own address: a probe of it would go from it to itself.
    assert not [p for p in packets if p.src == SCANNER_IP and p.dst == SCANNER_IP]


def test_not_one_arp_request_for_them(run: Run) -> None:
    from scapy.layers.l2 import ARP

    asked = {p[ARP].pdst for p in run.packets if ARP in p and p[ARP].op == 1}
    assert set(IN_JOB) <= asked, f"control: the hub asked for the in-job hosts first ({asked})"
    assert asked & {*EXCLUDED, *OUT_OF_JOB} == set(), asked

