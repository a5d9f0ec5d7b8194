"""Pure parts of the demo and its fleet: the knowledge base from dpkg, the table, wire round trips, phases."""

from __future__ import annotations

import pytest

from appliance.kb.match import KnowledgeBase
from appliance.lab.demo import host_result_from_wire, phase_durations, results_table
from appliance.lab.fleet import FIX_SUFFIX, InstalledPackage, debian_ecosystem, knowledge_base
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

PACKAGES = [
    InstalledPackage("libssl3", "3.0.15-1~deb12u1", "openssl", "3.0.15-1~deb12u1"),
    InstalledPackage("openssl", "3.0.15-1~deb12u1", "openssl", "3.0.15-1~deb12u1"),
    InstalledPackage("openssh-client", "1:9.2p1-2+deb12u3", "openssh", "1:9.2p1-2+deb12u3"),
    InstalledPackage("sudo", "1.9.13p3-1+deb12u1", "sudo", "1.9.13p3-1+deb12u1"),
    InstalledPackage("zlib1g", "1:1.2.13.dfsg-1+b1", "zlib", "1:1.2.13.dfsg-1"),
]


def test_knowledge_base_affects_each_binary_of_the_chosen_sources() -> None:
    records, by_ecosystem = knowledge_base(PACKAGES, "Debian:12")
    expected = by_ecosystem["Debian:12"]
    assert {(f.id, f.package, f.source_package, f.fixed) for f in by_ecosystem["Ubuntu:22.04:LTS"]} == {
        ("VSA-DEMO-2026-0103", "libssl3", "openssl", None), ("VSA-DEMO-2026-0103", "openssl", None, None)}
    assert {(f.id, f.package, f.source_package) for f in expected} == {
        ("VSA-DEMO-2026-0001", "libssl3", "openssl"), ("VSA-DEMO-2026-0001", "openssl", None),
        ("VSA-DEMO-2026-0002", "openssh-client", "openssh"), ("VSA-DEMO-2026-0003", "sudo", None)}
    fixed = {f.package: f.fixed for f in expected}
    assert fixed["libssl3"] == "3.0.15-1~deb12u1" + FIX_SUFFIX
    assert {r["id"] for r in records} >= {"VSA-DEMO-2026-0101", "VSA-DEMO-2026-0102", "VSA-DEMO-2026-0103"}


@pytest.mark.parametrize("ecosystem", ["Debian:12", "Ubuntu:22.04:LTS"])
def test_knowledge_base_agrees_with_the_appliance_matcher(ecosystem: str) -> None:
    """The ground truth and the appliance's matcher read the same records the same way."""
    records, expected = knowledge_base(PACKAGES, "Debian:12")
    packages = Packages("dpkg", ecosystem, tuple(Package(p.name, p.version, "amd64", p.source_name,
                                                           p.source_version) for p in PACKAGES))
    found = KnowledgeBase.from_records(records).match(packages)
    assert sorted((f.id, f.package, f.source_package, f.installed, f.fixed, f.severity) for f in found) == sorted(
        (f.id, f.package, f.source_package, f.installed, f.fixed, f.severity) for f in expected[ecosystem])


def test_knowledge_base_skips_sources_not_installed() -> None:
    records, expected = knowledge_base(PACKAGES[:2], "Debian:12")
    assert {f.id for f in expected["Debian:12"]} == {"VSA-DEMO-2026-0001"}
    assert not any(r["id"] == "VSA-DEMO-2026-0002" for r in records)


def test_debian_ecosystem_names() -> None:
    assert debian_ecosystem({"ID": "debian", "VERSION_ID": "12"}) == "Debian:12"
    assert debian_ecosystem({"ID": "ubuntu", "VERSION_ID": "22.04", "VERSION": "22.04.4 LTS (Jammy)"}) == "Ubuntu:22.04:LTS"


def sample() -> HostResult:
    return HostResult(
        target=Target(ip="10.77.0.10", instance_id="i-0123456789abcdef0", region="us-east-1",
                      tags={"Name": "app1", "env": "demo"}),
        status="scanned", started_at="2026-12-04T10:00:00Z", finished_at="2026-12-04T10:00:05Z",
        ports=[Port("tcp", 22, service="ssh", banner="SSH-2.0-OpenSSH_9.2p1", product="OpenSSH", version="9.2p1")],
        os=OsInfo("linux", "Debian GNU/Linux", "12", "6.1.0", "x86_64", "ssh"),
        auth=[AuthOutcome("rec-1", "unix", "success", True, "ok"), AuthOutcome(None, "windows", "not_applicable")],
        packages=Packages("dpkg", "Debian:12", (Package("sudo", "1.9", "amd64", "sudo", "1.9"),)),
        findings=[Finding("CVE-1", "osv", 5, "t", "sudo", None, "1.9", "2.0"),
                  Finding("VSA-SMB-0002", "vsa", 3, "s", detection="network", evidence="e")],
        instance_metadata={"instance-id": "i-0123456789abcdef0"},
        errors=["note"],
    )


def test_wire_round_trip() -> None:
    result = sample()
    assert host_result_from_wire(result.to_wire()).to_wire() == result.to_wire()
    excluded = HostResult(target=Target(ip="10.77.0.20", instance_id="i-1"), status="excluded", reason="terminated")
    assert host_result_from_wire(excluded.to_wire()).to_wire() == excluded.to_wire()


def test_results_table_one_row_per_host() -> None:
    down = HostResult(target=Target(ip="10.77.0.15", instance_id="i-2", tags={"Name": "vault"}), status="down")
    table = results_table([sample(), down])
    lines = table.splitlines()
    assert lines[0].split() == ["host", "address", "instance", "status", "open", "ports", "auth", "os", "pkgs",
                                "findings"]
    assert lines[2].split() == ["app1", "10.77.0.10", "i-0123456789abcdef0", "scanned", "22", "unix:success(root)",
                                "Debian", "GNU/Linux", "12", "1", "crit:1", "med:1"]
    assert lines[3].split()[:4] == ["vault", "10.77.0.15", "i-2", "down"]
    assert lines[-1] == "2 hosts: 1 scanned, 1 down, 0 excluded; 1 open ports, 2 findings"


def test_phase_durations() -> None:
    events = [("accept", 0.1), ("phase:resolving", 0.2), ("phase:discovery", 0.5), ("first_result", 0.9),
              ("phase:scanning", 2.5), ("phase:uploading", 6.0), ("last_result", 6.1), ("complete", 6.3)]
    assert phase_durations(events) == {"pickup": 0.1, "total": 6.3, "resolving": 0.3, "discovery": 2.0,
                                       "scanning": 3.5, "uploading": 0.3}
