"""Port lists: named rankings, explicit lists, provenance (appliance.scan.portlists)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.scan.portlists import (
    TCP_RANKING_FILE,
    UDP_RANKING_FILE,
    PortSpecError,
    derive_ranking,
    format_port_list,
    parse_port_list,
    tcp_ports,
    tcp_ranking,
    udp_ports,
)

NMAP_SERVICES = Path("/usr/share/nmap/nmap-services")


def test_named_tcp_lists_have_their_sizes():
    assert len(tcp_ports("light")) == 100
    assert len(tcp_ports("standard")) == 1000
    assert tcp_ports("full") == tuple(range(1, 65536))
    assert set(tcp_ports("light")) <= set(tcp_ports("standard"))
    for common in (22, 80, 443, 445, 3389):
        assert common in tcp_ports("light")
    assert tcp_ranking()[:3] == (80, 23, 443)  # nmap's published top three


def test_udp_lists():
    assert udp_ports("none") == ()
    light = udp_ports("light")
    assert len(light) == 20 and {53, 123, 161} <= set(light)
    assert udp_ports("53,161-162") == (53, 161, 162)


def test_explicit_list():
    assert tcp_ports("22,80,443,8000-8003") == (22, 80, 443, 8000, 8001, 8002, 8003)
    assert tcp_ports(" 443 , 22,22, 1-2") == (1, 2, 22, 443)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("22,,80", "empty item at position 2"),
        ("22,http", "'http', which is neither a port"),
        ("0", "port 0 is outside 1-65535"),
        ("22,65536", "port 65536 is outside"),
        ("90-80", "ends before it starts"),
        ("22-", "neither a port nor"),
        ("-5", "neither a port nor"),
        ("none", "names no ports"),
    ],
)
def test_errors_name_the_bad_item(spec, words):
    with pytest.raises(PortSpecError) as info:
        tcp_ports(spec)
    assert words in str(info.value)
    assert str(info.value).startswith("tcp_ports: ")


def test_udp_errors_name_their_field():
    with pytest.raises(PortSpecError, match=r"^udp_ports: "):
        udp_ports("53,x")


@given(st.sets(st.integers(min_value=1, max_value=65535), min_size=1, max_size=300))
def test_format_and_parse_round_trip(ports):
    assert parse_port_list(format_port_list(sorted(ports))) == tuple(sorted(ports))


def test_data_files_carry_provenance():
    for path in (TCP_RANKING_FILE, UDP_RANKING_FILE):
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        text = "\n".join(header)
        assert "Source:" in text and "nmap" in text and "Derived:" in text and "Generated:" in text


def test_shipped_ranking_matches_the_installed_nmap_data():
    if not NMAP_SERVICES.exists():
        pytest.skip("nmap-services not installed: provenance cannot be re-derived here")
    text = NMAP_SERVICES.read_text()
    if "38442" not in text:
        pytest.skip("a different nmap-services revision is installed")
    assert derive_ranking(text, "tcp", 1000) == tcp_ranking()


@pytest.mark.parametrize("count, name", [(100, "light"), (1000, "standard")])
def test_same_sets_as_nmap_top_ports(count, name):
    """nmap lists its --top-ports set in XML without any target (nothing is sent)."""
    nmap = shutil.which("nmap")
    if nmap is None:
        pytest.skip("nmap not installed")
    xml = subprocess.run([nmap, "-n", "-sT", "--top-ports", str(count), "-oX", "-"],
                         capture_output=True, text=True, timeout=30).stdout
    services = re.search(r'\sservices="([^"]+)"', xml).group(1)
    assert parse_port_list(services) == tcp_ports(name)
