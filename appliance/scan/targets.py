"""Target expansion and scope: which addresses a job may probe (pure, no I/O).

A job's ``targets.ips`` and ``exclude`` hold addresses, CIDR blocks and
``first-last`` ranges, IPv4 or IPv6 (PROTOCOL.md, JobSpec). RUNTIME.md's scope
section fixes what may never be scanned: the built-in forbidden ranges and the
appliance's own addresses (status ``excluded``, reason ``out_of_scope``),
unless ``scan.allow_targets`` lists them. Addresses the job excludes get
status ``excluded``, reason ``excluded_by_job``. A block of more than 65,536
addresses refuses the whole job, naming the block.

Every targeted address yields exactly one :class:`ScopedTarget` (duplicates
are merged, first appearance wins the position), so that every target gets
exactly one HostResult.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from appliance.errors import VsaError
from appliance.results import HostResult, Target

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RUNTIME.md, Scope: never scanned whatever a job says, unless scan.allow_targets lists them.
FORBIDDEN_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, and the instance metadata service
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
        "::1/128",
        "fe80::/10",
        "ff00::/8",
    )
)
MAX_BLOCK_ADDRESSES = 65_536

Verdict = Literal["scan", "excluded"]
REASON_OUT_OF_SCOPE = "out_of_scope"
REASON_EXCLUDED_BY_JOB = "excluded_by_job"


class TargetError(VsaError):
    """A target or exclude entry is malformed or too large; the message names the entry."""

    def __init__(self, entry: str, problem: str, *, field: str = "targets.ips") -> None:
        self.entry = entry
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {entry!r} {problem}")


@dataclass(frozen=True)
class AddressRange:
    """An inclusive range of addresses of one family, parsed from one entry."""

    entry: str
    first: IPAddress
    last: IPAddress

    @property
    def size(self) -> int:
        """How many addresses the range holds."""
        return int(self.last) - int(self.first) + 1

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return address.version == self.first.version and int(self.first) <= int(address) <= int(self.last)

    def addresses(self) -> Iterator[IPAddress]:
        """Every address of the range, in order."""
        cls = type(self.first)
        for value in range(int(self.first), int(self.last) + 1):
            yield cls(value)


@dataclass(frozen=True)
class ScopedTarget:
    """One targeted address and the scope's verdict on it."""

    target: Target
    verdict: Verdict
    reason: str | None = None  # out_of_scope, excluded_by_job; None when scanned

    @property
    def scannable(self) -> bool:
        """True when the address may be probed."""
        return self.verdict == "scan"

    def excluded_result(self) -> HostResult:
        """The HostResult of an excluded target (status ``excluded`` with its reason)."""
        if self.scannable:
            raise ValueError(f"{self.target.ip} is in scope; it has no excluded result")
        return HostResult(target=self.target, status="excluded", reason=self.reason)


def parse_entry(entry: str, *, field: str = "targets.ips", limit: int | None = MAX_BLOCK_ADDRESSES) -> AddressRange:
    """Parse one address, CIDR block or ``first-last`` range.

    ``limit`` bounds the size of the block (None: no bound, for excludes).
    Raises :class:`TargetError` naming the entry and what is wrong.
    """
    if not isinstance(entry, str):
        raise TargetError(repr(entry), "is not a string", field=field)
    text = entry.strip()
    if not text:
        raise TargetError(entry, "is empty", field=field)
    if "-" in text:
        first_text, _, last_text = text.partition("-")
        first = _address(entry, first_text.strip(), field)
        last_text = last_text.strip()
        try:
            last = ipaddress.ip_address(last_text)
        except ValueError:
            hint = ""
            if first.version == 4 and last_text.isdigit():
                hint = f" (write the range in full, e.g. {first}-{'.'.join(str(first).split('.')[:3])}.{last_text})"
            raise TargetError(entry, f"has {last_text!r} as its last address, which is not an IP address{hint}", field=field) from None
        if first.version != last.version:
            raise TargetError(entry, "mixes IPv4 and IPv6 addresses", field=field)
        if int(last) < int(first):
            raise TargetError(entry, "ends before it starts", field=field)
        rng = AddressRange(entry=text, first=first, last=last)
    elif "/" in text:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise TargetError(entry, f"is not a valid CIDR block ({exc})", field=field) from None
        rng = AddressRange(entry=text, first=network[0], last=network[-1])
    else:
        address = _address(entry, text, field)
        rng = AddressRange(entry=text, first=address, last=address)
    if limit is not None and rng.size > limit:
        raise TargetError(
            entry,
            f"expands to {rng.size:,} addresses, more than the {limit:,} allowed per block; split it",
            field=field,
        )
    return rng


def _address(entry: str, text: str, field: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise TargetError(entry, f"has {text!r}, which is not an IP address", field=field) from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise TargetError(entry, "has a scoped IPv6 address, which cannot be targeted", field=field)
    return address


def in_networks(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """True when ``address`` lies in any of ``networks`` (of its family)."""
    return any(address.version == n.version and address in n for n in networks)


@dataclass(frozen=True)
class Scope:
    """The scope rules of RUNTIME.md for one job, as a value.

    ``own_addresses``: the appliance's own addresses; ``allow``: the
    ``scan.allow_targets`` networks that override the forbidden ranges and the
    own addresses; ``exclude``: the job's exclude ranges.
    """

    own_addresses: frozenset[IPAddress] = frozenset()
    allow: tuple[IPNetwork, ...] = ()
    exclude: tuple[AddressRange, ...] = ()

    def verdict(self, address: IPAddress | str) -> tuple[Verdict, str | None]:
        """The verdict on one address: ("scan", None) or ("excluded", reason)."""
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            # ::ffff:127.0.0.1 reaches 127.0.0.1: judge the IPv4 address it maps to.
            mapped_verdict = self.verdict(addr.ipv4_mapped)
            if mapped_verdict[0] == "excluded":
                return mapped_verdict
        forbidden = in_networks(addr, FORBIDDEN_NETWORKS) or addr in self.own_addresses
        if forbidden and not in_networks(addr, self.allow):
            return "excluded", REASON_OUT_OF_SCOPE
        if any(addr in rng for rng in self.exclude):
            return "excluded", REASON_EXCLUDED_BY_JOB
        return "scan", None

    def may_probe(self, address: IPAddress | str) -> bool:
        """True when a probe may be sent to ``address`` (the engines' last guard)."""
        return self.verdict(address)[0] == "scan"


def make_scope(
    exclude: Sequence[str] = (),
    *,
    own_addresses: Iterable[IPAddress | str] = (),
    allow: Iterable[IPNetwork | str] = (),
) -> Scope:
    """Build a :class:`Scope`; raises :class:`TargetError` for a malformed exclude entry."""
    return Scope(
        own_addresses=frozenset(ipaddress.ip_address(a) if isinstance(a, str) else a for a in own_addresses),
        allow=tuple(ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in allow),
        exclude=tuple(parse_entry(e, field="exclude", limit=None) for e in exclude),
    )


def expand_targets(entries: Sequence[str], scope: Scope | None = None) -> list[ScopedTarget]:
    """Expand target entries into one :class:`ScopedTarget` per distinct address.

    All entries are parsed first, so a malformed or oversized entry refuses
    the whole job before anything is expanded. Order: first appearance.
    """
    scope = scope or Scope()
    ranges = [parse_entry(e) for e in entries]
    seen: set[IPAddress] = set()
    out: list[ScopedTarget] = []
    for rng in ranges:
        for address in rng.addresses():
            if address in seen:
                continue
            seen.add(address)
            verdict, reason = scope.verdict(address)
            out.append(ScopedTarget(target=Target(ip=str(address)), verdict=verdict, reason=reason))
    return out


def scope_targets(targets: Iterable[Target], scope: Scope) -> list[ScopedTarget]:
    """Judge already-resolved targets (e.g. EC2 instances), merging duplicate host keys."""
    seen: set[str] = set()
    out: list[ScopedTarget] = []
    for target in targets:
        if target.host_key in seen:
            continue
        seen.add(target.host_key)
        try:
            verdict, reason = scope.verdict(target.ip)
        except ValueError as exc:
            raise TargetError(target.ip, f"is not an IP address ({exc})", field="target") from None
        out.append(ScopedTarget(target=target, verdict=verdict, reason=reason))
    return out
