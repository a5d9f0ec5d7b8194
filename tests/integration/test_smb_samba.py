"""Authenticated Windows checks against a real Samba server in a network namespace.

Every test builds its own namespace lab (netns_lab) with one target running smbd
(appliance.lab.smblab) and runs the checker in threads that live in the lab's
hub namespace, so nothing is sent outside the namespaces the test created.
Samba's own JSON authentication audit log shows what the server saw (which
NTLM version, which domain), so the tests do not have to trust the checker's
word for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require
from impacket.ntlm import compute_nthash

from appliance.authrecords import WindowsRecord
from appliance.lab.netns import Host, NetnsLab, netns_executor
from appliance.lab.smblab import (
    SambaServer,
    SambaSettings,
    linux_user,
    samba_available,
)
from appliance.results import HostResult, Target
from appliance.scan.smb import RegistryPaths, WindowsCheck, check_windows

pytestmark = [pytest.mark.netns]

AUDIT = "1 auth_json_audit:3"  # smbd logs every authentication as one JSON line
CHECK_TIMEOUT_S = 20.0


@pytest.fixture(scope="session")
def smb_account() -> Iterator[tuple[str, str]]:
    """A Linux user for Samba accounts (machine-wide: created once, removed after)."""
    require(samba_available() is None, samba_available() or "")
    name = f"vsasmb{secrets.token_hex(3)}"
    password = f"Pw-{secrets.token_urlsafe(12)}"
    with linux_user(name):
        yield name, password


@pytest.fixture
def pool(netns_lab: NetnsLab) -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """The checker's thread pool, its threads in the lab's hub (scanner) namespace."""
    with netns_executor(netns_lab.hub, 8) as executor:
        yield executor


@pytest.fixture
def start_samba(netns_lab: NetnsLab, smb_account: tuple[str, str]) -> Iterator[Callable[..., SambaServer]]:
    """Start smbd on a new target of the lab, with the session's account added."""
    servers: list[SambaServer] = []
    workdirs: list[Path] = []

    def start(settings: SambaSettings | None = None, *, registry: list[tuple[str, ...]] | None = None) -> SambaServer:
        host = netns_lab.add_host(f"s{len(servers) + 1}")
        # samba's registry worker runs as the logged-in user: the folder must be traversable.
        workdir = Path(tempfile.mkdtemp(prefix="vsa-smb-"))
        workdir.chmod(0o755)
        workdirs.append(workdir)
        server = SambaServer(netns_lab, host, workdir, settings or SambaSettings())
        server.prepare()
        server.add_user(*smb_account)
        for command in registry or []:
            server.net("registry", *command)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


def record(account: tuple[str, str], **overrides: object) -> WindowsRecord:
    fields: dict[str, object] = {"id": "rec-w", "title": "lab", "username": account[0], "password": account[1]}
    fields.update(overrides)
    return WindowsRecord(**fields)  # type: ignore[arg-type]


async def check(server: SambaServer | Host, rec: WindowsRecord, pool: concurrent.futures.ThreadPoolExecutor,
                **kwargs: object) -> WindowsCheck:
    ip = server.ip
    return await check_windows(ip, rec, executor=pool, timeout_s=kwargs.pop("timeout_s", CHECK_TIMEOUT_S), **kwargs)  # type: ignore[arg-type]


def ids(result: WindowsCheck) -> set[str]:
    return {f.id for f in result.findings}


# ---- logins ---------------------------------------------------------------------------


async def test_local_user_with_password(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba(SambaSettings(log_level=AUDIT))
    result = await check(server, record(smb_account), pool)
    assert result.auth.status == "success", result
    assert result.auth.message == f"NTLMv2 login as {smb_account[0]} (local account) accepted"
    assert result.auth.privileged is False  # Samba has no ADMIN$
    assert result.protocol == "ntlmv2"
    assert result.dialects == ("2.0.2", "2.1", "3.0", "3.0.2", "3.1.1")
    assert result.smb1_enabled is False
    assert result.shares is not None and {(s.name, s.type) for s in result.shares} == {("data", "disk"), ("IPC$", "ipc")}
    assert result.os is not None and (result.os.family, result.os.name, result.os.source) == ("unix", "Samba", "smb")
    assert result.server.is_samba and result.server.netbios_name == "VSATARGET"
    assert result.errors == ()
    (event,) = [e for e in server.auth_events() if e["clientAccount"] == smb_account[0]]
    assert (event["passwordType"], event["status"]) == ("NTLMv2", "NT_STATUS_OK")

    host_result = HostResult(target=Target(ip=server.ip), status="scanned")
    result.apply_to(host_result)
    wire = json.loads(json.dumps(host_result.to_wire()))
    assert wire["auth"][0]["status"] == "success" and wire["os"]["source"] == "smb"
    assert any(f["id"] == "VSA-SMB-0002" and f["source"] == "vsa" for f in wire["findings"])


async def test_same_user_with_nt_hash(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba()
    nt_hash = compute_nthash(smb_account[1]).hex()
    result = await check(server, record(smb_account, password=None, nt_hash=nt_hash), pool)
    assert result.auth.status == "success", result
    assert result.shares is not None


async def test_wrong_password_is_failed(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba()
    result = await check(server, record(smb_account, password="Not-the-password-1"), pool)
    assert result.auth.status == "failed"
    assert "STATUS_LOGON_FAILURE" in (result.auth.message or "")
    assert result.shares is None and result.windows is None
    # The negotiate facts do not need a login.
    assert "VSA-SMB-0002" in ids(result)
    assert result.os is None and any("Build 0" in n for n in result.notes)


async def test_wrong_nt_hash_is_failed(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba()
    result = await check(server, record(smb_account, password=None, nt_hash="0" * 32), pool)
    assert result.auth.status == "failed"


# ---- NTLMv1 ---------------------------------------------------------------------------


async def test_ntlmv1_refused_by_the_default_server(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba(SambaSettings(log_level=AUDIT))  # ntlm auth = ntlmv2-only, Samba's default
    only_v1 = await check(server, record(smb_account, protocols=("ntlmv1",)), pool)
    # On the wire this is the answer to a wrong password: failed, and the message says so.
    assert only_v1.auth.status == "failed"
    assert "a server that refuses NTLMv1 answers the same way" in (only_v1.auth.message or "")
    assert only_v1.protocol is None and "VSA-SMB-0003" not in ids(only_v1)
    events = [e for e in server.auth_events() if e["clientAccount"] == smb_account[0]]
    assert [(e["passwordType"], e["status"]) for e in events] == [("NTLMv1", "NT_STATUS_WRONG_PASSWORD")]

    v1_then_v2 = await check(server, record(smb_account, protocols=("ntlmv1", "ntlmv2")), pool)
    assert v1_then_v2.auth.status == "success" and v1_then_v2.protocol == "ntlmv2"
    assert "refused first: NTLMv1: STATUS_LOGON_FAILURE" in (v1_then_v2.auth.message or "")
    assert "VSA-SMB-0003" not in ids(v1_then_v2)


async def test_ntlmv1_allowed_by_the_server(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba(SambaSettings(ntlm_auth="yes", log_level=AUDIT))
    only_v1 = await check(server, record(smb_account, protocols=("ntlmv1",)), pool)
    assert only_v1.auth.status == "success" and only_v1.protocol == "ntlmv1"
    assert only_v1.auth.message == f"NTLMv1 login as {smb_account[0]} (local account) accepted"
    assert "VSA-SMB-0003" in ids(only_v1)
    assert only_v1.shares is not None  # the NTLMv1 session signs and works like any other

    v2_first = await check(server, record(smb_account, protocols=("ntlmv2", "ntlmv1")), pool)
    assert v2_first.protocol == "ntlmv2" and "VSA-SMB-0003" not in ids(v2_first)

    hashed = await check(server, record(smb_account, password=None, nt_hash=compute_nthash(smb_account[1]).hex(),
                                        protocols=("ntlmv1",)), pool)
    assert hashed.auth.status == "success" and hashed.protocol == "ntlmv1"

    types = [e["passwordType"] for e in server.auth_events() if e["clientAccount"] == smb_account[0]]
    assert types == ["NTLMv1", "NTLMv2", "NTLMv1"]  # NTLMv1 only where the record asked for it


async def test_concurrent_v1_and_v2_checks_do_not_interfere(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba(SambaSettings(ntlm_auth="yes", log_level=AUDIT))
    protocols = [("ntlmv1",) if i % 2 else ("ntlmv2",) for i in range(8)]
    results = await asyncio.gather(*(check(server, record(smb_account, protocols=p), pool) for p in protocols))
    assert [r.protocol for r in results] == [p[0] for p in protocols]
    assert all(r.auth.status == "success" for r in results)
    types = sorted(e["passwordType"] for e in server.auth_events() if e["clientAccount"] == smb_account[0])
    assert types == ["NTLMv1"] * 4 + ["NTLMv2"] * 4


# ---- signing, dialects ----------------------------------------------------------------


async def test_signing_required_and_not_required(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    lax = start_samba(SambaSettings(server_signing="default"))
    strict = start_samba(SambaSettings(server_signing="mandatory"))
    lax_result, strict_result = await asyncio.gather(check(lax, record(smb_account), pool),
                                                     check(strict, record(smb_account), pool))
    assert lax_result.signing_required is False and strict_result.signing_required is True
    assert "VSA-SMB-0002" in ids(lax_result) and "VSA-SMB-0002" not in ids(strict_result)
    assert lax_result.auth.status == strict_result.auth.status == "success"
    finding = next(f for f in lax_result.findings if f.id == "VSA-SMB-0002")
    assert (finding.severity, finding.detection) == (3, "network") and "3.1.1" in (finding.evidence or "")


async def test_smb1_enabled_and_smb3_missing(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    old = start_samba(SambaSettings(server_min_protocol="NT1", server_max_protocol="SMB2_10"))
    result = await check(old, record(smb_account), pool)
    assert result.smb1_enabled is True and result.dialects == ("1.0", "2.0.2", "2.1")
    assert {"VSA-SMB-0001", "VSA-SMB-0002", "VSA-SMB-0004"} <= ids(result)
    assert result.auth.status == "success"  # impacket picks SMB 2.1 for the login


async def test_an_smb1_only_server(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    """impacket falls back to SMB1 for the login; NTLMv1 there goes through impacket's own switch."""
    server = start_samba(SambaSettings(server_min_protocol="NT1", server_max_protocol="NT1", ntlm_auth="yes",
                                       log_level=AUDIT))
    v2 = await check(server, record(smb_account), pool)
    assert v2.dialects == ("1.0",) and v2.smb1_enabled is True
    assert v2.auth.status == "success" and v2.protocol == "ntlmv2", v2
    assert {"VSA-SMB-0001", "VSA-SMB-0004"} <= ids(v2)
    assert v2.shares is not None and v2.os is not None and v2.os.name == "Samba"
    v1 = await check(server, record(smb_account, protocols=("ntlmv1",)), pool)
    assert v1.auth.status == "success" and v1.protocol == "ntlmv1" and "VSA-SMB-0003" in ids(v1)
    wrong = await check(server, record(smb_account, password="Not-the-password-1"), pool)
    assert wrong.auth.status == "failed"
    types = [(e["serviceDescription"], e["passwordType"]) for e in server.auth_events()
             if e["clientAccount"] == smb_account[0]]
    assert types == [("SMB", "NTLMv2"), ("SMB", "NTLMv1"), ("SMB", "NTLMv2")]


# ---- domains --------------------------------------------------------------------------


async def test_domain_qualified_login_to_a_standalone_server(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    """A standalone server (Samba or Windows) authenticates an unknown domain's name against
    its own accounts: the login succeeds, and the result says the domain played no part."""
    server = start_samba(SambaSettings(log_level=AUDIT))
    result = await check(server, record(smb_account, domain="OTHERDOM"), pool)
    assert result.auth.status == "success"
    assert result.auth.message == f"NTLMv2 login as OTHERDOM\\{smb_account[0]} accepted"
    assert any("standalone" in n and f"OTHERDOM\\{smb_account[0]} as its local account" in n for n in result.notes)
    (event,) = [e for e in server.auth_events() if e["clientAccount"] == smb_account[0]]
    assert (event["clientDomain"], event["becameDomain"]) == ("OTHERDOM", "VSATARGET")


# ---- the registry ---------------------------------------------------------------------


async def test_what_samba_registry_pipe_answers(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    server = start_samba()
    result = await check(server, record(smb_account), pool)
    assert result.auth.status == "success" and result.errors == ()
    assert result.windows is not None and (result.windows.major, result.windows.minor) == (6, 1)
    assert result.windows.product_name is None and result.windows.build is None
    assert result.updates is None  # not learnt: not "no updates"
    notes = "\n".join(result.notes)
    assert ("remote registry: ProductName, CurrentBuildNumber, UBR not served by "
            "HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion (it serves CurrentVersion)") in notes
    assert "remote registry: installed updates (CBS packages) not served" in notes
    assert "remote registry: processor architecture not served" in notes
    assert result.os is not None and result.os.name == "Samba"  # 6.1 from the registry is not believed either


PACKAGES = r"HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\Packages"
VERSION_KEY = r"SOFTWARE\VsaLab\Windows NT\CurrentVersion"


async def test_registry_keys_the_test_creates(start_samba, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    """Samba serves new keys made with `net registry createkey`: Windows' own values, in our key."""
    kb = PACKAGES + r"\Package_for_KB5034441~31bf3856ad364e35~amd64~~19041.3920.1.1"
    kb_part = PACKAGES + r"\Package_1_for_KB5034441~31bf3856ad364e35~amd64~~19041.3920.1.1"
    staged = PACKAGES + r"\Package_for_KB5031356~31bf3856ad364e35~amd64~~19041.3570.1.8"
    rollup = PACKAGES + r"\Package_for_RollupFix~31bf3856ad364e35~amd64~~19041.3930.1.7"
    version = "HKLM\\" + VERSION_KEY
    environment = r"HKLM\SOFTWARE\VsaLab\Environment"
    server = start_samba(registry=[
        ("createkey", kb), ("setvalue", kb, "CurrentState", "dword", "112"),
        ("createkey", kb_part), ("setvalue", kb_part, "CurrentState", "dword", "112"),
        ("createkey", staged), ("setvalue", staged, "CurrentState", "dword", "64"),
        ("createkey", rollup), ("setvalue", rollup, "CurrentState", "dword", "112"),
        ("createkey", version),
        ("setvalue", version, "ProductName", "sz", "Windows 10 Pro"),
        ("setvalue", version, "CurrentBuildNumber", "sz", "22631"),
        ("setvalue", version, "CurrentMajorVersionNumber", "dword", "10"),
        ("setvalue", version, "CurrentMinorVersionNumber", "dword", "0"),
        ("setvalue", version, "DisplayVersion", "sz", "23H2"),
        ("setvalue", version, "InstallationType", "sz", "Client"),
        ("createkey", environment), ("setvalue", environment, "PROCESSOR_ARCHITECTURE", "sz", "AMD64"),
    ])
    paths = RegistryPaths(current_version=VERSION_KEY, environment=r"SOFTWARE\VsaLab\Environment")
    result = await check(server, record(smb_account), pool, registry_paths=paths)
    assert result.auth.status == "success" and result.errors == ()
    assert result.windows is not None
    assert (result.windows.product_name, result.windows.display_version) == ("Windows 11 Pro", "23H2")
    # No UBR value in the key: the latest cumulative update in effect supplies it.
    assert result.windows.version == "10.0.22631.3930"
    assert result.updates is not None
    assert [(u.kb, u.state, u.in_effect) for u in result.updates] == [
        ("KB5031356", "staged", False), ("KB5034441", "installed", True)]
    registry_notes = [n for n in result.notes if n.startswith("remote registry")]
    assert registry_notes == [f"remote registry: UBR not served by HKLM\\{VERSION_KEY} (it serves CurrentBuildNumber, "
                              "CurrentMajorVersionNumber, CurrentMinorVersionNumber, DisplayVersion, "
                              "InstallationType, ProductName)"]
    assert result.os is not None and result.os.name == "Samba"  # srvsvc still says Samba


# ---- hosts that cannot be tried -------------------------------------------------------


async def test_no_smb_service_is_an_error_with_the_cause(netns_lab, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    quiet = netns_lab.add_host("quiet")
    result = await check(quiet, record(smb_account), pool)
    assert result.auth.status == "error"
    assert result.auth.message == f"could not try the credentials: connection refused on {quiet.ip}:445 (no SMB service listening)"
    assert result.findings == () and result.dialects == ()


async def test_a_silent_port_never_hangs(netns_lab, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    """A listener that accepts and never answers: the check ends near its timeout, as an error."""
    host = netns_lab.add_host("tarpit")
    netns_lab.popen(host.netns, [sys.executable, "-c", (
        "import socket, time\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{host.ip}', 445)); s.listen(16)\n"
        "held = []\n"
        "while True:\n"
        "    held.append(s.accept()[0])\n")])
    await asyncio.sleep(0.3)
    started = time.monotonic()
    result = await check(host, record(smb_account), pool, timeout_s=2.0)
    elapsed = time.monotonic() - started
    assert result.auth.status == "error", result
    assert "could not try the credentials" in (result.auth.message or "")
    assert elapsed < 2.0 + 3.0, elapsed


async def test_cancelling_aborts_the_check(netns_lab, smb_account, pool) -> None:  # type: ignore[no-untyped-def]
    host = netns_lab.add_host("tarpit2")
    netns_lab.popen(host.netns, [sys.executable, "-c", (
        "import socket\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{host.ip}', 445)); s.listen(16)\n"
        "held = []\n"
        "while True:\n"
        "    held.append(s.accept()[0])\n")])
    await asyncio.sleep(0.3)
    with netns_executor(netns_lab.hub, 1) as single:
        task = asyncio.ensure_future(check(host, record(smb_account), single, timeout_s=60.0))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The pool's only thread was blocked reading from the tarpit: it is free again at once.
        started = time.monotonic()
        await asyncio.wrap_future(single.submit(time.sleep, 0))
        assert time.monotonic() - started < 2.0


# ---- secrets --------------------------------------------------------------------------


async def test_no_password_or_hash_in_logs_or_results(start_samba, smb_account, pool, caplog) -> None:  # type: ignore[no-untyped-def]
    server = start_samba(SambaSettings(ntlm_auth="yes"))
    nt_hash = compute_nthash(smb_account[1]).hex()
    caplog.set_level(logging.DEBUG)
    results = [
        await check(server, record(smb_account), pool),
        await check(server, record(smb_account, password=None, nt_hash=nt_hash, protocols=("ntlmv1",)), pool),
        await check(server, record(smb_account, password="Wrong-" + smb_account[1]), pool),
    ]
    assert [r.auth.status for r in results] == ["success", "success", "failed"]
    texts = [caplog.text] + [repr(r) for r in results] + [
        json.dumps(r.auth.__dict__) + "\n".join(r.host_errors()) for r in results]
    for text in texts:
        assert smb_account[1] not in text
        assert nt_hash not in text and nt_hash.upper() not in text
