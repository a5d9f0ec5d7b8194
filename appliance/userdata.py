"""Pure parsing of EC2 user-data: PERSCODE and PROXY_URL (RUNTIME.md, User-data).

The pipeline, each step a pure bytes-to-bytes function (after nodeadm's
``configprovider/userdata.go``): decode-if-base64 → gunzip-if-gzip, repeated a
bounded number of times because operators double-encode; then the text is read
line by line. Every failure is a :class:`~appliance.errors.UserDataError` whose
message says what is wrong and never quotes a secret.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import unicodedata
import zlib
from dataclasses import dataclass, field

from appliance.errors import UserDataError

KNOWN_KEYS = ("PERSCODE", "PROXY_URL")
PERSCODE_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
# A KEY=VALUE line; other lines (cloud-init YAML, shell) are not ours and are skipped.
ASSIGNMENT_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
# A URL scheme at the start; "user:pass://x@host:port" stays a password.
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
HOSTNAME_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_USER_DATA_BYTES = 16 * 1024  # EC2's own limit on user-data
MAX_DECODE_ROUNDS = 4
GZIP_MAGIC = b"\x1f\x8b"
BOM = "\ufeff"


@dataclass(frozen=True)
class ProxySpec:
    """An HTTP CONNECT proxy: host, port and optional basic-authentication credentials."""

    host: str  # IPv4 address, IPv6 address (without brackets) or host name
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    domain: str | None = None

    @property
    def url(self) -> str:
        """The proxy's URL without credentials, as HTTP clients take it."""
        return f"http://{self.host_for_url}:{self.port}"

    @property
    def host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def login(self) -> str | None:
        """The basic-authentication user name, ``DOMAIN\\user`` when a domain is given."""
        if self.username is None:
            return None
        return f"{self.domain}\\{self.username}" if self.domain else self.username

    def display(self) -> str:
        """How the proxy may be shown to an operator: the password as ``***``."""
        if self.username is None:
            return f"{self.host_for_url}:{self.port}"
        return f"{self.login}:***@{self.host_for_url}:{self.port}"

    def format(self) -> str:
        """The PROXY_URL value that parses back to this proxy (contains the password)."""
        if self.username is None:
            return f"{self.host_for_url}:{self.port}"
        return f"{self.login}:{self.password or ''}@{self.host_for_url}:{self.port}"


@dataclass(frozen=True)
class UserData:
    """What the appliance takes from user-data, plus what it noticed and ignored."""

    perscode: str | None = field(default=None, repr=False)
    proxy: ProxySpec | None = None
    unknown_keys: tuple[str, ...] = ()


# ---- bytes → text ---------------------------------------------------------------


def gunzip_if_gzip(data: bytes) -> bytes:
    """Decompress gzip data (bounded); return anything else unchanged."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        out = decompressor.decompress(data, MAX_USER_DATA_BYTES * 4 + 1)
    except zlib.error as exc:
        raise UserDataError(
            f"user-data looks gzip-compressed but cannot be decompressed: {exc}"
        ) from None
    if len(out) > MAX_USER_DATA_BYTES * 4 or decompressor.unconsumed_tail:
        raise UserDataError(
            "user-data decompresses to more than 64 KiB; that is not appliance user-data"
        )
    if not decompressor.eof:
        raise UserDataError("user-data looks gzip-compressed but is truncated")
    return out


def decode_if_base64(data: bytes) -> bytes:
    """Decode base64 user-data when the whole payload is base64 of gzip or of text.

    Plain ``KEY=VALUE`` text is never valid base64 (the ``=`` sits mid-string),
    so this does not mistake ordinary user-data for an encoding.
    """
    if not _looks_base64(data):
        return data
    compact = b"".join(data.split())
    try:
        decoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return data
    if decoded.startswith(GZIP_MAGIC):
        return decoded
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return data
    # Only accept decoded text that looks like user-data at all.
    body = text.removeprefix(BOM)
    if "=" in body and all(ch in "\r\n\t" or unicodedata.category(ch) != "Cc" for ch in body):
        return decoded
    # Base64 of base64: the next round decodes it again.
    return decoded if _looks_base64(decoded) else data


def _looks_base64(data: bytes) -> bool:
    compact = b"".join(data.split())
    return (
        bool(compact)
        and len(compact) % 4 == 0
        and bool(re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", compact))
    )


def decode_user_data(raw: bytes) -> str:
    """Turn raw user-data bytes (plain, base64, gzip, any nesting) into text."""
    if len(raw) > MAX_USER_DATA_BYTES * 4:
        raise UserDataError(f"user-data is {len(raw)} bytes; EC2 allows 16 KiB")
    data = raw
    for _ in range(MAX_DECODE_ROUNDS):
        step = gunzip_if_gzip(decode_if_base64(data))
        if step == data:
            break
        data = step
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserDataError(
            f"user-data is not UTF-8 text (byte {exc.start} cannot be decoded); "
            "paste it as plain text, base64 or gzip"
        ) from None
    return text.removeprefix(BOM)


# ---- text → values ----------------------------------------------------------------


def parse_user_data(raw: bytes | str) -> UserData:
    """Parse user-data into :class:`UserData`; raise :class:`UserDataError` on a bad value."""
    text = raw.removeprefix(BOM) if isinstance(raw, str) else decode_user_data(raw)
    values: dict[str, tuple[int, str]] = {}
    unknown: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = ASSIGNMENT_RE.match(line)
        if not match:
            continue
        key, value = match.group(1), _unquote(match.group(2).strip())
        if key not in KNOWN_KEYS:
            if key not in unknown:
                unknown.append(key)
            continue
        if key in values:
            raise UserDataError(
                f"{key} is given twice (lines {values[key][0]} and {number}); keep one"
            )
        values[key] = (number, value)

    perscode = None
    if "PERSCODE" in values:
        perscode = parse_perscode(values["PERSCODE"][1])
    proxy = None
    if "PROXY_URL" in values and values["PROXY_URL"][1]:
        proxy = parse_proxy_url(values["PROXY_URL"][1])
    return UserData(perscode=perscode, proxy=proxy, unknown_keys=tuple(unknown))


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_perscode(value: str) -> str:
    """Validate a personalization code: 8–64 characters of ``[A-Za-z0-9-]``."""
    if PERSCODE_RE.match(value):
        return value
    if not 8 <= len(value) <= 64:
        raise UserDataError(
            f"PERSCODE has {len(value)} characters; it must have 8 to 64 "
            "(copy it again from the platform)"
        )
    raise UserDataError(
        "PERSCODE may contain only letters, digits and '-' "
        "(copy it again from the platform, without spaces)"
    )


def parse_proxy_url(value: str) -> ProxySpec:
    """Parse PROXY_URL: ``host:port``, ``user:password@host:port`` or ``domain\\user:password@host:port``.

    An ``http://`` prefix is tolerated. The password may contain ``@`` and ``:``:
    the host part follows the *last* ``@`` and the user name ends at the *first* ``:``.
    """
    text = value.strip()
    if text.lower().startswith("http://"):
        text = text[len("http://") :]
    elif SCHEME_RE.match(text):
        raise UserDataError("PROXY_URL must be host:port (only an http:// prefix is allowed)")
    text = text.removesuffix("/")
    if not text:
        raise UserDataError("PROXY_URL is empty")

    username = password = domain = None
    userinfo, at, hostport = text.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if not colon:
            raise UserDataError(
                "PROXY_URL has a user name but no password; write user:password@host:port"
            )
        if "\\" in user:
            domain, _, user = user.partition("\\")
            if not domain:
                raise UserDataError("PROXY_URL has an empty domain before '\\'")
        if not user:
            raise UserDataError("PROXY_URL has an empty user name before ':'")
        if any(ch.isspace() for ch in user) or (domain and any(ch.isspace() for ch in domain)):
            raise UserDataError("PROXY_URL's user name contains a space")
        username = user
    host, port = _parse_host_port(hostport)
    return ProxySpec(host=host, port=port, username=username, password=password, domain=domain)


def _parse_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UserDataError("PROXY_URL has '[' without the closing ']' of an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UserDataError("PROXY_URL has an invalid IPv6 address in brackets") from None
        if not rest.startswith(":"):
            raise UserDataError("PROXY_URL needs a port after the address: host:port")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise UserDataError("PROXY_URL needs a port: host:port (e.g. 10.0.0.5:3128)")
        if ":" in host:
            raise UserDataError("PROXY_URL has an IPv6 address without brackets; write [addr]:port")
        _check_host(host)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UserDataError("PROXY_URL's port must be a number from 1 to 65535")
    return host, int(port_text)


def _check_host(host: str) -> None:
    if not host:
        raise UserDataError("PROXY_URL has no host before ':port'")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise UserDataError("PROXY_URL has an invalid IPv4 address") from None
        return
    name = host.removesuffix(".")
    if len(name) > 253 or not all(HOSTNAME_LABEL_RE.match(label) for label in name.split(".")):
        raise UserDataError("PROXY_URL's host is not a valid host name or IP address")
