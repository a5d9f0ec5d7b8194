"""SMB NEGOTIATE probes: building requests and parsing responses, without I/O.

Which dialects a server negotiates and whether it *requires* signing are read
from NEGOTIATE responses ([MS-SMB2] 2.2.3/2.2.4, [MS-CIFS] 2.2.4.52). impacket
cannot be asked this: its SMB3 client marks signing as required for every
3.1.1 connection whatever the server said, and negotiates only the highest
dialect. So the checker sends its own NEGOTIATE requests, one dialect at a
time, and these pure functions build and parse them (tested on responses
recorded from Samba, see tests/fixtures/smb/).

Every message travels in a direct-TCP (port 445) frame: a zero byte and a
24-bit big-endian length ([MS-SMB2] 2.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from appliance.errors import VsaError

# Dialect revisions of [MS-SMB2] 2.2.3, with the names operators know.
SMB2_DIALECTS: dict[int, str] = {
    0x0202: "2.0.2",
    0x0210: "2.1",
    0x0300: "3.0",
    0x0302: "3.0.2",
    0x0311: "3.1.1",
}
SMB1_DIALECT_NAME = "NT LM 0.12"  # the only SMB1 dialect modern stacks speak
SMB1_NAME = "1.0"  # how SMB1 appears in a WindowsCheck's dialect list

MAX_FRAME_BYTES = 0x10000  # a NEGOTIATE response is small; refuse anything larger
SMB2_HEADER = struct.Struct("<4sHHIHHIIQIIQ16s")  # 64 bytes
SMB2_NEGOTIATE_REQ = struct.Struct("<HHHHI16s")  # 16 bytes before the 8-byte tail
SMB2_NEGOTIATE_RESP = struct.Struct("<HHHH16sIIIIQQHHI")  # 64 bytes
SMB1_HEADER = struct.Struct("<4sBIBHH8sHHHHH")  # 32 bytes

SMB2_NEGOTIATE = 0x0000
SMB2_SIGNING_ENABLED = 0x0001
SMB2_SIGNING_REQUIRED = 0x0002
# DFS | LEASING | LARGE_MTU | ENCRYPTION, as a Windows client would announce.
SMB2_CLIENT_CAPABILITIES = 0x00000047
SMB2_CAP_ENCRYPTION = 0x00000040
SMB2_PREAUTH_INTEGRITY_CAPABILITIES = 0x0001
SMB2_ENCRYPTION_CAPABILITIES = 0x0002
SHA_512 = 0x0001
AES_128_CCM, AES_128_GCM = 0x0001, 0x0002

SMB1_COM_NEGOTIATE = 0x72
SMB1_FLAGS = 0x18  # case-insensitive paths, canonicalized names
SMB1_FLAGS2 = 0xC843  # unicode, NT status, extended security, long names, EAs, signing allowed
SMB1_SECMODE_SIGNING_ENABLED = 0x04
SMB1_SECMODE_SIGNING_REQUIRED = 0x08
SMB1_NO_DIALECT = 0xFFFF

STATUS_SUCCESS = 0x00000000

# DER encodings of the security mechanisms a server lists in its SPNEGO hint.
MECH_OIDS_DER: dict[str, bytes] = {
    "ntlmssp": bytes.fromhex("060a2b06010401823702020a"),
    "kerberos": bytes.fromhex("06092a864886f712010202"),
    "ms-kerberos": bytes.fromhex("06092a864882f712010202"),
}


class NegotiateParseError(VsaError, ValueError):
    """A NEGOTIATE response is truncated or is not what it claims to be.

    A VsaError like every error of the appliance; still a ValueError for callers that catch that.
    """


def frame(message: bytes) -> bytes:
    """Wrap one SMB message in a direct-TCP frame (zero byte, 24-bit length)."""
    if len(message) > 0xFFFFFF:
        raise ValueError("SMB message too long for one frame")
    return b"\x00" + len(message).to_bytes(3, "big") + message


def frame_length(header: bytes) -> int:
    """The message length announced by a 4-byte direct-TCP frame header."""
    if len(header) != 4 or header[0] != 0:
        raise NegotiateParseError("not a direct-TCP SMB frame")
    return int.from_bytes(header[1:4], "big")


# ---- SMB2/3 ---------------------------------------------------------------------------


def build_smb2_negotiate(dialects: tuple[int, ...], *, client_guid: bytes, salt: bytes) -> bytes:
    """A framed SMB2 NEGOTIATE request offering ``dialects`` (with 3.1.1 contexts when offered).

    ``client_guid`` is 16 bytes; ``salt`` (32 bytes) feeds the 3.1.1 pre-authentication
    integrity context. Both are parameters so that the builder stays pure.
    """
    if not dialects or any(d not in SMB2_DIALECTS for d in dialects):
        raise ValueError(f"unknown SMB2 dialects: {dialects!r}")
    if len(client_guid) != 16 or len(salt) != 32:
        raise ValueError("client_guid must be 16 bytes and salt 32 bytes")
    header = SMB2_HEADER.pack(
        b"\xfeSMB", 64, 0, 0, SMB2_NEGOTIATE, 1, 0, 0, 0, 0xFEFF, 0, 0, b"\x00" * 16
    )
    dialect_bytes = b"".join(struct.pack("<H", d) for d in dialects)
    fixed_len = SMB2_NEGOTIATE_REQ.size + 8
    contexts = b""
    if 0x0311 in dialects:
        preauth = struct.pack("<HHH", 1, len(salt), SHA_512) + salt
        ciphers = struct.pack("<HHH", 2, AES_128_GCM, AES_128_CCM)
        ctx1 = struct.pack("<HHI", SMB2_PREAUTH_INTEGRITY_CAPABILITIES, len(preauth), 0) + preauth
        ctx2 = struct.pack("<HHI", SMB2_ENCRYPTION_CAPABILITIES, len(ciphers), 0) + ciphers
        contexts = _pad8(ctx1) + ctx2
        # Contexts start at the first 8-byte boundary after the dialects
        # (offsets count from the start of the SMB2 header).
        offset = 64 + fixed_len + len(dialect_bytes)
        padding = (-offset) % 8
        tail = struct.pack("<IHH", offset + padding, 2, 0)
        body = SMB2_NEGOTIATE_REQ.pack(
            36, len(dialects), SMB2_SIGNING_ENABLED, 0, SMB2_CLIENT_CAPABILITIES, client_guid
        ) + tail + dialect_bytes + b"\x00" * padding + contexts
    else:
        body = SMB2_NEGOTIATE_REQ.pack(
            36, len(dialects), SMB2_SIGNING_ENABLED, 0, SMB2_CLIENT_CAPABILITIES, client_guid
        ) + b"\x00" * 8 + dialect_bytes
    return frame(header + body)


def _pad8(data: bytes) -> bytes:
    return data + b"\x00" * ((-len(data)) % 8)


@dataclass(frozen=True)
class Smb2Negotiation:
    """What one SMB2 NEGOTIATE response says (``status`` non-zero: the dialect was refused)."""

    status: int
    dialect: int | None = None
    security_mode: int = 0
    capabilities: int = 0
    server_guid: str | None = None
    mechanisms: tuple[str, ...] = ()  # from the SPNEGO hint: ntlmssp, kerberos, ...

    @property
    def accepted(self) -> bool:
        """Whether the server agreed on a dialect."""
        return self.status == STATUS_SUCCESS and self.dialect in SMB2_DIALECTS

    @property
    def dialect_name(self) -> str | None:
        """The agreed dialect as operators write it (``3.1.1``)."""
        return SMB2_DIALECTS.get(self.dialect) if self.dialect is not None else None

    @property
    def signing_required(self) -> bool:
        """Whether the server requires signed messages."""
        return bool(self.security_mode & SMB2_SIGNING_REQUIRED)

    @property
    def encryption_capable(self) -> bool:
        """Whether the server announced SMB3 encryption (3.0/3.0.2 capability bit; 3.1.1 contexts)."""
        return bool(self.capabilities & SMB2_CAP_ENCRYPTION) or self.dialect == 0x0311


def parse_smb2_negotiate_response(message: bytes) -> Smb2Negotiation:
    """Parse one SMB2 NEGOTIATE response message (without its frame header)."""
    if len(message) < SMB2_HEADER.size or message[:4] != b"\xfeSMB":
        raise NegotiateParseError("not an SMB2 message")
    fields = SMB2_HEADER.unpack_from(message)
    status, command = fields[3], fields[4]
    if command != SMB2_NEGOTIATE:
        raise NegotiateParseError(f"SMB2 command {command:#x} is not NEGOTIATE")
    if status != STATUS_SUCCESS:
        return Smb2Negotiation(status=status)
    if len(message) < SMB2_HEADER.size + SMB2_NEGOTIATE_RESP.size:
        raise NegotiateParseError("truncated SMB2 NEGOTIATE response")
    (size, security_mode, dialect, _ctx_count, guid, capabilities, _mt, _mr, _mw,
     _systime, _start, sec_offset, sec_length, _ctx_offset) = SMB2_NEGOTIATE_RESP.unpack_from(
        message, SMB2_HEADER.size)
    if size != 65:
        raise NegotiateParseError(f"SMB2 NEGOTIATE response has StructureSize {size}, not 65")
    blob = message[sec_offset:sec_offset + sec_length] if sec_length else b""
    return Smb2Negotiation(
        status=status, dialect=dialect, security_mode=security_mode, capabilities=capabilities,
        server_guid=_guid(guid), mechanisms=mechanisms_in(blob),
    )


def mechanisms_in(spnego_blob: bytes) -> tuple[str, ...]:
    """The security mechanisms a SPNEGO hint lists (by their DER-encoded OIDs)."""
    return tuple(name for name, oid in MECH_OIDS_DER.items() if oid in spnego_blob)


def _guid(raw: bytes) -> str:
    """A GUID in its usual text form (the first three fields are little-endian)."""
    a, b, c = struct.unpack_from("<IHH", raw)
    rest = raw[8:].hex()
    return f"{a:08x}-{b:04x}-{c:04x}-{rest[:4]}-{rest[4:]}"


# ---- SMB1 -----------------------------------------------------------------------------


def build_smb1_negotiate() -> bytes:
    """A framed SMB1 NEGOTIATE request offering only ``NT LM 0.12`` (no SMB2 upgrade)."""
    header = SMB1_HEADER.pack(
        b"\xffSMB", SMB1_COM_NEGOTIATE, 0, SMB1_FLAGS, SMB1_FLAGS2, 0, b"\x00" * 8, 0,
        0xFFFF, 0xFEFF, 0, 0,
    )
    dialects = b"\x02" + SMB1_DIALECT_NAME.encode("ascii") + b"\x00"
    body = b"\x00" + struct.pack("<H", len(dialects)) + dialects
    return frame(header + body)


@dataclass(frozen=True)
class Smb1Negotiation:
    """What an SMB1 NEGOTIATE response says."""

    status: int
    dialect_index: int = SMB1_NO_DIALECT
    security_mode: int = 0

    @property
    def accepted(self) -> bool:
        """Whether the server agreed on NT LM 0.12."""
        return self.status == STATUS_SUCCESS and self.dialect_index == 0

    @property
    def signing_required(self) -> bool:
        """Whether the server requires signed SMB1 messages."""
        return bool(self.security_mode & SMB1_SECMODE_SIGNING_REQUIRED)


def parse_smb1_negotiate_response(message: bytes) -> Smb1Negotiation | Smb2Negotiation:
    """Parse the answer to :func:`build_smb1_negotiate`.

    A server without SMB1 may answer with an SMB2 message instead (Samba does,
    with an error status): that comes back as an :class:`Smb2Negotiation`,
    which never counts as SMB1 being enabled.
    """
    if message[:4] == b"\xfeSMB":
        return parse_smb2_negotiate_response(message)
    if len(message) < SMB1_HEADER.size + 1 or message[:4] != b"\xffSMB":
        raise NegotiateParseError("not an SMB1 message")
    fields = SMB1_HEADER.unpack_from(message)
    command, status = fields[1], fields[2]
    if command != SMB1_COM_NEGOTIATE:
        raise NegotiateParseError(f"SMB1 command {command:#x} is not NEGOTIATE")
    word_count = message[SMB1_HEADER.size]
    if status != STATUS_SUCCESS or word_count == 0:
        return Smb1Negotiation(status=status)
    words = message[SMB1_HEADER.size + 1:SMB1_HEADER.size + 1 + 2 * word_count]
    if len(words) < 2:
        raise NegotiateParseError("truncated SMB1 NEGOTIATE response")
    dialect_index = struct.unpack_from("<H", words)[0]
    # A refusal is one word (DialectIndex 0xFFFF); an NT LM 0.12 answer has 17.
    security_mode = words[2] if word_count >= 17 and len(words) >= 3 else 0
    return Smb1Negotiation(status=status, dialect_index=dialect_index, security_mode=security_mode)
