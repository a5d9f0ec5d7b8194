"""NEGOTIATE probes: requests as [MS-SMB2]/[MS-CIFS] lay them out, and Samba's recorded answers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from appliance.scan import smbnegotiate as neg

FIXTURES = Path(__file__).parent.parent / "fixtures" / "smb"
RECORDED = json.loads((FIXTURES / "samba-negotiate.json").read_text())
GUID, SALT = b"G" * 16, b"S" * 32


def recorded(config: str, probe: str) -> bytes:
    return bytes.fromhex(RECORDED["recordings"][config]["responses"][probe])


def test_fixture_names_its_provenance() -> None:
    assert "Samba" in RECORDED["provenance"] and "recorded" in RECORDED["provenance"]


def test_smb2_request_layout_single_dialect() -> None:
    framed = neg.build_smb2_negotiate((0x0210,), client_guid=GUID, salt=SALT)
    assert framed[0] == 0 and neg.frame_length(framed[:4]) == len(framed) - 4
    msg = framed[4:]
    assert msg[:4] == b"\xfeSMB" and struct.unpack_from("<H", msg, 4)[0] == 64
    assert struct.unpack_from("<H", msg, 12)[0] == neg.SMB2_NEGOTIATE
    size, count, security_mode = struct.unpack_from("<HHH", msg, 64)
    assert (size, count, security_mode) == (36, 1, neg.SMB2_SIGNING_ENABLED)
    assert msg[64 + 12:64 + 28] == GUID
    assert struct.unpack_from("<H", msg, 64 + 36)[0] == 0x0210
    assert len(msg) == 64 + 36 + 2


def test_smb2_request_with_311_carries_aligned_contexts() -> None:
    msg = neg.build_smb2_negotiate(tuple(neg.SMB2_DIALECTS), client_guid=GUID, salt=SALT)[4:]
    offset, count = struct.unpack_from("<IH", msg, 64 + 28)
    assert count == 2 and offset % 8 == 0
    ctx_type, length = struct.unpack_from("<HH", msg, offset)
    assert ctx_type == neg.SMB2_PREAUTH_INTEGRITY_CAPABILITIES and length == 38
    assert SALT in msg[offset:offset + 8 + length]
    second = offset + 8 + length + ((-(8 + length)) % 8)
    assert struct.unpack_from("<HH", msg, second) == (neg.SMB2_ENCRYPTION_CAPABILITIES, 6)


def test_builder_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        neg.build_smb2_negotiate((0x0999,), client_guid=GUID, salt=SALT)
    with pytest.raises(ValueError):
        neg.build_smb2_negotiate((0x0202,), client_guid=b"short", salt=SALT)


@pytest.mark.parametrize("probe,dialect", [("2.0.2", 0x0202), ("2.1", 0x0210), ("3.0", 0x0300),
                                          ("3.0.2", 0x0302), ("3.1.1", 0x0311), ("all", 0x0311)])
def test_samba_default_agrees_every_dialect_without_requiring_signing(probe: str, dialect: int) -> None:
    answer = neg.parse_smb2_negotiate_response(recorded("default", probe))
    assert answer.accepted and answer.dialect == dialect
    assert answer.signing_required is False
    assert answer.mechanisms == ("ntlmssp",)


def test_samba_signing_mandatory_sets_the_required_bit() -> None:
    for probe in ("2.0.2", "3.1.1", "all"):
        assert neg.parse_smb2_negotiate_response(recorded("signing-mandatory", probe)).signing_required


def test_samba_capped_at_smb2_10_refuses_smb3() -> None:
    assert neg.parse_smb2_negotiate_response(recorded("max-smb2_10", "all")).dialect_name == "2.1"
    refused = neg.parse_smb2_negotiate_response(recorded("max-smb2_10", "3.1.1"))
    assert not refused.accepted and refused.status == 0xC00000BB  # STATUS_NOT_SUPPORTED


def test_encryption_capability_per_dialect() -> None:
    assert not neg.parse_smb2_negotiate_response(recorded("default", "2.1")).encryption_capable
    assert neg.parse_smb2_negotiate_response(recorded("default", "3.0")).encryption_capable
    assert neg.parse_smb2_negotiate_response(recorded("default", "3.1.1")).encryption_capable


def test_smb1_refused_by_default_samba() -> None:
    answer = neg.parse_smb1_negotiate_response(recorded("default", "smb1"))
    assert isinstance(answer, neg.Smb1Negotiation)
    assert answer.dialect_index == neg.SMB1_NO_DIALECT and not answer.accepted


def test_smb1_accepted_when_enabled() -> None:
    answer = neg.parse_smb1_negotiate_response(recorded("smb1-enabled", "smb1"))
    assert isinstance(answer, neg.Smb1Negotiation)
    # Samba's "server signing = default" leaves SMB1 signing off altogether.
    assert answer.accepted and answer.security_mode == 0x03
    assert not answer.signing_required


def test_smb1_request_offers_only_nt_lm_012() -> None:
    msg = neg.build_smb1_negotiate()[4:]
    assert msg[:4] == b"\xffSMB" and msg[4] == neg.SMB1_COM_NEGOTIATE
    assert msg[32] == 0  # no words
    assert msg[35:] == b"\x02NT LM 0.12\x00"


def test_smb2_answer_to_smb1_probe_is_never_smb1() -> None:
    answer = neg.parse_smb1_negotiate_response(recorded("default", "3.0"))
    assert isinstance(answer, neg.Smb2Negotiation)


@pytest.mark.parametrize("garbage", [b"", b"\xfeSMB", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"\xffSMB" + b"\x00" * 10])
def test_garbage_raises(garbage: bytes) -> None:
    with pytest.raises(neg.NegotiateParseError):
        neg.parse_smb1_negotiate_response(garbage)


def test_truncated_success_raises() -> None:
    with pytest.raises(neg.NegotiateParseError):
        neg.parse_smb2_negotiate_response(recorded("default", "3.0")[:80])


def test_frame_header_checks() -> None:
    assert neg.frame_length(b"\x00\x00\x01\x00") == 256
    with pytest.raises(neg.NegotiateParseError):
        neg.frame_length(b"\x85\x00\x00\x00")  # a NetBIOS keep-alive/session message is not SMB
