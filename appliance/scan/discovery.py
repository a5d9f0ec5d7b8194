"""Host discovery: which targets are alive, and the appliance's own addresses.

A host is alive when it answers an ICMP echo request (sent on a raw socket
when ``CAP_NET_RAW`` is held, else on an unprivileged ICMP datagram socket
when the kernel's ``ping_group_range`` allows it) or any TCP probe to a few
common ports: an accepted connection *and a refused one* (the host's RST)
both prove the host is there. No answer to anything within the timeout and
one retry: ``down``. ``host_discovery: none`` skips all this and treats every
target as alive (:func:`discover` with ``enabled=False``).

TCP probes go through the SYN engine when raw sockets are permitted (one
stateless pass over every host), else through connect probes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.scan.connectscan import HostPorts, connect_scan

# How long a silent host gets per try (two tries): nmap -T4 starts from a 500 ms
# round-trip timeout; 750 ms covers cross-region VPC paths with room to spare.
DISCOVERY_TIMEOUT_S = 0.75
DISCOVERY_RETRIES = 1
# nmap's default discovery uses 80 and 443; these add the usual server and
# Windows ports, where a firewall that drops the web ports may still let one through.
DISCOVERY_TCP_PORTS: tuple[int, ...] = (80, 443, 22, 3389, 445, 135, 139, 21, 25, 8080)
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0

TcpProber = Callable[[Sequence[str], Sequence[int]], Awaitable[dict[str, HostPorts]]]


@dataclass(frozen=True)
class Liveness:
    """Whether a host is alive, and the evidence."""

    ip: str
    alive: bool
    evidence: str | None = None  # e.g. "icmp echo reply", "tcp/22 open", "tcp/80 refused"


# ---- own addresses -------------------------------------------------------------------


def parse_fib_trie(text: str) -> set[str]:
    """The local IPv4 addresses in a ``/proc/net/fib_trie`` text (``/32 host LOCAL`` entries)."""
    out: set[str] = set()
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("/32 host LOCAL") and previous.startswith("|-- "):
            out.add(previous[4:].strip())
        previous = stripped
    return out


def parse_if_inet6(text: str) -> set[str]:
    """The IPv6 addresses in a ``/proc/net/if_inet6`` text."""
    out: set[str] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            out.add(str(ipaddress.IPv6Address(int(fields[0], 16))))
    return out


def local_addresses() -> set[str]:
    """Every address of this network namespace (the appliance's own addresses)."""
    out: set[str] = set()
    for path, parse in ((Path("/proc/net/fib_trie"), parse_fib_trie), (Path("/proc/net/if_inet6"), parse_if_inet6)):
        try:
            out |= parse(path.read_text())
        except OSError:
            continue  # no IPv6 in this kernel, or /proc not mounted: nothing to add
    return out


# ---- ICMP echo ----------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    """An ICMP echo request with its checksum."""
    payload = b"vsa-discovery"
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


def _open_icmp_socket() -> tuple[socket.socket, bool] | None:
    """A raw ICMP socket (True), else a datagram ICMP socket (False), else None."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True
    except PermissionError:
        pass
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False
    except OSError:
        return None


async def icmp_sweep(hosts: Sequence[str], *, timeout_s: float, retries: int) -> set[str]:
    """IPv4 hosts that answered an ICMP echo request (empty when ICMP cannot be sent)."""
    targets = [h for h in hosts if ":" not in h]
    opened = _open_icmp_socket() if targets else None
    if opened is None:
        return set()
    sock, raw = opened
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    ident = random.randrange(1, 0xFFFF) if raw else 0  # the kernel picks the id of a datagram socket
    alive: set[str] = set()
    wanted = set(targets)
    everyone = asyncio.Event()

    def on_readable() -> None:
        while True:
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if raw:
                ihl = (data[0] & 0x0F) * 4
                data = data[ihl:]
            if len(data) < 8 or data[0] != ICMP_ECHO_REPLY:
                continue
            if raw and struct.unpack("!H", data[4:6])[0] != ident:
                continue  # somebody else's ping
            if addr[0] in wanted:
                alive.add(addr[0])
                if wanted <= alive:
                    everyone.set()

    loop.add_reader(sock.fileno(), on_readable)
    try:
        for attempt in range(retries + 1):
            for seq, ip in enumerate(targets):
                if ip in alive:
                    continue
                try:
                    sock.sendto(echo_request(ident, (attempt << 12 | seq) & 0xFFFF), (ip, 0))
                except OSError:
                    continue  # no route, or a full buffer: this host just gets no echo
            try:
                await asyncio.wait_for(everyone.wait(), timeout_s)
                break
            except TimeoutError:
                continue  # some hosts are silent: try them once more
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
    return alive


# ---- the sweep -------------------------------------------------------------------------


async def _connect_prober(hosts: Sequence[str], ports: Sequence[int]) -> dict[str, HostPorts]:
    return await connect_scan(hosts, ports, timeout_s=DISCOVERY_TIMEOUT_S, retries=DISCOVERY_RETRIES)


async def discover(
    hosts: Sequence[str],
    *,
    enabled: bool = True,
    tcp_ports: Sequence[int] = DISCOVERY_TCP_PORTS,
    tcp_prober: TcpProber | None = None,
    icmp: bool = True,
    timeout_s: float = DISCOVERY_TIMEOUT_S,
    retries: int = DISCOVERY_RETRIES,
) -> dict[str, Liveness]:
    """Find which ``hosts`` are alive; one :class:`Liveness` per host.

    ``enabled=False`` (``host_discovery: none``) marks every host alive
    without sending anything. ``tcp_prober`` scans the discovery ports (the
    SYN engine when raw sockets are allowed); by default a connect scan.
    """
    if not enabled:
        return {ip: Liveness(ip, True, "host discovery disabled") for ip in hosts}
    prober = tcp_prober or _connect_prober
    icmp_task = asyncio.ensure_future(
        icmp_sweep(hosts, timeout_s=timeout_s, retries=retries) if icmp else _nothing()
    )
    tcp = await prober(hosts, tcp_ports)
    pinged = await icmp_task
    out: dict[str, Liveness] = {}
    for ip in hosts:
        ports = tcp.get(ip)
        if ports is not None and ports.open:
            out[ip] = Liveness(ip, True, f"tcp/{min(ports.open)} open")
        elif ports is not None and ports.closed:
            out[ip] = Liveness(ip, True, "tcp connection refused (RST)")
        elif ip in pinged:
            out[ip] = Liveness(ip, True, "icmp echo reply")
        else:
            out[ip] = Liveness(ip, False, None)
    return out


async def _nothing() -> set[str]:
    return set()


def have_raw_icmp() -> bool:
    """True when this process may open a raw ICMP socket (CAP_NET_RAW)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
        return True
    except PermissionError:
        return False


__all__ = ["DISCOVERY_TCP_PORTS", "Liveness", "discover", "have_raw_icmp", "icmp_sweep",
           "local_addresses", "parse_fib_trie", "parse_if_inet6"]
