"""The connect scan: full TCP connections with asyncio, for when raw sockets are not permitted.

Each probe is one ``connect()`` with a short timeout: an accepted connection
is ``open``, a refusal (the target's RST) is ``closed``, silence is
``filtered``; "no route to host" (nothing answers ARP) marks the host
unreachable, after which its remaining probes are skipped. Concurrency is
bounded by a semaphore and, when given, by a token-bucket rate (``rate_pps``
is then connection attempts per second). Probes go round-robin across hosts
in a random port order, so no host takes the whole burst at once.

The result type :class:`HostPorts` is shared by both engines.
"""

from __future__ import annotations

import asyncio
import errno
import random
import resource
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ENGINE_NAME = "connect"
CONNECT_TIMEOUT_S = 1.0
DEFAULT_CONCURRENCY = 1024
RETRIES = 1  # one more try for a port that stayed silent
# Keep some descriptors for everything else the process does.
FD_RESERVE = 256

ProgressFn = Callable[[int, int], None]


@dataclass
class HostPorts:
    """What a port scan learnt of one host."""

    ip: str
    open: set[int] = field(default_factory=set)
    closed: int = 0
    filtered: int = 0
    unreachable: bool = False  # no route / nothing answered ARP

    @property
    def answered(self) -> bool:
        """True when the host answered at all (an open or a closed port)."""
        return bool(self.open) or self.closed > 0


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, bursts of at most ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate / 100))
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def delay_for(self, count: float = 1.0) -> float:
        """Take ``count`` tokens; return how many seconds to wait before using them."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= count
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (LAB-NOTES: above the scan's concurrency).

    Returns the usable concurrency under the resulting limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + FD_RESERVE
    if soft < target:
        new_soft = target if hard == resource.RLIM_INFINITY else min(hard, target)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass  # keep the old limit; concurrency is reduced below instead
    return max(1, min(wanted, soft - FD_RESERVE))


async def probe_port(ip: str, port: int, timeout_s: float) -> str:
    """One connect probe: ``open``, ``closed``, ``filtered`` or ``unreachable``."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    # Close with a RST rather than a FIN: no TIME_WAIT left behind per probe.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout_s)
        return "open"
    except ConnectionRefusedError:
        return "closed"
    except TimeoutError:
        return "filtered"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
            return "unreachable"
        return "filtered"
    finally:
        sock.close()


async def connect_scan(
    hosts: Sequence[str],
    ports: Sequence[int],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    timeout_s: float = CONNECT_TIMEOUT_S,
    rate_pps: float | None = None,
    retries: int = RETRIES,
    progress: ProgressFn | None = None,
) -> dict[str, HostPorts]:
    """Connect-scan ``ports`` on every host; one :class:`HostPorts` per host.

    ``progress(done, total)`` is called as probes finish (first pass only).
    Silent ports are tried ``retries`` more times before they count as filtered.
    """
    results = {ip: HostPorts(ip=ip) for ip in hosts}
    if not hosts or not ports:
        return results
    limit = asyncio.Semaphore(raise_fd_limit(concurrency))
    bucket = TokenBucket(rate_pps) if rate_pps else None
    total = len(hosts) * len(ports)
    done = 0

    async def one(ip: str, port: int, silent: list[tuple[str, int]]) -> None:
        nonlocal done
        result = results[ip]
        try:
            if result.unreachable:
                return
            state = await probe_port(ip, port, timeout_s)
            if state == "open":
                result.open.add(port)
            elif state == "closed":
                result.closed += 1
            elif state == "unreachable":
                result.unreachable = True
            else:
                silent.append((ip, port))
        finally:
            limit.release()
            done += 1
            if progress is not None:
                progress(min(done, total), total)

    async def run(probes: list[tuple[str, int]]) -> list[tuple[str, int]]:
        silent: list[tuple[str, int]] = []
        tasks = set()
        for ip, port in probes:
            await limit.acquire()
            if bucket is not None:
                wait = bucket.delay_for()
                if wait > 0:
                    await asyncio.sleep(wait)
            task = asyncio.ensure_future(one(ip, port, silent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        return silent

    order = list(ports)
    random.shuffle(order)
    probes = [(ip, port) for port in order for ip in hosts]  # round-robin across hosts
    silent = await run(probes)
    for _ in range(retries):
        if not silent:
            break
        silent = await run([(ip, port) for ip, port in silent if not results[ip].unreachable])
    for ip, _port in silent:
        results[ip].filtered += 1
    for result in results.values():
        if result.unreachable:
            result.filtered = 0
    return results


# ---- UDP -------------------------------------------------------------------------------

UDP_TIMEOUT_S = 1.0
# Linux lets a host send about six ICMP port-unreachables at once, then one a
# second (icmp_ratelimit): silent ports are asked again, this many more times.
UDP_RETRIES = 2
UDP_PROBES_PER_HOST = 16
# Requests that make common UDP services answer; other ports get an empty datagram.
UDP_PAYLOADS: dict[int, bytes] = {
    # DNS: a query for the root's NS records, id 0x5653.
    53: bytes.fromhex("56530100000100000000000000000200 01".replace(" ", "")),
    # NTP: a version 3 client request.
    123: b"\x1b" + b"\x00" * 47,
    # SNMP v1 get-request for sysDescr.0 with community "public".
    161: bytes.fromhex("302602010004067075626c6963a01902044e56534102010002010030"
                       "0b300906052b060102010500"),
    # NetBIOS name service: a node status request for "*".
    137: bytes.fromhex("a2480000000100000000000020434b41414141414141414141414141414141414141"
                       "414141414141414141410000210001"),
}


class _UdpProbe(asyncio.DatagramProtocol):
    def __init__(self, done: asyncio.Future[str]) -> None:
        self.done = done

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.done.done():
            self.done.set_result("open")

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_result("closed" if isinstance(exc, ConnectionRefusedError) else "open|filtered")


async def udp_probe(ip: str, port: int, timeout_s: float = UDP_TIMEOUT_S) -> str:
    """One UDP probe: ``open`` (an answer), ``closed`` (ICMP port unreachable) or ``open|filtered``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProbe(done), remote_addr=(ip, port))
    try:
        transport.sendto(UDP_PAYLOADS.get(port, b""))
        return await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        return "open|filtered"
    finally:
        transport.close()


async def udp_scan(hosts: Sequence[str], ports: Sequence[int], *, timeout_s: float = UDP_TIMEOUT_S,
                   retries: int = UDP_RETRIES) -> dict[str, dict[int, str]]:
    """UDP-scan ``ports`` on every host: per host, each port's state (silent ports asked again)."""
    out: dict[str, dict[int, str]] = {}

    async def host(ip: str) -> None:
        limit = asyncio.Semaphore(UDP_PROBES_PER_HOST)
        states: dict[int, str] = {}

        async def one(port: int) -> None:
            async with limit:
                try:
                    states[port] = await udp_probe(ip, port, timeout_s)
                except OSError:
                    states[port] = "open|filtered"

        pending = list(ports)
        for _attempt in range(retries + 1):
            await asyncio.gather(*(one(p) for p in pending))
            pending = [p for p in pending if states.get(p) == "open|filtered"]
            if not pending:
                break
        out[ip] = states

    await asyncio.gather(*(host(ip) for ip in hosts))
    return out
