"""A stateless SYN scan engine in the masscan style.

How it works, and why:

- **Packets built once, patched per probe.** scapy builds one IPv4+TCP SYN
  template (with an MSS option, as real stacks send) per source address; each
  probe patches the IP id and destination, the TCP destination port and
  sequence number, and both checksums into a pre-allocated ctypes buffer.
  scapy's own ``sr()`` manages under 1k probes/s; this reaches the 100k range.
- **Raw IP socket, ``sendmmsg``.** Probes leave on an ``IPPROTO_RAW`` socket
  in batches through ``sendmmsg(2)`` (ctypes), so the kernel routes them and
  resolves MAC addresses (no ARP sweep of our own).
- **Answers from a packet socket.** An ``AF_PACKET`` datagram socket bound to
  each egress interface, with a hand-built classic BPF filter (IPv4, TCP, not
  a fragment, destination port = the scan's source port), so the kernel hands
  up only candidate answers, truncated to their headers.
- **Sequence-number cookie.** The SYN's sequence number is a keyed hash of
  (target address, target port, source port) under a per-scan random secret;
  an answer counts only if its acknowledgement number is that cookie + 1.
  Answers to other scans, stale half-open state and spoofed packets fail it.
- **Rate, order, retries.** A token bucket holds the send rate to ``rate_pps``.
  Probes follow a random affine permutation of (host, port) pairs with hosts
  varying fastest, so no host takes a burst. Probes that got no answer are
  sent once more; silence after that is ``filtered``.
- **A fresh random source port per scan**, outside the kernel's ephemeral
  range: reusing one within about a minute makes targets answer from stale
  half-open entries with the old sequence number (LAB-NOTES.md).
  Retransmitted SYN-ACKs are de-duplicated (answers are kept in sets).
- **The scanner's own RSTs.** No socket owns the source port, so the kernel
  answers every SYN-ACK with a RST. By default these are *tolerated*: only
  open ports provoke them (one each), the packet socket sees the SYN-ACK
  anyway, the RST frees the target's half-open slot at once (kinder to the
  target's SYN backlog than leaving it to time out), and suppressing them
  needs ``CAP_NET_ADMIN``, which the service does not hold. With
  ``suppress_kernel_rst=True`` (and the privilege) the engine adds an nft
  table dropping input to its source port in its own namespace for the scan's
  duration and removes it after; use it where a middlebox or IDS would count
  the RSTs, accepting that targets keep half-open entries until they expire.
- **Only CAP_NET_RAW.** :func:`raw_scan_available` tries to open both sockets;
  callers fall back to the connect scan when it says no, and say so.
- **SYN-proxy guard.** A host that reports implausibly many open ports
  (:func:`implausible_open_count`) is re-verified with full connections
  before its ports are reported (:func:`verify_open_ports`).

IPv4 only: IPv6 targets go to the connect engine.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import ipaddress
import json
import math
import mmap
import os
import random
import secrets
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import VsaError
from appliance.scan.connectscan import HostPorts, TokenBucket

ENGINE_NAME = "syn"
BATCH_SIZE = 256
DEFAULT_RATE_PPS = 10_000
# How long to listen for late answers after each pass. Answers on a LAN come
# in well under a millisecond; across a VPC or a VPN in tens of ms.
WAIT_AFTER_PASS_S = 1.0
RETRANSMISSIONS = 1
# The token bucket holds this much sending time: a sender woken late by a busy
# scheduler catches up instead of losing the time for good; the average rate
# stays rate_pps.
BUCKET_BURST_S = 0.05
# Source ports come from above the kernel's default ephemeral range (32768-60999),
# so no connection of the scanner's own can share the port the filter watches.
SOURCE_PORT_MIN = 61_000
SOURCE_PORT_MAX = 65_535
RCVBUF_BYTES = 64 * 1024 * 1024
SNDBUF_BYTES = 8 * 1024 * 1024
SNAPLEN_BYTES = 96  # IPv4 header with options + TCP header: all we parse
SYN_WINDOW = 1024
# SYN-proxy guard: more open ports than this on one host, or more than this
# share of the ports scanned (once at least SUSPECT_MIN_OPEN are open), is
# implausible for a real host and re-verified with full connections.
SUSPECT_OPEN_PORTS = 256
SUSPECT_OPEN_SHARE = 0.25
SUSPECT_MIN_OPEN = 24
VERIFY_CONCURRENCY = 256
VERIFY_HOLD_S = 0.3  # how long a verified connection must survive without a reset

ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
SIOCGIFADDR = 0x8915
RECEIVER_START_TIMEOUT_S = 10.0
# Up to this many probes (discovery, small port lists) the receiver is a thread:
# starting a process costs more than sharing the interpreter lock.
RECEIVER_THREAD_MAX_PROBES = 20_000
RECEIVER_NICE = 10
PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V2 = 1
# The receive ring: 256-byte frames (32-byte tpacket2 header, address, then
# the truncated packet), 4,096 per 1 MiB block, 32 blocks: 131,072 answers
# can wait in 32 MiB while the receiver is descheduled.
RING_FRAME_BYTES = 256
RING_FRAMES_PER_BLOCK = 4096
RING_BLOCKS = 32
RING_FRAMES = RING_FRAMES_PER_BLOCK * RING_BLOCKS
# 2 ms between looks at an empty ring: at 150k answers/s that is 300 frames, a
# sliver of the ring, and it spares a wake-up per answer.
RECEIVER_IDLE_SLEEP_S = 0.002

ProgressFn = Callable[[int, int], None]


class SynScanError(VsaError):
    """The SYN engine could not run (no permission, no route, a socket failed)."""


@dataclass
class SynScanReport:
    """What one SYN scan did, besides the per-host results."""

    source_port: int = 0
    probes_sent: int = 0
    retransmitted: int = 0
    answers: int = 0
    rejected_answers: int = 0  # failed the cookie check
    kernel_drops: int = 0  # answers the packet socket lost (buffer full)
    rst_suppressed: bool = False
    elapsed_s: float = 0.0
    first_pass_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---- capability ------------------------------------------------------------------------


def raw_scan_available() -> str | None:
    """None when the SYN engine may run here, else why not (CAP_NET_RAW missing, ...)."""
    for family, kind, proto in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                                (socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))):
        try:
            socket.socket(family, kind, proto).close()
        except PermissionError:
            return "raw sockets are not permitted (CAP_NET_RAW is missing)"
        except OSError as exc:
            return f"raw sockets cannot be opened: {exc.strerror or exc}"
    return None


# ---- pure pieces: cookie, checksum, order, filter --------------------------------------

class CookieJar:
    """The sequence-number cookie of one scan: simple tabulation hashing under a random key.

    ``cookie = F(dst ip, src port) XOR T[dst port]``, where F is BLAKE2b keyed
    with a per-scan secret (computed once per host) and T a per-scan table of
    65,536 random words. Tabulation hashing is 3-independent, and one XOR and
    one table lookup per probe keep the sender and the receiver fast.
    """

    def __init__(self, sport: int, secret: bytes | None = None) -> None:
        self.sport = sport
        self.secret = secret or secrets.token_bytes(32)
        table = hashlib.shake_256(b"ports" + self.secret).digest(4 * 65536)
        self.port_table: list[int] = list(struct.unpack("!65536I", table))

    def host_key(self, ip: int) -> int:
        """The 32-bit per-host part of the cookie (keyed by the secret and the source port)."""
        digest = hashlib.blake2b(struct.pack("!IH", ip, self.sport), key=self.secret[:32], digest_size=4).digest()
        return int.from_bytes(digest, "big")

    def cookie(self, hkey: int, port: int) -> int:
        """The 32-bit sequence number of the probe to ``port`` of the host with key ``hkey``."""
        return hkey ^ self.port_table[port]


def _fold(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes) -> int:
    """The unfolded ones'-complement sum of 16-bit big-endian words."""
    if len(data) % 2:
        data += b"\x00"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum of ``data``."""
    return ~_fold(ones_sum(data)) & 0xFFFF


@dataclass(frozen=True)
class Permutation:
    """A random affine permutation of 0..n-1: i -> (a*i + b) mod n, gcd(a, n) = 1."""

    n: int
    a: int
    b: int

    @classmethod
    def random(cls, n: int, rng: random.Random | None = None) -> Permutation:
        """A fresh permutation of ``n`` elements."""
        rng = rng or random.SystemRandom()
        if n <= 1:
            return cls(max(n, 1), 1, 0)
        while True:
            a = rng.randrange(1, n)
            # Avoid multipliers near 0 or n, whose order looks sequential.
            if math.gcd(a, n) == 1 and (n < 16 or n // 8 < a < n - n // 8):
                return cls(n, a, rng.randrange(n))

    def __call__(self, i: int) -> int:
        return (self.a * i + self.b) % self.n


def bpf_filter(sport: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF for an AF_PACKET datagram socket (data starts at the IPv4 header):

    accept IPv4 TCP, unfragmented, whose destination port is ``sport``,
    truncated to SNAPLEN_BYTES; drop everything else.
    """
    ld_b_abs, ld_h_abs, ldx_msh = 0x30, 0x28, 0xB1
    ld_h_ind, jeq_k, jset_k, ret_k = 0x48, 0x15, 0x45, 0x06
    return [
        (ld_b_abs, 0, 0, 9),            # A = ip protocol
        (jeq_k, 0, 6, socket.IPPROTO_TCP),
        (ld_h_abs, 0, 0, 6),            # A = flags + fragment offset
        (jset_k, 4, 0, 0x1FFF),         # a fragment: drop
        (ldx_msh, 0, 0, 0),             # X = 4 * (ip[0] & 0xf), the IP header length
        (ld_h_ind, 0, 0, 2),            # A = tcp destination port
        (jeq_k, 0, 1, sport),
        (ret_k, 0, 0, SNAPLEN_BYTES),
        (ret_k, 0, 0, 0),
    ]


def implausible_open_count(open_count: int, ports_scanned: int) -> bool:
    """True when a host claims more open ports than a real host plausibly has.

    Thresholds (documented for operators): more than SUSPECT_OPEN_PORTS (256)
    open, or at least SUSPECT_MIN_OPEN (24) open that are more than
    SUSPECT_OPEN_SHARE (25 %) of the ports scanned. SYN proxies and some
    firewalls answer SYN-ACK on every port; real servers rarely expose more
    than a few dozen.
    """
    if open_count > SUSPECT_OPEN_PORTS:
        return True
    return open_count >= SUSPECT_MIN_OPEN and ports_scanned > 0 and open_count / ports_scanned > SUSPECT_OPEN_SHARE


# ---- sockets and routes ----------------------------------------------------------------


def source_address(dst: str) -> str:
    """The local address the kernel would use to reach ``dst`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((dst, 9))
        except OSError as exc:
            raise SynScanError(f"no route to {dst}: {exc.strerror or exc}") from exc
        return sock.getsockname()[0]


def interface_of(address: str) -> str:
    """The name of the interface that holds ``address``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, req)
            except OSError:
                continue  # no IPv4 address on this interface
            if socket.inet_ntoa(res[20:24]) == address:
                return name
    raise SynScanError(f"no interface holds the source address {address}")


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_libc.setsockopt.restype = ctypes.c_int

PACKET_LEN = 44  # 20 IPv4 + 20 TCP + 4 MSS option
_PROBE_FORMAT = "!HHBBH4s4sHHIIHHHH"
_TCP_OFF_SYN = (6 << 12) | 0x02  # data offset 6 words (MSS option), SYN
SOCKADDR_LEN = 16


class _Batch:
    """Pre-allocated buffers for one sendmmsg batch of probes."""

    def __init__(self, template: bytes, size: int) -> None:
        self.size = size
        self.packets = ctypes.create_string_buffer(template * size, PACKET_LEN * size)
        self.addrs = ctypes.create_string_buffer(SOCKADDR_LEN * size)
        self.iovs = (_Iovec * size)()
        self.msgs = (_Mmsghdr * size)()
        base_p = ctypes.addressof(self.packets)
        base_a = ctypes.addressof(self.addrs)
        for i in range(size):
            struct.pack_into("=H", self.addrs, i * SOCKADDR_LEN, socket.AF_INET)
            self.iovs[i].iov_base = base_p + i * PACKET_LEN
            self.iovs[i].iov_len = PACKET_LEN
            hdr = self.msgs[i].msg_hdr
            hdr.msg_name = base_a + i * SOCKADDR_LEN
            hdr.msg_namelen = SOCKADDR_LEN
            hdr.msg_iov = ctypes.pointer(self.iovs[i])
            hdr.msg_iovlen = 1
        self.msgs_addr = ctypes.addressof(self.msgs)


def _template(src: str, sport: int) -> bytes:
    from scapy.layers.inet import IP, TCP  # scapy only here: building, never sending

    pkt = IP(src=src, dst="0.0.0.0", id=0, ttl=64) / TCP(
        sport=sport, dport=0, flags="S", seq=0, window=SYN_WINDOW, options=[("MSS", 1460)]
    )
    raw = bytes(pkt)
    if len(raw) != PACKET_LEN:
        raise SynScanError(f"unexpected SYN template length {len(raw)}")
    return raw


@dataclass
class _HostPlan:
    ip: str
    ip_int: int
    ip_bytes: bytes
    hkey: int
    tcp_base: int  # pseudo-header and constant TCP words, summed
    ip_base: int  # constant IP header words, summed
    source: str
    src_bytes: bytes


class _NftDrop:
    """An nft table that drops input to the scan's source port, for the scan's duration."""

    def __init__(self, sport: int) -> None:
        self.table = f"vsa_syn_{sport}"
        self.sport = sport
        self.active = False
        self.problem: str | None = None

    def __enter__(self) -> _NftDrop:
        rules = (f"table inet {self.table} {{\n chain input {{\n  type filter hook input priority -300; policy accept;\n"
                 f"  tcp dport {self.sport} drop\n }}\n}}\n")
        try:
            done = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.problem = f"nft could not run: {exc}"
            return self
        if done.returncode != 0:
            self.problem = f"nft refused the drop rule: {done.stderr.strip()}"
        else:
            self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=10)
            self.active = False


# The receiver runs in a process of its own, so that parsing answers never
# competes with the sender for the interpreter lock (on two cores this is the
# difference between about 60k and 100k+ probes/s with every probe answered).
# It shares a memfd with the sender: a header of counters, then a bitmap of
# answered probes and a bitmap of open ports, indexed like the probes
# (port_index * n_hosts + host_index).
_HDR = struct.Struct("=QQQQ")  # answers, rejected, kernel drops, ready flag
_HDR_LEN = 64


class _SharedAnswers:
    """The memfd shared with the receiver process, seen from the sender."""

    def __init__(self, total: int, n_hosts: int) -> None:
        self.total = total
        self.n_hosts = n_hosts
        self.nbytes = (total + 7) // 8
        self.size = _shared_size(total, n_hosts)
        self.fd = os.memfd_create("vsa-syn-answers", 0)
        os.ftruncate(self.fd, self.size)
        self.mem = mmap.mmap(self.fd, self.size)

    def counters(self) -> tuple[int, int, int, int]:
        """(answers, rejected, kernel drops, ready)."""
        return _HDR.unpack_from(self.mem, 0)

    def answered_bits(self) -> bytes:
        return self.mem[_HDR_LEN:_HDR_LEN + self.nbytes]

    def open_bits(self) -> bytes:
        return self.mem[_HDR_LEN + self.nbytes:_HDR_LEN + 2 * self.nbytes]

    def answered_per_host(self) -> list[int]:
        """How many probes of each host were answered (written by the receiver when it stops)."""
        return list(struct.unpack_from(f"={self.n_hosts}I", self.mem, _HDR_LEN + 2 * self.nbytes))

    def close(self) -> None:
        """Unmap and close the memfd."""
        self.mem.close()
        os.close(self.fd)


def _shared_size(total: int, n_hosts: int) -> int:
    """Header, answered bitmap, open bitmap, then one 32-bit answer count per host."""
    return _HDR_LEN + 2 * ((total + 7) // 8) + 4 * n_hosts


def _rx_ring(sock: socket.socket) -> mmap.mmap:
    """Map a TPACKET_V2 receive ring on a packet socket: frames are read without a syscall each."""
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    block_bytes = RING_FRAMES_PER_BLOCK * RING_FRAME_BYTES
    req = struct.pack("=IIII", block_bytes, RING_BLOCKS, RING_FRAME_BYTES, RING_FRAMES)
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
    return mmap.mmap(sock.fileno(), block_bytes * RING_BLOCKS, mmap.MAP_SHARED,
                     mmap.PROT_READ | mmap.PROT_WRITE)


def _receiver_main() -> int:
    """Entry point of the receiver process: config as JSON on stdin, EOF on stdin stops it."""
    config = json.loads(sys.stdin.readline())
    # The ring holds answers while the receiver waits; the sender, which drives every
    # probe through the kernel, should get the CPU first when the two compete.
    os.nice(config.get("nice", RECEIVER_NICE))
    _receive(config, stop_fd=0, borrowed_fds=False)
    return 0


def _receive(config: dict[str, Any], *, stop_fd: int, borrowed_fds: bool) -> None:
    """Read answers into the shared memory until ``stop_fd`` is readable or hung up.

    ``borrowed_fds``: the descriptors belong to the caller (the in-process
    receiver thread): work on duplicates and close only those.
    """
    jar = CookieJar(config["sport"], bytes.fromhex(config["secret"]))
    table = jar.port_table
    hosts: list[int] = config["hosts"]
    n_hosts = len(hosts)
    keys = {ip: (jar.host_key(ip), index) for index, ip in enumerate(hosts)}
    port_index = [-1] * 65536
    for index, port in enumerate(config["ports"]):
        port_index[port] = index
    total = n_hosts * len(config["ports"])
    nbytes = (total + 7) // 8
    mem = mmap.mmap(config["memfd"], _shared_size(total, n_hosts))
    per_host = [0] * n_hosts
    socks = [socket.socket(fileno=os.dup(fd) if borrowed_fds else fd) for fd in config["sockets"]]
    rings = [_rx_ring(sock) for sock in socks]
    poller = select.poll()
    poller.register(stop_fd, select.POLLIN | select.POLLHUP)
    unpack = struct.unpack_from
    pack_into = struct.pack_into
    open_base = _HDR_LEN + nbytes
    answers = rejected = 0
    cursors = [0] * len(rings)
    _HDR.pack_into(mem, 0, 0, 0, 0, 1)
    running = True
    while running:
        idle = True
        for r, ring in enumerate(rings):
            cur = cursors[r]
            while True:
                off = cur * RING_FRAME_BYTES
                if not ring[off] & 1:  # TP_STATUS_USER clear: the kernel has not filled this frame
                    break
                idle = False
                p = off + unpack("=H", ring, off + 14)[0]  # tp_net: where the IPv4 header starts
                if ring[p] == 0x45:  # the usual 20-byte header: one unpack for all we need
                    src, port, _dport, _seq, ack, _off, flags = unpack("!I4xHHIIBB", ring, p + 12)
                    entry = keys.get(src)
                else:
                    ihl = (ring[p] & 0x0F) * 4
                    entry = keys.get(unpack("!I", ring, p + 12)[0])
                    port, _dport, _seq, ack, _off, flags = unpack("!HHIIBB", ring, p + ihl)
                if entry is not None:
                    if (ack - 1) & 0xFFFFFFFF != entry[0] ^ table[port] or port_index[port] < 0:
                        rejected += 1
                    elif flags & 0x12 == 0x12 or flags & 0x04:  # SYN-ACK (open) or RST (closed)
                        index = port_index[port] * n_hosts + entry[1]
                        byte, bit = _HDR_LEN + (index >> 3), 1 << (index & 7)
                        if not mem[byte] & bit:  # retransmitted SYN-ACKs and duplicates count once
                            if flags & 0x12 == 0x12:
                                mem[open_base + (index >> 3)] |= bit
                            mem[byte] |= bit
                            answers += 1
                            per_host[entry[1]] += 1
                pack_into("=I", ring, off, 0)  # hand the frame back to the kernel
                cur = (cur + 1) % RING_FRAMES
            cursors[r] = cur
        if idle:
            _HDR.pack_into(mem, 0, answers, rejected, 0, 1)
            # Sleep rather than block in poll() on the packet sockets: a sleeping reader costs
            # the kernel no wake-up per answer, and the ring holds what arrives meanwhile.
            for fd, _event in poller.poll(0):
                if fd == stop_fd:
                    running = False  # the sender said stop: drain once more, then stop
            time.sleep(RECEIVER_IDLE_SLEEP_S)
    # A last sweep for frames that arrived with the stop signal.
    for r, ring in enumerate(rings):
        cur = cursors[r]
        while ring[cur * RING_FRAME_BYTES] & 1:
            off = cur * RING_FRAME_BYTES
            snaplen, _mac, net = unpack("=IHH", ring, off + 8)
            p = off + net
            ihl = (ring[p] & 0x0F) * 4
            entry = keys.get(unpack("!I", ring, p + 12)[0]) if snaplen >= ihl + 20 else None
            if entry is not None:
                port, _dport, _seq, ack, _off, flags = unpack("!HHIIBB", ring, p + ihl)
                if (ack - 1) & 0xFFFFFFFF == entry[0] ^ table[port] and port_index[port] >= 0 and flags & 0x16:
                    index = port_index[port] * n_hosts + entry[1]
                    byte, bit = _HDR_LEN + (index >> 3), 1 << (index & 7)
                    if not mem[byte] & bit:
                        if flags & 0x12 == 0x12:
                            mem[open_base + (index >> 3)] |= bit
                        mem[byte] |= bit
                        answers += 1
                        per_host[entry[1]] += 1
            pack_into("=I", ring, off, 0)
            cur = (cur + 1) % RING_FRAMES
    struct.pack_into(f"={n_hosts}I", mem, _HDR_LEN + 2 * nbytes, *per_host)
    _HDR.pack_into(mem, 0, answers, rejected, _kernel_drops(socks), 1)
    mem.flush()
    for ring in rings:
        ring.close()
    mem.close()
    if borrowed_fds:
        for sock in socks:
            sock.close()


class _ReceiverProcess:
    """Starts the receiver process on the given packet sockets and stops it."""

    def __init__(self, socks: list[socket.socket], shared: _SharedAnswers, jar: CookieJar,
                 hosts: list[int], ports: Sequence[int]) -> None:
        fds = [sock.fileno() for sock in socks]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.scan.synscan", "--receiver"],
            stdin=subprocess.PIPE, pass_fds=[*fds, shared.fd], text=True,
        )
        config = {"sport": jar.sport, "secret": jar.secret.hex(), "hosts": hosts, "ports": list(ports),
                  "memfd": shared.fd, "sockets": fds, "nice": RECEIVER_NICE}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(config) + "\n")
        self.proc.stdin.flush()

    def wait_ready(self, shared: _SharedAnswers) -> None:
        """Wait until the receiver reads its ring (before the first probe leaves)."""
        deadline = time.monotonic() + RECEIVER_START_TIMEOUT_S
        while shared.counters()[3] != 1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SynScanError("the answer receiver process did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        """Close its stdin (the stop signal) and wait for its final counters."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class _ReceiverThread:
    """The receiver in a thread of this process, for small scans (discovery) where starting
    a process would cost more than the interpreter lock ever will."""

    def __init__(self, socks: list[socket.socket], shared: _SharedAnswers, jar: CookieJar,
                 hosts: list[int], ports: Sequence[int]) -> None:
        self.stop_r, self.stop_w = os.pipe()
        config = {"sport": jar.sport, "secret": jar.secret.hex(), "hosts": hosts, "ports": list(ports),
                  "memfd": shared.fd, "sockets": [sock.fileno() for sock in socks]}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config,), name="vsa-syn-rx", daemon=True)
        self.thread.start()

    def _run(self, config: dict[str, Any]) -> None:
        try:
            _receive(config, stop_fd=self.stop_r, borrowed_fds=True)
        except BaseException as exc:  # reported by wait_ready/stop, never swallowed
            self.error = exc

    def wait_ready(self, shared: _SharedAnswers) -> None:
        """Wait until the receiver reads its ring (before the first probe leaves)."""
        deadline = time.monotonic() + RECEIVER_START_TIMEOUT_S
        while shared.counters()[3] != 1:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise SynScanError(f"the answer receiver did not start: {self.error}")
            time.sleep(0.001)

    def stop(self) -> None:
        """Signal the thread through its pipe and wait for its final counters."""
        if self.stop_w >= 0:
            os.close(self.stop_w)
            self.stop_w = -1
            self.thread.join(timeout=5)
            os.close(self.stop_r)
        if self.error is not None:
            raise SynScanError(f"the answer receiver failed: {self.error}") from self.error


def _open_receivers(interfaces: Sequence[str], sport: int) -> list[socket.socket]:
    socks = []
    prog = bpf_filter(sport)
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filters)
    for name in interfaces:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        if _libc.setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_ATTACH_FILTER,
                            ctypes.byref(fprog), ctypes.sizeof(fprog)) != 0:
            err = ctypes.get_errno()
            sock.close()
            raise SynScanError(f"cannot attach the BPF filter: {os.strerror(err)}")
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        sock.bind((name, ETH_P_IP))
        # Drain anything queued between socket() and the filter taking effect.
        while True:
            try:
                sock.recv(SNAPLEN_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
        socks.append(sock)
    return socks


def _kernel_drops(socks: Sequence[socket.socket]) -> int:
    drops = 0
    for sock in socks:
        try:
            raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            drops += struct.unpack("II", raw)[1]
        except OSError:
            continue
    return drops


# ---- the engine ------------------------------------------------------------------------


def syn_scan_blocking(
    hosts: Sequence[str],
    ports: Sequence[int],
    *,
    rate_pps: float = DEFAULT_RATE_PPS,
    wait_s: float = WAIT_AFTER_PASS_S,
    retransmissions: int = RETRANSMISSIONS,
    suppress_kernel_rst: bool = False,
    progress: ProgressFn | None = None,
    may_probe: Callable[[str], bool] | None = None,
) -> tuple[dict[str, HostPorts], SynScanReport]:
    """SYN-scan ``ports`` on IPv4 ``hosts`` (blocking; see :func:`syn_scan`)."""
    report = SynScanReport()
    started = time.monotonic()
    results = {ip: HostPorts(ip=ip) for ip in hosts}
    if not hosts or not ports:
        return results, report
    reason = raw_scan_available()
    if reason:
        raise SynScanError(reason)
    for ip in hosts:
        if ipaddress.ip_address(ip).version != 4:
            raise SynScanError(f"{ip} is IPv6; the SYN engine sends IPv4 only")
        if may_probe is not None and not may_probe(ip):
            raise SynScanError(f"{ip} is out of scope; refusing to probe it")  # the last guard
    sport = random.SystemRandom().randint(SOURCE_PORT_MIN, SOURCE_PORT_MAX)
    report.source_port = sport
    jar = CookieJar(sport)

    # The receiver process starts first: its start-up overlaps building the probes.
    source_of = {ip: source_address(ip) for ip in hosts}
    interfaces = sorted({interface_of(src) for src in set(source_of.values())})
    n_hosts, n_ports = len(hosts), len(ports)
    total = n_hosts * n_ports
    rx_socks = _open_receivers(interfaces, sport)
    shared = _SharedAnswers(total, n_hosts)
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    nft = _NftDrop(sport) if suppress_kernel_rst else None
    try:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF_BYTES)
        host_ints = [int.from_bytes(socket.inet_aton(ip), "big") for ip in hosts]
        receiver_cls = _ReceiverThread if total <= RECEIVER_THREAD_MAX_PROBES else _ReceiverProcess
        receiver = receiver_cls(rx_socks, shared, jar, host_ints, ports)
        try:
            plans: list[_HostPlan] = []
            sources: dict[str, bytes] = {}
            for ip in hosts:
                src = source_of[ip]
                if src not in sources:
                    sources[src] = _template(src, sport)
                ip_bytes = socket.inet_aton(ip)
                ip_int = int.from_bytes(ip_bytes, "big")
                tmpl = bytearray(sources[src])
                tmpl[16:20] = ip_bytes
                tcp = bytes(tmpl[20:])
                pseudo = tmpl[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
                # TCP words that vary (dport, seq) are zero in the template, so the base sum excludes them.
                tcp_base = ones_sum(bytes(pseudo) + tcp[:16] + b"\x00\x00" + tcp[18:])
                ip_base = ones_sum(bytes(tmpl[:10]) + bytes(tmpl[12:20]))  # id is zero in the template
                plans.append(_HostPlan(ip, ip_int, ip_bytes, jar.host_key(ip_int), tcp_base, ip_base, src,
                                       socket.inet_aton(src)))
            receiver.wait_ready(shared)
        except BaseException:
            receiver.stop()  # never leave the receiver behind
            raise
        if nft is not None:
            nft.__enter__()
            report.rst_suppressed = nft.active
            if nft.problem:
                report.notes.append(f"kernel RSTs tolerated: {nft.problem}")
        try:
            batches = {src: _Batch(t, BATCH_SIZE) for src, t in sources.items()}
            bucket = TokenBucket(rate_pps, burst=max(float(BATCH_SIZE), rate_pps * BUCKET_BURST_S))
            # First pass over every (host, port) in a random order, hosts fastest.
            perm = Permutation.random(total)
            a, b = perm.a, perm.b
            sent = _send_pass(tx, batches, plans, ports, ((a * i + b) % total for i in range(total)), bucket,
                              jar, sport, report, progress, total)
            report.probes_sent += sent
            report.first_pass_s = time.monotonic() - started
            _wait_answers(shared, wait_s)
            for _ in range(retransmissions):
                if shared.counters()[0] >= total:
                    break
                # Unanswered probes again, in a fresh random order, generated lazily: a
                # silent /24 scanned in full would otherwise be a list of 16 million.
                answered = shared.answered_bits()
                again = Permutation.random(total)
                missing = (idx for idx in ((again.a * i + again.b) % total for i in range(total))
                           if not answered[idx >> 3] >> (idx & 7) & 1)
                resent = _send_pass(tx, batches, plans, ports, missing, bucket, jar, sport, report, None, total)
                report.retransmitted += resent
                report.probes_sent += resent
                _wait_answers(shared, wait_s)
        finally:
            receiver.stop()
            if nft is not None:
                nft.__exit__()
        answers, rejected, drops, _ready = shared.counters()
        answered_per_host, open_bits = shared.answered_per_host(), shared.open_bits()
    finally:
        tx.close()
        for sock in rx_socks:
            sock.close()
        shared.close()

    for index in _set_bits(open_bits, total):
        results[plans[index % n_hosts].ip].open.add(ports[index // n_hosts])
    for host_index, plan in enumerate(plans):
        hp = results[plan.ip]
        hp.closed = answered_per_host[host_index] - len(hp.open)
        hp.filtered = n_ports - answered_per_host[host_index]
    report.answers, report.rejected_answers, report.kernel_drops = answers, rejected, drops
    report.elapsed_s = time.monotonic() - started
    if report.kernel_drops:
        report.notes.append(f"the packet socket dropped {report.kernel_drops} answers (buffer full); "
                            "lower the rate if ports go missing")
    return results, report


def _set_bits(bits: bytes, total: int) -> Iterator[int]:
    """Indices of the set bits (LSB first in each byte) below ``total``."""
    for byte_index, byte in enumerate(bits):
        if byte:
            base = byte_index << 3
            yield from (base + b for b in range(8) if byte >> b & 1 and base + b < total)


def _wait_answers(shared: _SharedAnswers, wait_s: float) -> None:
    """Listen up to ``wait_s`` for late answers, stopping early once every probe is answered."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if shared.counters()[0] >= shared.total:
            return
        time.sleep(0.01)


def _send_pass(
    tx: socket.socket,
    batches: dict[str, _Batch],
    plans: list[_HostPlan],
    ports: Sequence[int],
    indices: Iterator[int],
    bucket: TokenBucket,
    jar: CookieJar,
    sport: int,
    report: SynScanReport,
    progress: ProgressFn | None,
    total: int,
) -> int:
    """Send the probes of ``indices`` (index = port_index * n_hosts + host_index)."""
    n_hosts = len(plans)
    fd = tx.fileno()
    pack_into = struct.pack_into
    table = jar.port_table
    ipid = random.randrange(0x10000)
    sent = 0
    # One batch per source address, each flushed when full.
    fill: dict[str, int] = dict.fromkeys(batches, 0)
    last_progress = 0.0

    def flush(src: str) -> None:
        nonlocal sent
        count = fill[src]
        if not count:
            return
        delay = bucket.delay_for(count)
        if delay > 0:
            time.sleep(delay)
        _sendmmsg_all(fd, batches[src], count, report)
        sent += count
        fill[src] = 0

    # Plain tuples in the hot loop: attribute lookups cost more than the arithmetic.
    rows = [(p.hkey, p.tcp_base, p.ip_base, p.src_bytes, p.ip_bytes, p.source) for p in plans]
    probe_format, ttl, proto, off_syn = _PROBE_FORMAT, 64, socket.IPPROTO_TCP, _TCP_OFF_SYN
    for idx in indices:
        port_index, host_index = divmod(idx, n_hosts)
        hkey, tcp_base, ip_base, src_bytes, ip_bytes, src = rows[host_index]
        port = ports[port_index]
        slot = fill[src]
        batch = batches[src]
        seq = hkey ^ table[port]
        ipid = (ipid + 1) & 0xFFFF
        tcs = tcp_base + port + (seq >> 16) + (seq & 0xFFFF)
        tcs = (tcs & 0xFFFF) + (tcs >> 16)
        tcs = (tcs & 0xFFFF) + (tcs >> 16)
        ics = ip_base + ipid
        ics = (ics & 0xFFFF) + (ics >> 16)
        ics = (ics & 0xFFFF) + (ics >> 16)
        # Bytes 4..40 of the probe in one call: IP id, flags, TTL, protocol, checksum,
        # addresses; TCP ports, sequence, ack, offset+SYN, window, checksum, urgent.
        pack_into(probe_format, batch.packets, slot * PACKET_LEN + 4, ipid, 0, ttl, proto,
                  ~ics & 0xFFFF, src_bytes, ip_bytes, sport, port, seq, 0, off_syn,
                  SYN_WINDOW, ~tcs & 0xFFFF, 0)
        pack_into("4s", batch.addrs, slot * SOCKADDR_LEN + 4, ip_bytes)
        slot += 1
        fill[src] = slot
        if slot == BATCH_SIZE:
            flush(src)
            if progress is not None:
                now = time.monotonic()
                if now - last_progress > 0.1:
                    last_progress = now
                    progress(min(sent, total), total)
    for src in batches:
        flush(src)
    if progress is not None:
        progress(min(sent, total), total)
    return sent


def _sendmmsg_all(fd: int, batch: _Batch, count: int, report: SynScanReport) -> None:
    """Send ``count`` messages of ``batch``, retrying on a full buffer, skipping unroutable ones."""
    start = 0
    stride = ctypes.sizeof(_Mmsghdr)
    stalls = 0
    while start < count:
        n = _libc.sendmmsg(fd, batch.msgs_addr + start * stride, count - start, 0)
        if n > 0:
            start += n
            stalls = 0
            continue
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.ENOBUFS, errno.EINTR) and stalls < 1000:
            stalls += 1
            time.sleep(0.0005)
            continue
        # Unroutable or refused by a local firewall: skip this one probe, note it once.
        note = f"some probes could not be sent: {os.strerror(err)}"
        if note not in report.notes:
            report.notes.append(note)
        start += 1


async def syn_scan(
    hosts: Sequence[str],
    ports: Sequence[int],
    *,
    rate_pps: float = DEFAULT_RATE_PPS,
    wait_s: float = WAIT_AFTER_PASS_S,
    retransmissions: int = RETRANSMISSIONS,
    suppress_kernel_rst: bool = False,
    progress: ProgressFn | None = None,
    may_probe: Callable[[str], bool] | None = None,
) -> tuple[dict[str, HostPorts], SynScanReport]:
    """SYN-scan ``ports`` on IPv4 ``hosts``; one :class:`HostPorts` per host and a report.

    Runs the blocking engine in a thread of its own. ``may_probe`` is the
    scope's last guard: an address it refuses aborts the scan before any probe.
    Raises :class:`SynScanError` when raw sockets are not permitted or a
    target has no route.
    """
    return await asyncio.to_thread(
        syn_scan_blocking, hosts, ports, rate_pps=rate_pps, wait_s=wait_s, retransmissions=retransmissions,
        suppress_kernel_rst=suppress_kernel_rst, progress=progress, may_probe=may_probe,
    )


async def verify_open_ports(ip: str, ports: Sequence[int], *, hold_s: float = VERIFY_HOLD_S,
                            timeout_s: float = 1.0) -> set[int]:
    """Re-verify claimed open ports with full connections (the SYN-proxy guard).

    A port stays open when a full connection succeeds and is not reset
    within ``hold_s`` (a SYN proxy completes the handshake itself, then resets
    the connection when the server behind it refuses).
    """
    limit = asyncio.Semaphore(VERIFY_CONCURRENCY)

    async def one(port: int) -> int | None:
        async with limit:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout_s)
            except (OSError, TimeoutError):
                return None
            try:
                await asyncio.wait_for(reader.read(1), hold_s)
            except TimeoutError:
                pass  # silence: a real, quiet service
            except (ConnectionResetError, BrokenPipeError):
                return None
            except OSError:
                return None
            finally:
                writer.close()
            return port

    found = await asyncio.gather(*(one(p) for p in ports))
    return {p for p in found if p is not None}


if __name__ == "__main__":
    if sys.argv[1:] == ["--receiver"]:
        sys.exit(_receiver_main())
    sys.exit("usage: python -m appliance.scan.synscan --receiver (started by the engine itself)")
