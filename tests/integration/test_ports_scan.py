"""Host and port discovery in a namespace lab the tests build (issue 5).

The lab (appliance.lab.portlab): answering hosts with known open ports, a host
that drops everything, an address with no host; the scanner is ``vsa scan``
run in the hub namespace. Every test checks exact port sets against the
ground truth: every open port found, nothing else reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require, require_tool

from appliance.lab.portlab import SSH_BANNER, TLS_SUBJECT_CN, build_port_lab
from appliance.scan.portlists import format_port_list

pytestmark = [pytest.mark.netns, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SCAN_TIMEOUT_S = 180


def run_scan(lab, args, *, wrap=(), env=None):
    """Run ``vsa scan`` (python -m appliance.scan.command) in the hub namespace; (rc, results, stderr)."""
    argv = lab.hub_argv([*wrap, sys.executable, "-m", "appliance.scan.command", *args, "--format", "json"])
    argv[0] = shutil.which("ip") or argv[0]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=SCAN_TIMEOUT_S, cwd=ROOT, env=env)
    results = json.loads(done.stdout) if done.returncode == 0 else None
    return done.returncode, results, done.stderr


def by_key(results):
    return {r["host_key"]: r for r in results}


def open_tcp(result):
    return {p["port"] for p in result["ports"] if p["proto"] == "tcp"}


@pytest.fixture
def portlab(netns_lab):
    require_tool("nft")
    return build_port_lab(netns_lab, answering=3, ports_per_host=6)


def probe_spec(portlab):
    """Ports for the connect engine: the low range, every truly open port, and high ranges around none."""
    ports = set(range(1, 1025)) | set(range(60000, 60500))
    for open_ports in portlab.open_ports.values():
        ports |= set(open_ports)
    return format_port_list(sorted(ports))


def assert_lab_exact(portlab, results, *, discovery=True):
    got = by_key(results)
    assert set(got) == set(portlab.all_ips), "one HostResult per target"
    for ip, truth in portlab.open_ports.items():
        assert got[ip]["status"] == "scanned", got[ip]
        assert open_tcp(got[ip]) == set(truth), f"{ip}: expected exactly {sorted(truth)}"
        assert all(p["state"] == "open" for p in got[ip]["ports"])
    for ip in (portlab.dropping_ip, portlab.empty_ip):
        if discovery:
            assert got[ip]["status"] == "down", got[ip]
        else:
            assert got[ip]["status"] == "scanned", got[ip]
        assert got[ip]["ports"] == []


def test_syn_engine_full_range_exact(portlab):
    """All 65,535 ports: every open port found, nothing else; silent host and empty address down."""
    rc, results, err = run_scan(portlab.lab, [*portlab.all_ips, "--ports", "full", "--rate", "100000",
                                              "--service-detection", "none"])
    assert rc == 0, err
    assert_lab_exact(portlab, results)
    for r in results:
        assert not any("connect engine" in e for e in r["errors"]), r["errors"]


def test_connect_engine_exact(portlab):
    rc, results, err = run_scan(portlab.lab, [*portlab.all_ips, "--ports", probe_spec(portlab),
                                              "--engine", "connect", "--service-detection", "none"])
    assert rc == 0, err
    assert_lab_exact(portlab, results)


@pytest.mark.parametrize("engine", ["syn", "connect"])
def test_no_discovery_classifies_filtered_and_empty(portlab, engine):
    """host_discovery none: every target is scanned; the silent ones report no ports, saying why."""
    rc, results, err = run_scan(portlab.lab, [*portlab.all_ips, "--ports", "22,80,443,3001,8080",
                                              "--no-discovery", "--engine", engine,
                                              "--service-detection", "none"])
    assert rc == 0, err
    got = by_key(results)
    for ip, truth in portlab.open_ports.items():
        assert open_tcp(got[ip]) == set(truth) & {22, 80, 443, 3001, 8080}
    dropping = got[portlab.dropping_ip]
    assert dropping["status"] == "scanned" and dropping["ports"] == []
    assert any("every port filtered" in e for e in dropping["errors"]), dropping["errors"]
    empty = got[portlab.empty_ip]
    assert empty["status"] == "scanned" and empty["ports"] == []
    assert empty["errors"], "the empty address says why it has no ports"


def test_fallback_to_connect_without_cap_net_raw(portlab):
    """Without CAP_NET_RAW the connect engine runs, with the same results, and says so."""
    setpriv = require_tool("setpriv")
    wrap = [setpriv, "--inh-caps=-net_raw", "--bounding-set=-net_raw", "--"]
    rc, results, err = run_scan(portlab.lab, [*portlab.all_ips, "--ports", probe_spec(portlab),
                                              "--service-detection", "none"], wrap=wrap)
    assert rc == 0, err
    assert_lab_exact(portlab, results)
    assert "CAP_NET_RAW" in err and "connect engine" in err
    scanned = [r for r in results if r["status"] == "scanned"]
    assert all(any("CAP_NET_RAW" in e and "connect engine" in e for e in r["errors"]) for r in scanned)


def test_services_from_banners(portlab):
    ip = portlab.answering_ips[0]
    rc, results, err = run_scan(portlab.lab, [ip, "--ports", "22,80,443"])
    assert rc == 0, err
    ports = {p["port"]: p for p in results[0]["ports"]}
    assert ports[22]["service"] == "ssh" and ports[22]["banner"] == SSH_BANNER
    assert (ports[22]["product"], ports[22]["version"]) == ("OpenSSH", "9.2p1")
    assert ports[80]["service"] == "http" and (ports[80]["product"], ports[80]["version"]) == ("nginx", "1.22.1")
    assert ports[443]["service"] == "https" and f"CN={TLS_SUBJECT_CN}" in ports[443]["banner"]


def test_nmap_detection_falls_back_when_nmap_is_missing(portlab, tmp_path):
    ip = portlab.answering_ips[0]
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no nmap on the PATH
    rc, results, err = run_scan(portlab.lab, [ip, "--ports", "22", "--service-detection", "nmap"], env=env)
    assert rc == 0, err
    (result,) = results
    assert result["ports"][0]["product"] == "OpenSSH"
    assert any("nmap is not installed" in e and "banner" in e for e in result["errors"])


def test_nmap_detection_when_installed(portlab):
    require_tool("nmap")
    ip = portlab.answering_ips[0]
    rc, results, err = run_scan(portlab.lab, [ip, "--ports", "22", "--service-detection", "nmap"])
    assert rc == 0, err
    port = results[0]["ports"][0]
    assert port["service"] == "ssh" and port["product"] == "OpenSSH" and port["version"].startswith("9.2p1")
    assert results[0]["errors"] == []


# ---- scope: forbidden and excluded addresses are never probed ---------------------------------


def start_capture(lab, pcap: Path):
    tcpdump = require_tool("tcpdump")
    proc = lab.popen(lab.hub, [tcpdump, "-i", "any", "-n", "-U", "-w", str(pcap), "ip or ip6"],
                     stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    line = b""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if b"listening on" in line:
            return proc
    pytest.fail(f"tcpdump did not start: {line!r}")


def stop_capture(proc):
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("discovery", [True, False], ids=["discovery", "no-discovery"])
@pytest.mark.parametrize("engine", ["syn", "connect"])
def test_forbidden_and_excluded_targets_are_never_probed(portlab, tmp_path, engine, discovery):
    lab = portlab.lab
    # Give the forbidden addresses something to answer with, so a probe would be seen and answered.
    lab.add_hub_address("127.0.0.5/32")
    lab.add_hub_address("169.254.169.254/32")
    excluded_ip, scanned_ip = portlab.answering_ips[0], portlab.answering_ips[1]
    forbidden = ["127.0.0.5", "169.254.169.254", lab.scanner_ip]
    pcap = tmp_path / "scan.pcap"
    capture = start_capture(lab, pcap)
    try:
        rc, results, err = run_scan(lab, [*forbidden, excluded_ip, scanned_ip, "--exclude", excluded_ip,
                                          "--ports", "22,80,443", "--engine", engine,
                                          *([] if discovery else ["--no-discovery"])])
    finally:
        time.sleep(0.5)  # let tcpdump write the last packets
        stop_capture(capture)
    assert rc == 0, err
    got = by_key(results)
    for ip in forbidden:
        assert (got[ip]["status"], got[ip]["reason"]) == ("excluded", "out_of_scope")
        assert got[ip]["ports"] == []
    assert (got[excluded_ip]["status"], got[excluded_ip]["reason"]) == ("excluded", "excluded_by_job")
    assert open_tcp(got[scanned_ip]) == {22, 80, 443}

    from scapy.layers.inet import IP
    from scapy.utils import rdpcap

    packets = [p[IP] for p in rdpcap(str(pcap)) if IP in p]
    require(len(packets) > 0, "tcpdump captured nothing")
    destinations = {p.dst for p in packets}
    assert scanned_ip in destinations, "the capture sees the scan"
    for ip in [*forbidden, excluded_ip]:
        if ip == lab.scanner_ip:
            # The scanner's own address is the source of every probe and the destination of the
            # answers; a probe *to* it would come from it too: no packet may go from it to itself.
            assert not [p for p in packets if p.src == ip and p.dst == ip]
        else:
            assert ip not in destinations, f"a packet was sent to {ip}"


SYNPROXY_RULES = """
table ip vsasynproxy {
  chain pre { type filter hook prerouting priority raw; policy accept; tcp flags syn notrack; }
  chain in { type filter hook input priority filter; policy accept;
    ct state invalid,untracked tcp dport 1-65535 synproxy mss 1460 wscale 7 timestamp sack-perm
    ct state invalid drop
  }
}
"""


def test_synproxy_artefacts_are_reverified(netns_lab):
    """A host behind an nftables SYN proxy answers SYN-ACK on every port; only real ones are reported."""
    require_tool("nft")
    portlab = build_port_lab(netns_lab, answering=1, dropping=False, empty=False)
    host = portlab.hosts[portlab.answering_ips[0]]
    done = subprocess.run(host.exec_argv(["nft", "-f", "-"]), input=SYNPROXY_RULES, text=True,
                          capture_output=True, timeout=30)
    require(done.returncode == 0, f"nftables synproxy unavailable here: {done.stderr.strip()}")
    netns_lab.host_run(host, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0", check=False)
    rc, results, err = run_scan(netns_lab, [host.ip, "--ports", "1-2000", "--service-detection", "none"])
    assert rc == 0, err
    (result,) = results
    assert open_tcp(result) == set(portlab.open_ports[host.ip]) & set(range(1, 2001))
    assert any("implausibly many" in e and "re-verified" in e for e in result["errors"]), result["errors"]


def test_udp_light_ports(portlab):
    """UDP: a port that answers is open; ports that refuse (ICMP unreachable) are not reported."""
    ip = portlab.answering_ips[0]
    rc, results, err = run_scan(portlab.lab, [ip, "--ports", "22", "--udp-ports", "53,123,161",
                                              "--service-detection", "none"])
    assert rc == 0, err
    udp = {(p["port"], p["state"]) for p in results[0]["ports"] if p["proto"] == "udp"}
    assert udp == {(53, "open")}


@pytest.mark.parametrize("engine", ["syn", "connect"])
def test_discovery_refusal_and_icmp_prove_a_host_alive(netns_lab, engine):
    """A host with no open port (it refuses: RST) is alive; so is one that drops TCP but answers ping."""
    require_tool("nft")
    refusing = netns_lab.add_host("refuse")
    pinging = netns_lab.add_host("ping")
    netns_lab.host_run(pinging, "nft", "add table inet vsatcpdrop")
    netns_lab.host_run(pinging, "nft",
                       "add chain inet vsatcpdrop input { type filter hook input priority 0 ; policy accept ; }")
    netns_lab.host_run(pinging, "nft", "add rule inet vsatcpdrop input meta l4proto tcp drop")
    rc, results, err = run_scan(netns_lab, [refusing.ip, pinging.ip, "--ports", "light", "--engine", engine])
    assert rc == 0, err
    got = by_key(results)
    assert got[refusing.ip]["status"] == "scanned" and got[refusing.ip]["ports"] == []
    assert got[refusing.ip]["errors"] == []
    assert got[pinging.ip]["status"] == "scanned" and got[pinging.ip]["ports"] == []
    assert any("every port filtered" in e for e in got[pinging.ip]["errors"])
