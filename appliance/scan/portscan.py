"""The host-and-port pipeline: scope → discovery → port scan → services → HostResults.

One async entry point for both callers: the job engine (with a JobSpec's
``options`` and its resolved targets) and ``vsa scan`` (with command-line
entries). Every targeted host gets exactly one HostResult: ``excluded``
(out of scope or excluded by the job), ``down`` (no answer to discovery) or
``scanned`` with its open ports.

The engine is chosen here: the SYN engine when raw sockets are permitted
(CAP_NET_RAW), else the connect engine, and the results' ``errors`` say so.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.errors import VsaError
from appliance.results import HostResult, Port
from appliance.scan import connectscan, discovery, portlists, services, synscan
from appliance.scan.connectscan import HostPorts
from appliance.scan.targets import Scope, ScopedTarget, expand_targets, make_scope, scope_targets

EngineChoice = Literal["auto", "syn", "connect"]
# Per-call host chunk of the SYN engine: bounds its shared answer bitmaps
# (hosts x ports bits) to a few MiB even for full scans.
SYN_HOSTS_PER_CALL = 256
CONNECT_HOSTS_PER_CALL = 64
MAX_RATE_PPS = 1_000_000
MAX_PARALLEL_HOSTS = 256
ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


class ScanOptionError(VsaError):
    """A scan option is out of range or malformed; the message names the field."""


@dataclass(frozen=True)
class PortScanOptions:
    """The JobSpec options this pipeline reads (PROTOCOL.md), validated."""

    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...] = ()
    host_discovery: bool = True
    service_detection: Literal["banner", "nmap", "none"] = "banner"
    rate_pps: int = synscan.DEFAULT_RATE_PPS
    max_parallel_hosts: int = 16
    host_timeout_s: float = 900.0
    engine: EngineChoice = "auto"

    @classmethod
    def from_job(cls, options: Mapping[str, Any], *, engine: EngineChoice = "auto") -> PortScanOptions:
        """Validate a JobSpec ``options`` object; raises :class:`ScanOptionError` naming the field."""
        if not isinstance(options, Mapping):
            raise ScanOptionError("options must be an object")
        try:
            tcp = portlists.tcp_ports(options.get("tcp_ports", "standard"))
            udp = portlists.udp_ports(options.get("udp_ports", "none"))
        except portlists.PortSpecError as exc:
            raise ScanOptionError(f"options.{exc}") from None
        discovery_mode = options.get("host_discovery", "default")
        if discovery_mode not in ("default", "none"):
            raise ScanOptionError(f"options.host_discovery: {discovery_mode!r} is neither 'default' nor 'none'")
        detection = options.get("service_detection", "banner")
        if detection not in ("banner", "nmap"):
            raise ScanOptionError(f"options.service_detection: {detection!r} is neither 'banner' nor 'nmap'")
        return cls(
            tcp_ports=tcp,
            udp_ports=udp,
            host_discovery=discovery_mode == "default",
            service_detection=detection,
            rate_pps=_int_option(options, "rate_pps", synscan.DEFAULT_RATE_PPS, 1, MAX_RATE_PPS),
            max_parallel_hosts=_int_option(options, "max_parallel_hosts", 16, 1, MAX_PARALLEL_HOSTS),
            host_timeout_s=float(_int_option(options, "host_timeout_s", 900, 1, 86_400)),
            engine=engine,
        )


def _int_option(options: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScanOptionError(f"options.{name}: {value!r} is not a whole number")
    if not low <= value <= high:
        raise ScanOptionError(f"options.{name}: {value} is outside {low}..{high}")
    return value


@dataclass
class PortScanRun:
    """The outcome of one pipeline run: a HostResult per target, and how it ran."""

    results: list[HostResult]
    engine: str  # "syn" or "connect" (the TCP port-scan engine that ran)
    notes: list[str] = field(default_factory=list)  # job-level remarks (engine fallback, drops)
    timings_s: dict[str, float] = field(default_factory=dict)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def choose_engine(requested: EngineChoice) -> tuple[str, str | None]:
    """(engine, note): the SYN engine when raw sockets are permitted, else connect with a reason."""
    if requested == "connect":
        return "connect", None
    reason = synscan.raw_scan_available()
    if reason is None:
        return "syn", None
    if requested == "syn":
        raise ScanOptionError(f"the SYN engine was requested but {reason}")
    return "connect", f"{reason}: ran the connect engine instead of the SYN engine"


async def scan_targets(
    entries: Sequence[str],
    options: PortScanOptions,
    *,
    exclude: Sequence[str] = (),
    allow_targets: Sequence[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    own_addresses: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> PortScanRun:
    """Expand ``entries`` (addresses, CIDRs, ranges) and scan them; one HostResult per address.

    Raises :class:`appliance.scan.targets.TargetError` for a malformed or
    oversized entry, before anything is sent.
    """
    scope = make_scope(exclude, own_addresses=discovery.local_addresses() if own_addresses is None else own_addresses,
                       allow=allow_targets)
    return await scan_scoped(expand_targets(entries, scope), options, scope=scope, progress=progress)


async def scan_scoped(
    scoped: Sequence[ScopedTarget],
    options: PortScanOptions,
    *,
    scope: Scope | None = None,
    progress: ProgressFn | None = None,
) -> PortScanRun:
    """Scan already-judged targets (see :func:`appliance.scan.targets.scope_targets`).

    ``scope``, when given, is asked again before any probe (a last guard).
    Results come back in the order of ``scoped``.
    """
    started = time.monotonic()
    engine, note = choose_engine(options.engine)
    notes = [note] if note else []
    if scope is not None:
        scoped = [s if not s.scannable or scope.may_probe(s.target.ip) else
                  ScopedTarget(s.target, *scope.verdict(s.target.ip)) for s in scoped]
    results: dict[str, HostResult] = {}
    live = [s for s in scoped if s.scannable]
    for s in scoped:
        if not s.scannable:
            results[s.target.host_key] = s.excluded_result()
    started_at = {s.target.host_key: _now() for s in live}
    ips = list(dict.fromkeys(s.target.ip for s in live))
    timings: dict[str, float] = {}

    def phase(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(name, done, total)

    # ---- discovery ----
    t0 = time.monotonic()
    v4 = [ip for ip in ips if ipaddress.ip_address(ip).version == 4]
    syn_ok = engine == "syn"

    async def syn_prober(hosts: Sequence[str], ports: Sequence[int]) -> dict[str, HostPorts]:
        v4_hosts = [h for h in hosts if ":" not in h]
        out: dict[str, HostPorts] = {}
        if v4_hosts:
            found, _report = await synscan.syn_scan(v4_hosts, ports, rate_pps=options.rate_pps,
                                                    wait_s=discovery.DISCOVERY_TIMEOUT_S,
                                                    may_probe=scope.may_probe if scope else None)
            out.update(found)
        v6_hosts = [h for h in hosts if ":" in h]
        if v6_hosts:
            out.update(await connectscan.connect_scan(v6_hosts, ports, timeout_s=discovery.DISCOVERY_TIMEOUT_S))
        return out

    if progress:
        progress("discovery", 0, len(ips))
    liveness = await discovery.discover(ips, enabled=options.host_discovery,
                                        tcp_prober=syn_prober if syn_ok else None)
    alive = [ip for ip in ips if liveness[ip].alive]
    if progress:
        progress("discovery", len(ips), len(ips))
    timings["discovery"] = time.monotonic() - t0

    # ---- TCP ports ----
    t0 = time.monotonic()
    found: dict[str, HostPorts] = {}
    host_errors: dict[str, list[str]] = {ip: [] for ip in ips}
    syn_hosts = [ip for ip in alive if syn_ok and ip in v4]
    connect_hosts = [ip for ip in alive if ip not in syn_hosts]
    total_probes = len(alive) * len(options.tcp_ports)
    done_before = 0

    def chunk_progress(offset: int) -> Callable[[int, int], None] | None:
        report = phase("scanning")
        if report is None:
            return None
        return lambda done, _total: report(offset + done, total_probes)

    for start in range(0, len(syn_hosts), SYN_HOSTS_PER_CALL):
        chunk = syn_hosts[start:start + SYN_HOSTS_PER_CALL]
        part, report = await synscan.syn_scan(chunk, options.tcp_ports, rate_pps=options.rate_pps,
                                              progress=chunk_progress(done_before),
                                              may_probe=scope.may_probe if scope else None)
        done_before += len(chunk) * len(options.tcp_ports)
        found.update(part)
        notes.extend(n for n in report.notes if n not in notes)
    for start in range(0, len(connect_hosts), CONNECT_HOSTS_PER_CALL):
        chunk = connect_hosts[start:start + CONNECT_HOSTS_PER_CALL]
        part = await connectscan.connect_scan(chunk, options.tcp_ports, rate_pps=options.rate_pps,
                                              progress=chunk_progress(done_before))
        done_before += len(chunk) * len(options.tcp_ports)
        found.update(part)
    if syn_ok:
        for ip in connect_hosts:
            host_errors[ip].append("IPv6 target: ran the connect engine (the SYN engine sends IPv4 only)")
    timings["ports"] = time.monotonic() - t0

    # ---- the SYN-proxy guard ----
    t0 = time.monotonic()
    for ip in syn_hosts:
        hp = found[ip]
        if synscan.implausible_open_count(len(hp.open), len(options.tcp_ports)):
            claimed = len(hp.open)
            hp.open = await synscan.verify_open_ports(ip, sorted(hp.open))
            host_errors[ip].append(
                f"{claimed} ports answered SYN-ACK, implausibly many (a SYN proxy or firewall?): "
                f"re-verified with full connections, {len(hp.open)} open"
            )
    timings["verify"] = time.monotonic() - t0

    # ---- UDP ----
    udp: dict[str, dict[int, str]] = {}
    if options.udp_ports and alive:
        udp = await connectscan.udp_scan(alive, options.udp_ports)

    # ---- services, a bounded number of hosts at once ----
    t0 = time.monotonic()
    limit = asyncio.Semaphore(options.max_parallel_hosts)
    ports_of: dict[str, list[Port]] = {}

    async def host_services(ip: str) -> None:
        async with limit:
            open_ports = sorted(found[ip].open) if ip in found else []
            try:
                ports, errors = await asyncio.wait_for(
                    services.detect_services(ip, open_ports, method=options.service_detection),
                    options.host_timeout_s)
            except TimeoutError:
                ports = [Port(proto="tcp", port=p) for p in open_ports]
                errors = [f"service detection stopped after host_timeout_s={options.host_timeout_s:g}"]
            udp_ports = [Port(proto="udp", port=p, state="open" if state == "open" else "open|filtered",
                              service=services.WELL_KNOWN.get(p))
                         for p, state in sorted(udp.get(ip, {}).items()) if state in ("open", "open|filtered")]
            ports_of[ip] = ports + udp_ports
            host_errors[ip].extend(errors)

    if progress:
        progress("services", 0, len(alive))
    await _gather_with_progress([host_services(ip) for ip in alive], phase("services"))
    timings["services"] = time.monotonic() - t0

    for s in live:
        ip = s.target.ip
        hr = HostResult(target=s.target, status="scanned" if liveness[ip].alive else "down",
                        started_at=started_at[s.target.host_key], finished_at=_now())
        if liveness[ip].alive:
            hr.ports = ports_of.get(ip, [])
            hr.errors = [*notes, *host_errors[ip]]
            scanned_ports = found.get(ip)
            if scanned_ports is not None and scanned_ports.unreachable:
                hr.errors.append("no route to the host (nothing answered ARP): no port could be probed")
            elif scanned_ports is not None and not scanned_ports.answered and options.tcp_ports:
                hr.errors.append(f"no answer on any of the {len(options.tcp_ports)} TCP ports probed: "
                                 "every port filtered")
        results[s.target.host_key] = hr
    timings["total"] = time.monotonic() - started
    return PortScanRun(results=[results[s.target.host_key] for s in scoped], engine=engine, notes=notes,
                       timings_s=timings)


async def _gather_with_progress(coros: list[Awaitable[None]], report: Callable[[int, int], None] | None) -> None:
    total = len(coros)
    done = 0

    async def wrap(coro: Awaitable[None]) -> None:
        nonlocal done
        await coro
        done += 1
        if report is not None:
            report(done, total)

    await asyncio.gather(*(wrap(c) for c in coros))


__all__ = ["PortScanOptions", "PortScanRun", "ScanOptionError", "choose_engine", "scan_scoped",
           "scan_targets", "scope_targets"]
