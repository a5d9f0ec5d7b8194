"""Property tests: whatever a (malicious) target prints, parsers return values or raise their own error."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.scan import inventory as inv

NONCE = "0123456789abcdef"
MARK = f"@@vsa-{NONCE}"

# Text that looks like the real thing often enough to reach deep branches.
pieces = st.sampled_from([
    "\t", "\n", "\r\n", ":", "=", '"', "'", " ", "install ok installed", "P:", "V:", "A:", "o:",
    "(none)", ".src.rpm", "-", "LISTEN", "UNCONN", "tcp", "udp", "[::]", "*:", "0A", "07",
    f"\n{MARK} begin ", f"\n{MARK} end ", "dpkg", "rpm", "apk", "ss", "id", "os-release", "0",
    "ID=", "VERSION_ID=", "\\", "%lo", "0100007F:0016", "\x00", "\x1b[2J", "é", "\ud7ff",
])
texty = st.one_of(st.text(max_size=400), st.lists(pieces, max_size=80).map("".join))


def _only_own_errors(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except inv.InventoryParseError:
        return None


@settings(max_examples=300, deadline=None)
@given(texty)
def test_line_parsers(text: str) -> None:
    for fn in (inv.parse_dpkg, inv.parse_rpm, inv.parse_apk_installed, inv.parse_ss,
               inv.parse_os_release):
        result = _only_own_errors(fn, text)
        if isinstance(result, tuple):
            for item in result:
                for value in vars(item).values():
                    assert not isinstance(value, str) or len(value) <= inv.MAX_FIELD_CHARS
    for proto in ("tcp", "udp"):
        _only_own_errors(inv.parse_proc_net, text, proto)
    u = inv.parse_uname(text)
    assert u.kernel is None or len(u.kernel) <= 128


@settings(max_examples=300, deadline=None)
@given(texty)
def test_sections_and_inventory_never_crash(text: str) -> None:
    sections = _only_own_errors(inv.split_sections, text, NONCE)
    if sections is None:
        return
    assert len(sections) <= inv.MAX_SECTIONS
    result = inv.inventory_from(sections)  # never raises at all
    assert isinstance(result.errors, tuple)
    inv.parse_imds(sections)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["ID", "VERSION_ID", "VERSION", "NAME", "PRETTY_NAME"]),
                       st.text(max_size=40)))
def test_ecosystem_total(fields: dict[str, str]) -> None:
    eco = inv.osv_ecosystem(fields)
    assert isinstance(eco, str) and eco


def test_size_bounds_raise_own_error() -> None:
    big = "install ok installed\ta\t1\tall\n" * (inv.MAX_SECTION_BYTES // 20)
    try:
        inv.parse_dpkg(big)
    except inv.InventoryParseError as exc:
        assert "larger" in str(exc) or "more packages" in str(exc)
    else:
        raise AssertionError("an oversized list must be refused")
    try:
        inv.parse_os_release("A=b\n" * 100_000)
    except inv.InventoryParseError:
        pass
    else:
        raise AssertionError("an oversized os-release must be refused")
