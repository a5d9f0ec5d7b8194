"""Pure parts of the scan engines: cookie, checksums, permutation, BPF, guards, parsers."""

from __future__ import annotations

import math
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.scan.connectscan import TokenBucket
from appliance.scan.discovery import echo_request, parse_fib_trie, parse_if_inet6
from appliance.scan.synscan import (
    SUSPECT_OPEN_PORTS,
    CookieJar,
    Permutation,
    _set_bits,
    _template,
    bpf_filter,
    implausible_open_count,
    internet_checksum,
    ones_sum,
)


@settings(max_examples=30)
@given(st.integers(min_value=1, max_value=5000))
def test_permutation_is_a_bijection(n):
    perm = Permutation.random(n, random.Random(n))
    assert sorted(perm(i) for i in range(n)) == list(range(n))
    assert math.gcd(perm.a, perm.n) == 1


def test_permutation_spreads_hosts():
    """Consecutive probes rarely hit the same host (index = port_index * hosts + host)."""
    hosts, ports = 9, 1000
    perm = Permutation.random(hosts * ports, random.Random(1))
    order = [perm(i) % hosts for i in range(hosts * ports)]
    same = sum(1 for x, y in zip(order, order[1:], strict=False) if x == y)
    assert same < len(order) * 0.2


def test_cookie_depends_on_key_host_port():
    jar = CookieJar(61000, b"k" * 32)
    other = CookieJar(61000, b"j" * 32)
    other_port = CookieJar(61001, b"k" * 32)
    ip = 0x0A4D0002
    hk = jar.host_key(ip)
    assert jar.cookie(hk, 22) != jar.cookie(hk, 23)
    assert jar.cookie(hk, 22) != jar.cookie(jar.host_key(ip + 1), 22)
    assert jar.cookie(hk, 22) != other.cookie(other.host_key(ip), 22)
    assert jar.cookie(hk, 22) != other_port.cookie(other_port.host_key(ip), 22)
    # Deterministic for one scan (the receiver process rebuilds it from the secret).
    again = CookieJar(61000, jar.secret)
    assert again.cookie(again.host_key(ip), 22) == jar.cookie(hk, 22)


def test_template_and_incremental_checksums_match_full_computation():
    """The sender's per-probe arithmetic equals the RFC 1071 checksum of the whole packet."""
    tmpl = bytearray(_template("10.77.0.1", 61234))
    dst = bytes([10, 77, 0, 9])
    tmpl[16:20] = dst
    tcp = bytes(tmpl[20:])
    pseudo = bytes(tmpl[12:20]) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp_base = ones_sum(pseudo + tcp[:16] + b"\0\0" + tcp[18:])
    port, seq, ipid = 8080, 0xDEADBEEF, 4242
    tcs = tcp_base + port + (seq >> 16) + (seq & 0xFFFF)
    tcs = (tcs & 0xFFFF) + (tcs >> 16)
    tcs = (tcs & 0xFFFF) + (tcs >> 16)
    pkt = bytearray(tmpl)
    struct.pack_into("!H", pkt, 4, ipid)
    struct.pack_into("!HI", pkt, 22, port, seq)
    struct.pack_into("!H", pkt, 36, ~tcs & 0xFFFF)
    seg = bytes(pkt[20:])
    assert internet_checksum(bytes(pkt[12:20]) + struct.pack("!BBH", 0, 6, len(seg)) + seg) == 0
    assert pkt[33] == 0x02 and struct.unpack("!H", pkt[32:34])[0] >> 12 == 6  # SYN, MSS option


def test_bpf_filter_shape():
    prog = bpf_filter(61234)
    assert (0x15, 0, 1, 61234) in prog
    assert prog[-1] == (0x06, 0, 0, 0)
    for i, (_code, jt, jf, _k) in enumerate(prog):
        if jt or jf:
            assert i + 1 + max(jt, jf) < len(prog)  # every jump lands inside the program


def test_bitmap_helpers():
    bits = bytes([0b00000101, 0xFF, 0])
    assert list(_set_bits(bits, 20)) == [0, 2, 8, 9, 10, 11, 12, 13, 14, 15]


def test_synproxy_guard_thresholds():
    assert not implausible_open_count(6, 65535)
    assert not implausible_open_count(23, 100)
    assert implausible_open_count(30, 100)
    assert not implausible_open_count(200, 65535)
    assert implausible_open_count(SUSPECT_OPEN_PORTS + 1, 65535)


def test_token_bucket_paces():
    bucket = TokenBucket(1000, burst=10)
    delays = [bucket.delay_for(10) for _ in range(5)]
    assert delays[0] == 0
    assert 0.005 < delays[1] <= 0.011


def test_own_address_parsers():
    trie = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.77.0.0
        /24 link UNICAST
     |-- 10.77.0.1
        /32 host LOCAL
     |-- 10.77.0.255
        /32 link BROADCAST
"""
    assert parse_fib_trie(trie) == {"10.77.0.1"}
    inet6 = "fd000000000000000000000000000002 04 40 00 82     eth0\n00000000000000000000000000000001 01 80 10 80       lo\n"
    assert parse_if_inet6(inet6) == {"fd00::2", "::1"}


def test_echo_request_checksum():
    packet = echo_request(0x1234, 7)
    assert packet[0] == 8 and internet_checksum(packet) == 0
