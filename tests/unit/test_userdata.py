"""User-data parsing: every form RUNTIME.md lists, and properties with hypothesis."""

from __future__ import annotations

import base64
import gzip
import ipaddress
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from appliance.errors import UserDataError
from appliance.userdata import ProxySpec, parse_proxy_url, parse_user_data

CODE = "12345678901234"


def test_plain_text() -> None:
    ud = parse_user_data(f"PERSCODE={CODE}\nPROXY_URL=jdoe:abc12345@10.40.1.123:3128\n".encode())
    assert ud.perscode == CODE
    assert ud.proxy == ProxySpec("10.40.1.123", 3128, "jdoe", "abc12345")
    assert ud.unknown_keys == ()


@pytest.mark.parametrize(
    "raw",
    [
        f"\ufeffPERSCODE={CODE}\r\n".encode(),  # BOM + CRLF
        f"\n\n# a comment\n  PERSCODE  =  {CODE}  \n\n".encode(),  # blanks, comments, spaces
        f'PERSCODE="{CODE}"\n'.encode(),  # double quotes
        f"PERSCODE='{CODE}'\n".encode(),  # single quotes
        base64.b64encode(f"PERSCODE={CODE}\n".encode()),  # base64 of text
        base64.encodebytes(f"PERSCODE={CODE}\n".encode()),  # base64 wrapped with newlines
        gzip.compress(f"PERSCODE={CODE}\n".encode()),  # gzip
        base64.b64encode(gzip.compress(f"PERSCODE={CODE}\n".encode())),  # base64 of gzip
        base64.b64encode(base64.b64encode(f"PERSCODE={CODE}\n".encode())),  # double-encoded
        f"#cloud-config\nruncmd:\n  - echo hello\nPERSCODE={CODE}\n".encode(),  # shared with cloud-init
    ],
)
def test_accepted_forms(raw: bytes) -> None:
    assert parse_user_data(raw).perscode == CODE


def test_unknown_keys_are_reported_and_ignored() -> None:
    ud = parse_user_data(f"FOO=1\nPERSCODE={CODE}\nBAR=2\nFOO=3\n".encode())
    assert ud.perscode == CODE
    assert ud.unknown_keys == ("FOO", "BAR")


def test_no_perscode() -> None:
    assert parse_user_data(b"").perscode is None
    assert parse_user_data(b"# nothing here\n").perscode is None


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"PERSCODE=short\n", "8 to 64"),
        (b"PERSCODE=has space inside\n", "letters, digits"),
        (b"PERSCODE=" + b"a" * 65 + b"\n", "65 characters"),
        (f"PERSCODE={CODE}\nPERSCODE={CODE}\n".encode(), "twice (lines 1 and 2)"),
        (b"\xff\xfePERSCODE", "not UTF-8"),
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
        (f"PROXY_URL=10.0.0.1\nPERSCODE={CODE}".encode(), "needs a port"),
    ],
)
def test_rejected_with_precise_message(raw: bytes, words: str) -> None:
    with pytest.raises(UserDataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_user_data(raw)


def test_error_never_quotes_the_perscode() -> None:
    secret = "abc$defghij"
    with pytest.raises(UserDataError) as info:
        parse_user_data(f"PERSCODE={secret}".encode())
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.40.1.123:3128", ProxySpec("10.40.1.123", 3128)),
        ("http://10.40.1.123:3128", ProxySpec("10.40.1.123", 3128)),
        ("HTTP://proxy.corp.example:8080/", ProxySpec("proxy.corp.example", 8080)),
        ("jdoe:abc12345@10.40.1.123:3128", ProxySpec("10.40.1.123", 3128, "jdoe", "abc12345")),
        (
            r"CORP\jdoe:abc12345@10.40.1.123:3128",
            ProxySpec("10.40.1.123", 3128, "jdoe", "abc12345", "CORP"),
        ),
        (
            "jdoe:p@ss:w@rd@proxy.example:3128",
            ProxySpec("proxy.example", 3128, "jdoe", "p@ss:w@rd"),
        ),
        ("[2001:db8::5]:3128", ProxySpec("2001:db8::5", 3128)),
        ("u:pw@[2001:db8::5]:3128", ProxySpec("2001:db8::5", 3128, "u", "pw")),
        ("u:@10.0.0.1:3128", ProxySpec("10.0.0.1", 3128, "u", "")),
    ],
)
def test_proxy_forms(value: str, expected: ProxySpec) -> None:
    assert parse_proxy_url(value) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("10.0.0.1", "needs a port"),
        ("10.0.0.1:99999", "port"),
        ("10.0.0.1:abc", "port"),
        ("jdoe@10.0.0.1:3128", "no password"),
        (":pw@10.0.0.1:3128", "empty user"),
        ("2001:db8::5:3128", "without brackets"),
        ("[2001:db8::zz]:3128", "invalid IPv6"),
        ("[2001:db8::5]3128", "needs a port"),
        ("socks5://10.0.0.1:1080", "only an http://"),
        ("300.1.1.1:3128", "invalid IPv4"),
        ("bad_host!:3128", "not a valid host"),
        ("", "empty"),
    ],
)
def test_proxy_rejected(value: str, words: str) -> None:
    with pytest.raises(UserDataError, match=words):
        parse_proxy_url(value)


def test_proxy_display_masks_password() -> None:
    spec = parse_proxy_url(r"CORP\jdoe:s3cr3t@10.0.0.1:3128")
    assert spec.display() == r"CORP\jdoe:***@10.0.0.1:3128"
    assert "s3cr3t" not in spec.display() and "s3cr3t" not in repr(spec)
    assert spec.login == r"CORP\jdoe"


# ---- properties -------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_hostname = (
    st.lists(_label, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not all(c.isdigit() or c == "." for c in h))
)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a)))
_host = st.one_of(_hostname, _ipv4, _ipv6)
_port = st.integers(1, 65535)
# User names and domains: printable, no separators ( ':' '@' '\\' ) and no spaces.
_name = st.text(
    st.characters(
        max_codepoint=0x2FF,
        blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
        blacklist_characters=":@\\",
    ),
    min_size=1,
    max_size=20,
)
# Passwords may contain anything printable, '@' and ':' included.
_password = st.text(
    st.characters(max_codepoint=0x2FF, blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30
)


@st.composite
def proxy_specs(draw: st.DrawFn) -> ProxySpec:
    host, port = draw(_host), draw(_port)
    if draw(st.booleans()):
        return ProxySpec(host, port)
    domain = draw(st.one_of(st.none(), _name))
    spec = ProxySpec(host, port, draw(_name), draw(_password), domain)
    # "scheme://..." at the start is read as a URL scheme: inherently ambiguous, refused.
    assume(not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec.format()))
    return spec


@given(proxy_specs())
@settings(max_examples=400)
def test_proxy_format_parses_back(spec: ProxySpec) -> None:
    assert parse_proxy_url(spec.format()) == spec


@given(
    proxy_specs(),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij0123456789-", min_size=8, max_size=64),
)
@settings(max_examples=200)
def test_user_data_with_proxy_parses_back(spec: ProxySpec, code: str) -> None:
    # A whole user-data text survives every encoding the operator may apply.
    if spec.password is not None and spec.password != spec.password.strip():
        spec = ProxySpec(
            spec.host, spec.port, spec.username, spec.password.strip() + "x", spec.domain
        )
    text = f"PERSCODE={code}\r\nPROXY_URL={spec.format()}\r\n".encode()
    for raw in (
        text,
        gzip.compress(text),
        base64.b64encode(text),
        base64.b64encode(gzip.compress(text)),
    ):
        ud = parse_user_data(raw)
        assert ud.perscode == code
        assert ud.proxy == spec


@given(st.binary(max_size=2048))
@settings(max_examples=500)
def test_never_raises_anything_but_its_own_error(raw: bytes) -> None:
    try:
        parse_user_data(raw)
    except UserDataError:
        pass


@given(st.text(max_size=300))
@settings(max_examples=500)
def test_proxy_parser_never_raises_anything_but_its_own_error(value: str) -> None:
    try:
        parse_proxy_url(value)
    except UserDataError:
        pass
