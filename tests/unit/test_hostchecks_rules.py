"""The rules of appliance.scan.hostchecks that need no network: auth[] shape, skips, KB matching."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.authrecords import AuthRecord, parse_auth_record
from appliance.kb.match import KnowledgeBase
from appliance.results import AuthOutcome, HostResult, OsInfo, Package, Packages, Port, Target
from appliance.scan import hostchecks
from appliance.scan.smb import WindowsCheck
from appliance.scan.ssh import UnixCheck


def unix(rid: str, targets: list[str], port: int = 22) -> AuthRecord:
    return parse_auth_record({"type": "unix", "id": rid, "username": "u", "password": "pw-unit-1",
                              "port": port, "targets": targets})


def windows(rid: str, targets: list[str]) -> AuthRecord:
    return parse_auth_record({"type": "windows", "id": rid, "username": "u", "password": "pw-unit-2",
                              "targets": targets})


def host(ip: str = "10.9.0.5", status: str = "scanned", ports: tuple[int, ...] = ()) -> HostResult:
    return HostResult(target=Target(ip=ip), status=status,  # type: ignore[arg-type]
                      ports=[Port("tcp", p) for p in ports])


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[hostchecks.CheckContext]:
    context = hostchecks.make_check_context(tmp_path / "state", kb=None, max_parallel_hosts=2)
    yield context
    context.close()


def run(result: HostResult, records: list[AuthRecord], ctx: hostchecks.CheckContext, **kw: object) -> None:
    options: dict[str, object] = {"job_type": "vm_scan", "authentication": True, "is_ec2": False}
    options.update(kw)
    asyncio.run(hostchecks.run_host_checks(result, records, ctx, **options))  # type: ignore[arg-type]


# ---- which records apply ----------------------------------------------------------------


def test_applying_records_keep_the_job_order_per_type() -> None:
    records = [unix("u1", ["10.9.0.0/24"]), windows("w1", ["10.9.0.5"]), unix("u2", ["10.9.0.5/32"]),
               unix("u3", ["10.8.0.0/16"])]
    u, w = hostchecks.applying_records("10.9.0.5", records)
    assert [r.id for r in u] == ["u1", "u2"]
    assert [r.id for r in w] == ["w1"]


def test_not_applicable_only_for_types_present_without_an_applying_record() -> None:
    records = [unix("u1", ["10.8.0.0/16"]), windows("w1", ["10.9.0.0/24"])]
    entries = hostchecks.not_applicable_entries("10.9.0.5", records)
    assert [(e.record_id, e.type, e.status) for e in entries] == [(None, "unix", "not_applicable")]
    # A type absent from the job has no entry at all.
    assert hostchecks.not_applicable_entries("10.9.0.5", [unix("u1", ["10.8.0.0/16"])])[0].type == "unix"
    assert hostchecks.not_applicable_entries("10.9.0.5", []) == []
    assert hostchecks.not_applicable_entries("10.9.0.5", [windows("w1", ["10.9.0.5"])]) == []


def test_port_not_open_only_when_the_scan_covered_it() -> None:
    result = host(ports=(445,))
    assert hostchecks.port_not_open(result, 22, None) is None  # no knowledge: try
    assert hostchecks.port_not_open(result, 22, {80, 443}) is None  # not covered: try
    assert hostchecks.port_not_open(result, 445, {22, 445}) is None  # open
    words = hostchecks.port_not_open(result, 22, {22, 445})
    assert words == "port 22/tcp was not open in this scan (closed or filtered): not tried"


def test_best_unix_prefers_a_privileged_success_then_the_first_success() -> None:
    def c(rid: str, status: str, privileged: bool) -> UnixCheck:
        return UnixCheck("10.9.0.5", 22, AuthOutcome(rid, "unix", status, privileged))  # type: ignore[arg-type]

    assert hostchecks.best_unix([c("a", "failed", False), c("b", "success", False),
                                 c("c", "success", True)]).auth.record_id == "c"  # type: ignore[union-attr]
    assert hostchecks.best_unix([c("a", "success", False), c("b", "success", False)]).auth.record_id == "a"  # type: ignore[union-attr]
    assert hostchecks.best_unix([c("a", "error", False)]) is None


# ---- what run_host_checks does without touching the network --------------------------------


@pytest.mark.parametrize("status", ["down", "excluded", "unreachable", "error"])
def test_only_scanned_hosts_are_checked(ctx: hostchecks.CheckContext, status: str) -> None:
    result = host(status=status)
    run(result, [unix("u1", ["10.9.0.0/24"]), windows("w1", ["10.8.0.0/24"])], ctx)
    assert result.auth == [] and result.errors == []


@pytest.mark.parametrize("kw", [{"job_type": "discovery"}, {"authentication": False}])
def test_discovery_and_authentication_off_give_no_auth_entries(ctx: hostchecks.CheckContext,
                                                               kw: dict[str, object]) -> None:
    result = host()
    run(result, [unix("u1", ["10.9.0.0/24"]), windows("w1", ["10.8.0.0/24"])], ctx, **kw)
    assert result.auth == []


def test_closed_ports_are_not_tried_and_entries_follow_protocol(ctx: hostchecks.CheckContext) -> None:
    # u1 and w1 apply, both ports were scanned and found closed: errors, no connection made.
    # u2 does not apply (another network): no entry of its own. No windows not_applicable
    # entry because w1 applies.
    records = [unix("u1", ["10.9.0.0/24"]), unix("u2", ["10.8.0.0/24"]), windows("w1", ["10.9.0.5"])]
    result = host(ports=(80,))
    run(result, records, ctx, scanned_tcp_ports={22, 80, 445})
    assert [(a.record_id, a.type, a.status) for a in result.auth] == [
        ("u1", "unix", "error"), ("w1", "windows", "error")]
    assert all("not open in this scan" in (a.message or "") for a in result.auth)


def test_not_applicable_entries_sit_with_their_type(ctx: hostchecks.CheckContext) -> None:
    records = [unix("u1", ["10.8.0.0/24"]), windows("w1", ["10.9.0.5"])]
    result = host()
    run(result, records, ctx, scanned_tcp_ports={22, 445})
    assert [(a.record_id, a.type, a.status) for a in result.auth] == [
        (None, "unix", "not_applicable"), ("w1", "windows", "error")]
    result = host()
    run(result, [unix("u1", ["10.9.0.5"], port=2222), windows("w1", ["10.8.0.0/24"])], ctx,
        scanned_tcp_ports={2222})
    assert [(a.record_id, a.type, a.status) for a in result.auth] == [
        ("u1", "unix", "error"), (None, "windows", "not_applicable")]
    assert "port 2222/tcp" in (result.auth[0].message or "")


OSV = {"id": "VSA-TEST-1", "summary": "a test advisory", "database_specific": {"severity": 4},
       "affected": [{"package": {"ecosystem": "Debian:12", "name": "openssl"},
                     "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.0.99-1"}]}]}]}
PACKAGES = Packages("dpkg", "Debian:12", (
    Package("libssl3", "3.0.15-1~deb12u1", "amd64", "openssl", "3.0.15-1~deb12u1"),
    Package("openssl", "3.0.15-1~deb12u1", "amd64", "openssl", "3.0.15-1~deb12u1"),
    Package("bash", "5.2.15-2+b7", "amd64", "bash", "5.2.15-2")))


def test_packages_are_matched_once_known(tmp_path: Path) -> None:
    kb = KnowledgeBase.from_records([OSV])
    ctx = hostchecks.make_check_context(tmp_path, kb=kb, max_parallel_hosts=1)
    try:
        result = host()
        result.packages = PACKAGES  # as a unix check would have left them
        run(result, [], ctx)
        got = sorted((f.id, f.package, f.source_package, f.installed, f.fixed, f.severity) for f in result.findings)
        assert got == [("VSA-TEST-1", "libssl3", "openssl", "3.0.15-1~deb12u1", "3.0.99-1", 4),
                       ("VSA-TEST-1", "openssl", None, "3.0.15-1~deb12u1", "3.0.99-1", 4)]
        assert result.auth == []  # no record in the job: no type present, no entry
        run(result, [], ctx)  # a second pass adds nothing twice
        assert len(result.findings) == 2
    finally:
        ctx.close()


def test_no_knowledge_base_is_said(ctx: hostchecks.CheckContext) -> None:
    result = host()
    result.packages = PACKAGES
    run(result, [], ctx)
    assert result.findings == [] and result.errors == [hostchecks.NO_KB_NOTE]
    quiet = ctx.__class__(ctx.ssh_executor, ctx.smb_executor, ctx.pins, None, no_kb_note=None)
    result = host()
    result.packages = PACKAGES
    run(result, [], quiet)
    assert result.errors == []


def test_with_kb_shares_pools_and_pins(ctx: hostchecks.CheckContext) -> None:
    kb = KnowledgeBase.from_records([OSV])
    other = ctx.with_kb(kb)
    assert other.kb is kb and other.ssh_executor is ctx.ssh_executor and other.pins is ctx.pins


# ---- the Windows preflight ------------------------------------------------------------------


def test_windows_preflight_words() -> None:
    refused = WindowsCheck("10.9.0.5", AuthOutcome("w", "windows", "error", False,
                                                   "could not try: connection refused on port 445"))
    report = hostchecks.windows_preflight(refused, "10.9.0.5")
    assert not report.ok
    assert report.connect.ok is False and "connection refused" in report.connect.detail
    failed = WindowsCheck("10.9.0.5", AuthOutcome("w", "windows", "failed", False, "logon failure"),
                          dialects=("3.1.1",))
    report = hostchecks.windows_preflight(failed, "10.9.0.5")
    assert report.connect.ok and report.authenticate.ok is False and not report.ok
    ok = WindowsCheck("10.9.0.5", AuthOutcome("w", "windows", "success", False, "NTLMv2 login accepted"),
                      dialects=("3.1.1",), os=OsInfo(family="unix", name="Samba", source="smb"),
                      notes=("no remote registry",))
    report = hostchecks.windows_preflight(ok, "10.9.0.5")
    assert report.ok, report.lines()
    assert report.lines()[1:] == [
        "  ok   connect: SMB dialects 3.1.1",
        "  ok   authenticate: NTLMv2 login accepted",
        "  --   admin: not an administrator: the registry may say less",
        "  ok   collectors: OS Samba; no remote registry",
    ]


def test_complete_auth_fills_what_is_missing_in_protocol_order() -> None:
    records = [windows("w1", ["10.9.0.5"]), unix("u1", ["10.9.0.5"]), unix("u2", ["10.9.0.0/24"])]
    result = host()
    result.auth.append(AuthOutcome("u2", "unix", "success", True))
    hostchecks.complete_auth(result, records, "stopped")
    assert [(a.record_id, a.type, a.status, a.message) for a in result.auth] == [
        ("u2", "unix", "success", None), ("u1", "unix", "error", "stopped"),
        ("w1", "windows", "error", "stopped")]
    hostchecks.complete_auth(result, records, "again")  # idempotent
    assert len(result.auth) == 3
    other = host("10.7.0.1")
    hostchecks.complete_auth(other, records, "x")
    assert [(a.record_id, a.type, a.status) for a in other.auth] == [
        (None, "unix", "not_applicable"), (None, "windows", "not_applicable")]
