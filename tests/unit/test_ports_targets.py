"""Target expansion and scope rules (appliance.scan.targets)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.errors import VsaError
from appliance.scan.targets import (
    MAX_BLOCK_ADDRESSES,
    TargetError,
    expand_targets,
    make_scope,
)


def ips(scoped):
    return [s.target.ip for s in scoped]


def test_address_cidr_and_range_expand_in_order():
    out = expand_targets(["10.77.0.10", "10.77.0.0/30", "10.77.0.20-10.77.0.22"])
    assert ips(out) == [
        "10.77.0.10", "10.77.0.0", "10.77.0.1", "10.77.0.2", "10.77.0.3",
        "10.77.0.20", "10.77.0.21", "10.77.0.22",
    ]
    assert all(s.scannable and s.reason is None for s in out)


def test_ipv6_cidr_and_range():
    assert ips(expand_targets(["fd00::/126"])) == ["fd00::", "fd00::1", "fd00::2", "fd00::3"]
    assert ips(expand_targets(["fd00::fe-fd00::101"])) == ["fd00::fe", "fd00::ff", "fd00::100", "fd00::101"]


def test_duplicates_are_merged_first_position_wins():
    out = expand_targets(["10.0.0.2", "10.0.0.0/30", "10.0.0.1-10.0.0.2"])
    assert ips(out) == ["10.0.0.2", "10.0.0.0", "10.0.0.1", "10.0.0.3"]


@pytest.mark.parametrize(
    "entry, words",
    [
        ("10.0.0.300", "not an IP address"),
        ("10.0.0.0/33", "not a valid CIDR block"),
        ("10.0.0.9-10.0.0.1", "ends before it starts"),
        ("10.0.0.1-fd00::1", "mixes IPv4 and IPv6"),
        ("10.0.0.1-20", "write the range in full"),
        ("", "is empty"),
        ("web-1.example", "not an IP address"),
    ],
)
def test_malformed_entries_are_named(entry, words):
    with pytest.raises(TargetError) as info:
        expand_targets(["10.0.0.1", entry])
    assert isinstance(info.value, VsaError)
    assert words in str(info.value)
    assert repr(entry) in str(info.value)


def test_block_limit_names_the_block():
    assert len(expand_targets(["10.1.0.0/16"])) == MAX_BLOCK_ADDRESSES
    with pytest.raises(TargetError) as info:
        expand_targets(["10.0.0.1", "10.0.0.0/15"])
    assert "'10.0.0.0/15'" in str(info.value) and "131,072" in str(info.value)
    with pytest.raises(TargetError, match="fd00::/64"):
        expand_targets(["fd00::/64"])
    with pytest.raises(TargetError, match="10.0.0.0-10.1.0.0"):
        expand_targets(["10.0.0.0-10.1.0.0"])  # 65,537 addresses


def test_exclude_may_be_large_and_marks_excluded_by_job():
    scope = make_scope(["10.0.0.0/8", "fd00::/64"])
    out = expand_targets(["10.77.0.10", "192.168.1.1", "fd00::5"], scope)
    assert [(s.target.ip, s.verdict, s.reason) for s in out] == [
        ("10.77.0.10", "excluded", "excluded_by_job"),
        ("192.168.1.1", "scan", None),
        ("fd00::5", "excluded", "excluded_by_job"),
    ]
    result = out[0].excluded_result()
    assert result.status == "excluded" and result.reason == "excluded_by_job"
    assert result.to_wire()["host_key"] == "10.77.0.10"


def test_malformed_exclude_is_named_with_its_field():
    with pytest.raises(TargetError, match=r"^exclude: 'x' "):
        make_scope(["x"])


@pytest.mark.parametrize(
    "address",
    ["0.1.2.3", "127.0.0.5", "169.254.169.254", "224.0.0.1", "239.255.255.250", "240.0.0.1",
     "255.255.255.255", "::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1"],
)
def test_forbidden_ranges_are_out_of_scope(address):
    (out,) = expand_targets([address])
    assert (out.verdict, out.reason) == ("excluded", "out_of_scope")
    assert out.excluded_result().reason == "out_of_scope"


def test_own_addresses_are_out_of_scope_even_when_excluded_too():
    scope = make_scope(["10.77.0.0/24"], own_addresses=["10.77.0.1"])
    out = expand_targets(["10.77.0.1", "10.77.0.2"], scope)
    assert [(s.verdict, s.reason) for s in out] == [("excluded", "out_of_scope"), ("excluded", "excluded_by_job")]


def test_allow_targets_overrides_forbidden_but_not_exclude():
    scope = make_scope(["127.0.0.9"], allow=["127.0.0.0/8"])
    out = expand_targets(["127.0.0.5", "127.0.0.9", "169.254.169.254"], scope)
    assert [(s.target.ip, s.verdict, s.reason) for s in out] == [
        ("127.0.0.5", "scan", None),
        ("127.0.0.9", "excluded", "excluded_by_job"),
        ("169.254.169.254", "excluded", "out_of_scope"),
    ]


def test_scanned_target_has_no_excluded_result():
    (out,) = expand_targets(["10.0.0.1"])
    with pytest.raises(ValueError):
        out.excluded_result()


# ---- properties -------------------------------------------------------------------

v4 = st.integers(min_value=int(ipaddress.IPv4Address("1.0.0.0")), max_value=int(ipaddress.IPv4Address("223.255.255.255")))


@given(start=v4, size=st.integers(min_value=1, max_value=600))
def test_range_expands_to_exactly_its_addresses(start, size):
    first = ipaddress.IPv4Address(start)
    last = ipaddress.IPv4Address(min(start + size - 1, int(ipaddress.IPv4Address("223.255.255.255"))))
    out = expand_targets([f"{first}-{last}"])
    assert len(out) == int(last) - int(first) + 1
    assert out[0].target.ip == str(first) and out[-1].target.ip == str(last)


@given(st.lists(st.tuples(v4, st.integers(min_value=24, max_value=32)), min_size=1, max_size=6))
def test_expansion_is_duplicate_free_and_covers_every_entry(blocks):
    entries = [str(ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{p}", strict=False)) for a, p in blocks]
    out = ips(expand_targets(entries))
    assert len(out) == len(set(out))
    expected = set()
    for e in entries:
        expected.update(str(a) for a in ipaddress.ip_network(e))
    assert set(out) == expected


@given(st.lists(v4, min_size=1, max_size=20), st.lists(v4, max_size=20))
def test_excluded_never_scannable(targets, excluded):
    entries = [str(ipaddress.IPv4Address(t)) for t in targets]
    ex = [str(ipaddress.IPv4Address(t)) for t in excluded]
    out = expand_targets(entries, make_scope(ex))
    for s in out:
        forbidden = ipaddress.ip_address(s.target.ip).is_loopback  # 1.0.0.0+ covers only 127/8 of the list
        assert s.scannable == (s.target.ip not in ex and not forbidden)


@given(st.ip_addresses())
def test_forbidden_addresses_never_scannable_without_allow(address):
    (out,) = expand_targets([str(address)])
    forbidden = any(
        address.version == n.version and address in n
        for n in map(ipaddress.ip_network, ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
                                             "240.0.0.0/4", "::1/128", "fe80::/10", "ff00::/8"])
    )
    if forbidden:
        assert out.reason == "out_of_scope"
