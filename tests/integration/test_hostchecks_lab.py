"""run_host_checks against a real sshd, a real Samba and a bare host in a namespace lab.

The checker's pools live in the lab's hub namespace (make_check_context's
executor_factory); the HostResults are the ones the port scan would hand over
(status ``scanned`` with the open ports). The knowledge base is a bundle file
written by the test whose advisory matches this machine's installed openssl.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostchecks_lab import HcLab, LabKb, build, prerequisites, write_kb

from appliance.authrecords import AuthRecord, parse_auth_record
from appliance.kb.match import KnowledgeBase
from appliance.lab.netns import netns_executor
from appliance.results import HostResult, Port, Target
from appliance.scan import hostchecks
from appliance.scan.ssh import SshTimeouts
from tests.conftest import require

pytestmark = [pytest.mark.netns]

TIMEOUTS = SshTimeouts(connect_s=3, handshake_s=5, auth_s=5, command_s=30, delegation_s=4, imds_s=10)


@pytest.fixture(scope="module")
def hc() -> Iterator[HcLab]:
    reason = prerequisites()
    require(reason is None, reason or "")
    with build() as lab:
        yield lab


@pytest.fixture(scope="module")
def kb(hc: HcLab) -> LabKb:
    return write_kb(hc.workdir / "kb.jsonl.gz")


def context(hc: HcLab, tmp_path: Path, kb: KnowledgeBase | None) -> hostchecks.CheckContext:
    return hostchecks.make_check_context(
        tmp_path / "state", kb=kb, max_parallel_hosts=4, ssh_timeouts=TIMEOUTS, smb_timeout_s=20,
        executor_factory=lambda n, _name: netns_executor(hc.lab.hub, n))


def unix_record(rid: str, hc: HcLab, targets: list[str], *, key: str = "good", method: str = "sudo",
                port: int = 22) -> AuthRecord:
    k = {"good": hc.key, "pass": hc.key_pass, "wrong": hc.wrong_key}[key]
    return parse_auth_record({
        "type": "unix", "id": rid, "title": "lab", "username": "vsa-hcs",
        "private_keys": [{"pem": k.pem, "passphrase": k.passphrase, "certificate": None}],
        "root_delegation": {"method": method, "password": None}, "port": port, "targets": targets})


def windows_record(rid: str, hc: HcLab, targets: list[str], password: str | None = None) -> AuthRecord:
    return parse_auth_record({
        "type": "windows", "id": rid, "title": "lab", "domain": None, "username": hc.smb_user,
        "password": password or hc.smb_password, "nt_hash": None, "protocols": ["ntlmv2"],
        "targets": targets})


def scanned(ip: str, *ports: int) -> HostResult:
    return HostResult(target=Target(ip=ip), status="scanned", ports=[Port("tcp", p) for p in ports])


def auth_rows(result: HostResult) -> list[tuple[str | None, str, str]]:
    return [(a.record_id, a.type, a.status) for a in result.auth]


async def test_a_linux_host_windows_host_and_bare_host_in_one_job(hc: HcLab, kb: LabKb, tmp_path: Path) -> None:
    ctx = context(hc, tmp_path, KnowledgeBase.load(kb.path))
    records = [
        unix_record("rec-good", hc, [hc.linux_ip, hc.bare_ip], key="pass"),
        unix_record("rec-wrong", hc, [hc.linux_ip], key="wrong"),
        windows_record("rec-win", hc, [hc.win_ip]),
    ]
    linux, win, bare = scanned(hc.linux_ip, 22), scanned(hc.win_ip, 445), scanned(hc.bare_ip)
    try:
        await asyncio.gather(*(
            hostchecks.run_host_checks(r, records, ctx, job_type="vm_scan", authentication=True,
                                       is_ec2=False, scanned_tcp_ports={22, 445})
            for r in (linux, win, bare)))
    finally:
        ctx.close()

    # Linux: both unix records apply and each has its own entry; no windows record applies.
    assert auth_rows(linux) == [("rec-good", "unix", "success"), ("rec-wrong", "unix", "failed"),
                                (None, "windows", "not_applicable")], linux.auth
    assert linux.auth[0].privileged is True
    assert linux.os is not None and linux.os.family == "linux" and linux.os.source == "ssh"
    assert linux.packages is not None and linux.packages.manager == "dpkg"
    names = {p.name for p in linux.packages.items}
    assert {"libssl3", "openssl"} <= names
    hits = {f.package: f for f in linux.findings if f.id == kb.advisory}
    assert set(hits) >= {"libssl3"}, linux.findings
    f = hits["libssl3"]
    assert (f.source, f.severity, f.installed, f.fixed, f.source_package, f.detection) == (
        "osv", kb.severity, kb.installed, kb.fixed, kb.source, "package")
    if "openssl" in hits:  # the binary named like its source: no source_package
        assert hits["openssl"].source_package is None
    assert {x.id for x in linux.findings} == {kb.advisory}  # decoys never match
    # One finding per (advisory, installed package): every binary of the openssl source.
    sources = [p.name for p in linux.packages.items if p.source_name == kb.source]
    assert sorted(hits) == sorted(sources)

    # Windows: the unix type is present with no record for it; the SMB check logs in.
    assert auth_rows(win) == [(None, "unix", "not_applicable"), ("rec-win", "windows", "success")], win.auth
    assert win.os is not None and win.os.source == "smb"
    assert win.packages is None and all(x.detection == "network" for x in win.findings)
    assert any("signing" in x.title.lower() for x in win.findings), win.findings

    # Bare: rec-good applies but port 22 was scanned and closed: not tried, said so.
    assert auth_rows(bare) == [("rec-good", "unix", "error"), (None, "windows", "not_applicable")]
    assert "not open in this scan" in (bare.auth[0].message or "")


async def test_a_type_absent_from_the_job_has_no_entry_and_ports_not_scanned_are_tried(
        hc: HcLab, tmp_path: Path) -> None:
    ctx = context(hc, tmp_path, None)
    records = [unix_record("rec-good", hc, ["10.77.0.0/24"], method="none")]
    linux, bare = scanned(hc.linux_ip), scanned(hc.bare_ip)
    try:
        # No scanned_tcp_ports: every applying record is tried, even with no port known open.
        await asyncio.gather(*(
            hostchecks.run_host_checks(r, records, ctx, job_type="vm_scan", authentication=True,
                                       is_ec2=False) for r in (linux, bare)))
    finally:
        ctx.close()
    assert auth_rows(linux) == [("rec-good", "unix", "success")]
    assert linux.auth[0].privileged is False
    assert linux.packages is not None and linux.findings == []
    assert hostchecks.NO_KB_NOTE in linux.errors
    assert auth_rows(bare) == [("rec-good", "unix", "error")]
    assert "refused" in (bare.auth[0].message or ""), bare.auth


async def test_several_windows_records_do_not_repeat_findings(hc: HcLab, tmp_path: Path) -> None:
    ctx = context(hc, tmp_path, None)
    records = [windows_record("rec-w1", hc, [hc.win_ip]),
               windows_record("rec-w2", hc, [hc.win_ip], password="not-the-password-1"),
               windows_record("rec-w3", hc, [hc.win_ip])]
    win = scanned(hc.win_ip, 445)
    try:
        await hostchecks.run_host_checks(win, records, ctx, job_type="vm_scan", authentication=True,
                                         is_ec2=False, scanned_tcp_ports={445})
    finally:
        ctx.close()
    assert auth_rows(win) == [("rec-w1", "windows", "success"), ("rec-w2", "windows", "failed"),
                              ("rec-w3", "windows", "success")]
    ids = [(x.id, x.source) for x in win.findings]
    assert len(ids) == len(set(ids)) and ids
    assert "not-the-password-1" not in repr(win.to_wire())


async def test_discovery_jobs_and_authentication_off_touch_nothing(hc: HcLab, tmp_path: Path) -> None:
    ctx = context(hc, tmp_path, None)
    records = [unix_record("rec-good", hc, [hc.linux_ip]), windows_record("rec-win", hc, [hc.win_ip])]
    try:
        for kw in ({"job_type": "discovery", "authentication": True},
                   {"job_type": "vm_scan", "authentication": False}):
            result = scanned(hc.linux_ip, 22)
            await hostchecks.run_host_checks(result, records, ctx, is_ec2=False, **kw)  # type: ignore[arg-type]
            assert result.auth == [] and result.packages is None and result.errors == []
    finally:
        ctx.close()
    # Nothing was pinned either: no SSH connection was made.
    assert ctx.pins.pins() == []


async def test_a_host_timeout_still_leaves_one_entry_per_record(hc: HcLab, tmp_path: Path) -> None:
    ctx = context(hc, tmp_path, None)
    records = [unix_record("rec-good", hc, [hc.linux_ip]), windows_record("rec-win", hc, [hc.win_ip])]
    linux = scanned(hc.linux_ip, 22)
    try:
        with pytest.raises(TimeoutError):
            # The engine bounds each host with host_timeout_s the same way.
            await asyncio.wait_for(hostchecks.run_host_checks(
                linux, records, ctx, job_type="vm_scan", authentication=True, is_ec2=False), 0.05)
    finally:
        ctx.close()
    assert auth_rows(linux) == [("rec-good", "unix", "error"), (None, "windows", "not_applicable")]
    assert "stopped before" in (linux.auth[0].message or "")
