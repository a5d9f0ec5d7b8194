"""Pure decisions of the SMB checker: auth outcome, causes, OS, NTLMv1 builders, result shape."""

from __future__ import annotations

import json
import struct

import pytest
from impacket import ntlm, smb3

from appliance.authrecords import WindowsRecord
from appliance.results import HostResult, Target
from appliance.scan import smb
from appliance.scan import winversion as wv
from appliance.scan.smb import LoginAttempt, ServerIdentity

V2_ONLY = WindowsRecord(id="r1", title="t", username="scanner", password="pw-Secret-1")
V1_ONLY = WindowsRecord(id="r2", title="t", username="scanner", password="pw-Secret-1", protocols=("ntlmv1",))
BOTH = WindowsRecord(id="r3", title="t", username="scanner", domain="CORP", password="pw-Secret-1",
                     protocols=("ntlmv2", "ntlmv1"))
LOGON_FAILURE = 0xC000006D


def decide(record: WindowsRecord, *attempts: LoginAttempt, privileged: bool = False):  # type: ignore[no-untyped-def]
    return smb.decide_auth(record, attempts, privileged=privileged, who=smb.account_label(record))


# ---- statuses and causes -------------------------------------------------------------


@pytest.mark.parametrize("code,kind", [
    (LOGON_FAILURE, "refused"), (0xC000006A, "refused"), (0xC0000072, "refused"), (0xC0000234, "refused"),
    (0xC0000022, "refused"), (0xC0000418, "error"), (0xC000005E, "error"), (0xC00000BB, "error"),
])
def test_classify_status(code: int, kind: str) -> None:
    assert smb.classify_status(code)[0] == kind


def test_blocking_status_says_why() -> None:
    assert "blocks NTLM" in smb.classify_status(0xC0000418)[1]
    assert smb.status_name(LOGON_FAILURE) == "STATUS_LOGON_FAILURE"
    assert smb.status_name(0x12345678) == "NTSTATUS 0x12345678"


def test_network_causes() -> None:
    wrapped = OSError("Connection error (10.77.0.9:445)", ConnectionRefusedError(111, "Connection refused"))
    assert "connection refused on 10.77.0.9:445" in smb.network_cause(wrapped, "10.77.0.9", 445)
    assert "no answer" in smb.network_cause(TimeoutError("timed out"), "10.77.0.9", 445)
    unreachable = OSError(113, "No route to host")
    assert smb.network_cause(unreachable, "10.77.0.9", 445) == "cannot reach 10.77.0.9:445: No route to host"
    assert "reset" in smb.network_cause(ConnectionResetError(104, "reset"), "h", 445)


# ---- the auth outcome ----------------------------------------------------------------


def test_success_with_ntlmv2() -> None:
    out = decide(V2_ONLY, LoginAttempt("ntlmv2", "success"), privileged=True)
    assert (out.status, out.type, out.record_id, out.privileged) == ("success", "windows", "r1", True)
    assert out.message == "NTLMv2 login as scanner (local account) accepted (administrator: ADMIN$ reachable)"


def test_wrong_password_is_failed() -> None:
    out = decide(BOTH, LoginAttempt("ntlmv2", "refused", "STATUS_LOGON_FAILURE", "STATUS_LOGON_FAILURE"),
                 LoginAttempt("ntlmv1", "refused", "STATUS_LOGON_FAILURE", "STATUS_LOGON_FAILURE"))
    assert out.status == "failed" and "CORP\\scanner" in (out.message or "")
    assert "NTLMv2: STATUS_LOGON_FAILURE; NTLMv1: STATUS_LOGON_FAILURE" in (out.message or "")
    assert "answers the same way" not in (out.message or "")  # NTLMv2 was tried: no ambiguity


def test_ntlmv1_only_refusal_says_it_is_ambiguous() -> None:
    out = decide(V1_ONLY, LoginAttempt("ntlmv1", "refused", "STATUS_LOGON_FAILURE", "STATUS_LOGON_FAILURE"))
    assert out.status == "failed"
    assert "a server that refuses NTLMv1 answers the same way" in (out.message or "")


def test_v1_refused_then_v2_success() -> None:
    record = WindowsRecord(id="r4", title="t", username="u", password="pw-Secret-1", protocols=("ntlmv1", "ntlmv2"))
    out = decide(record, LoginAttempt("ntlmv1", "refused", "STATUS_LOGON_FAILURE", "STATUS_LOGON_FAILURE"),
                 LoginAttempt("ntlmv2", "success"))
    assert out.status == "success" and "refused first: NTLMv1: STATUS_LOGON_FAILURE" in (out.message or "")


def test_guest_session_is_failed() -> None:
    out = decide(V2_ONLY, LoginAttempt("ntlmv2", "guest", "guest session", "the server answered with a guest session"))
    assert out.status == "failed" and "guest session" in (out.message or "")


def test_error_prevents_a_try() -> None:
    out = decide(V2_ONLY, LoginAttempt("ntlmv2", "error", None, "the server blocks NTLM by policy (STATUS_NTLM_BLOCKED)"))
    assert out.status == "error"
    assert out.message == "could not try the credentials: the server blocks NTLM by policy (STATUS_NTLM_BLOCKED)"


# ---- OS ------------------------------------------------------------------------------


def test_os_of_samba_is_not_windows() -> None:
    server = ServerIdentity(ntlm_version=(6, 1, 0), server_type=0x809A03, comment="Samba 4.17.12-Debian")
    os_info, note = smb.os_from(server, None, None)
    assert os_info is not None and (os_info.family, os_info.name, os_info.version, os_info.source) == (
        "unix", "Samba", "4.17.12-Debian", "smb")
    assert note and "Windows 6.1 Build 0" in note


def test_os_build_zero_is_not_believed() -> None:
    os_info, note = smb.os_from(ServerIdentity(ntlm_version=(6, 1, 0)), None, None)
    assert os_info is None and note and "Build 0" in note


def test_os_from_ntlm_and_from_registry() -> None:
    os_info, note = smb.os_from(ServerIdentity(ntlm_version=(10, 0, 20348)), None, None)
    assert os_info is not None and (os_info.family, os_info.version) == ("windows", "10.0.20348") and note is None
    version = wv.WindowsVersion(product_name="Windows 11 Pro", major=10, minor=0, build=22631, ubr=3007)
    os_info, _ = smb.os_from(ServerIdentity(ntlm_version=(10, 0, 22631)), version, "x86_64")
    assert os_info is not None
    assert (os_info.name, os_info.version, os_info.arch, os_info.source) == ("Windows 11 Pro", "10.0.22631.3007", "x86_64", "smb")


# ---- NTLMv1 through impacket's own login -------------------------------------------


def challenge(flags: int) -> bytes:
    """A minimal NTLM CHALLENGE ([MS-NLMP] 2.2.1.2) with a DNS host name AV pair."""
    host = "target".encode("utf-16-le")
    info = struct.pack("<HH", ntlm.NTLMSSP_AV_DNS_HOSTNAME, len(host)) + host + struct.pack("<HH", 0, 0)
    return (b"NTLMSSP\x00" + struct.pack("<I", 2) + struct.pack("<HHI", 0, 0, 48)
            + struct.pack("<I", flags | ntlm.NTLMSSP_NEGOTIATE_TARGET_INFO) + b"12345678" + b"\x00" * 8
            + struct.pack("<HHI", len(info), len(info), 48) + info)


def test_v1_builders_send_ntlmv1_responses() -> None:
    builders = smb._NtlmV1Builders()
    type1 = builders.getNTLMSSPType1("ws", "", False)
    assert not type1["flags"] & ntlm.NTLMSSP_NEGOTIATE_TARGET_INFO
    type3, _key = builders.getNTLMSSPType3(type1, challenge(type1["flags"]), "u", "pw-Secret-1", "")
    assert len(type3["ntlm"]) == 24  # an NTLMv1 NT response
    v2_type1 = ntlm.getNTLMSSPType1("ws", "", False)
    v2_type3, _key = ntlm.getNTLMSSPType3(v2_type1, challenge(v2_type1["flags"]), "u", "pw-Secret-1", "")
    assert len(v2_type3["ntlm"]) > 24  # NTLMv2 for comparison
    assert builders.NTLMAuthChallenge is ntlm.NTLMAuthChallenge  # everything else is impacket's


def test_v1_login_is_impackets_code_and_changes_nothing_global() -> None:
    assert smb.ntlmv1_available()
    assert smb._Smb3NtlmV1.login.__code__ is smb3.SMB3.login.__code__
    assert smb._Smb3NtlmV1.login.__globals__["ntlm"] is not ntlm
    assert smb3.SMB3.login.__globals__["ntlm"] is ntlm  # the NTLMv2 path is untouched
    assert ntlm.USE_NTLMv2 is True


# ---- the result's shape --------------------------------------------------------------


def test_apply_to_host_result() -> None:
    check = smb.WindowsCheck(
        ip="10.77.0.2",
        auth=decide(V2_ONLY, LoginAttempt("ntlmv2", "success")),
        os=smb.os_from(ServerIdentity(ntlm_version=(10, 0, 19045)), None, None)[0],
        notes=("remote registry: UBR not served",), errors=("srvsvc: STATUS_ACCESS_DENIED",),
    )
    result = HostResult(target=Target(ip="10.77.0.2"), status="scanned")
    check.apply_to(result)
    wire = result.to_wire()
    json.dumps(wire)
    assert wire["auth"] == [{"record_id": "r1", "type": "windows", "status": "success", "privileged": False,
                             "message": "NTLMv2 login as scanner (local account) accepted"}]
    assert wire["os"]["family"] == "windows" and wire["os"]["source"] == "smb"
    assert wire["errors"] == ["smb: srvsvc: STATUS_ACCESS_DENIED", "smb: remote registry: UBR not served"]


def test_two_records_on_one_host_do_not_duplicate_findings() -> None:
    from appliance.scan.winfindings import SmbFacts, smb_findings

    findings = tuple(smb_findings(SmbFacts(dialects=("3.1.1",), signing_required={"3.1.1": False})))
    first = smb.WindowsCheck(ip="h", auth=decide(V2_ONLY, LoginAttempt("ntlmv2", "success")), findings=findings,
                             notes=("remote registry: not offered",))
    second = smb.WindowsCheck(ip="h", auth=decide(V1_ONLY, LoginAttempt("ntlmv1", "error", None, "x")),
                              findings=findings, notes=("remote registry: not offered",))
    result = HostResult(target=Target(ip="h"), status="scanned")
    first.apply_to(result)
    second.apply_to(result)
    assert [a.record_id for a in result.auth] == ["r1", "r2"]
    assert [f.id for f in result.findings] == ["VSA-SMB-0002"]
    assert result.errors == ["smb: remote registry: not offered"]


def test_record_secrets_stay_out_of_reprs() -> None:
    record = WindowsRecord(id="r", title="t", username="u", password="pw-Secret-1", nt_hash="0" * 32)
    assert "pw-Secret-1" not in repr(record) and "0" * 32 not in repr(record)
