"""Typed values of a host's result, as PROTOCOL.md's HostResult defines them.

Each stage of a host's pipeline fills part of a :class:`HostResult`; the
engine hands the finished value to the spool, and :meth:`HostResult.to_wire`
gives the JSON object sent to the platform. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

HostStatus = Literal["scanned", "down", "excluded", "unreachable", "error"]
AuthStatus = Literal["success", "failed", "error", "not_applicable"]
AuthType = Literal["unix", "windows"]


@dataclass(frozen=True)
class Target:
    """One host to scan: its address and, for EC2 targets, the EC2 facts."""

    ip: str
    hostname: str | None = None
    instance_id: str | None = None
    region: str | None = None
    vpc_id: str | None = None
    subnet_id: str | None = None
    instance_type: str | None = None
    image_id: str | None = None
    state: str | None = None
    private_dns: str | None = None
    public_dns: str | None = None
    public_ip: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def host_key(self) -> str:
        """The key the platform files this host under: instance ID, else the IP."""
        return self.instance_id or self.ip

    def to_wire(self) -> dict[str, Any]:
        """The ``target`` object of a HostResult."""
        return asdict(self)


@dataclass(frozen=True)
class Port:
    """One open port and what was learnt of its service."""

    proto: Literal["tcp", "udp"]
    port: int
    state: Literal["open", "open|filtered"] = "open"
    service: str | None = None
    banner: str | None = None
    product: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class OsInfo:
    """What is known of the host's operating system, and how it was learnt."""

    family: str | None = None  # linux, windows, ...
    name: str | None = None
    version: str | None = None
    kernel: str | None = None
    arch: str | None = None
    source: str | None = None  # ssh, smb, banner


@dataclass(frozen=True)
class AuthOutcome:
    """The result of one authentication record on one host."""

    record_id: str | None
    type: AuthType
    status: AuthStatus
    privileged: bool = False
    message: str | None = None


@dataclass(frozen=True)
class Package:
    """One installed package, with its source package where the manager knows it."""

    name: str
    version: str
    arch: str | None = None
    source_name: str | None = None
    source_version: str | None = None


@dataclass(frozen=True)
class Packages:
    """A host's installed packages and the OSV ecosystem they belong to."""

    manager: str  # dpkg, rpm, apk
    ecosystem: str  # OSV ecosystem name, e.g. "Debian:12"
    items: tuple[Package, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "manager": self.manager,
            "ecosystem": self.ecosystem,
            "items": [asdict(p) for p in self.items],
        }


@dataclass(frozen=True)
class Finding:
    """One vulnerability or weakness found on a host."""

    id: str
    source: str  # "osv", or "vsa" for the project's own network findings
    severity: int  # 1..5, 5 the most severe
    title: str
    package: str | None = None
    source_package: str | None = None
    installed: str | None = None
    fixed: str | None = None
    detection: str = "package"  # package, network
    evidence: str | None = None


@dataclass
class HostResult:
    """Everything the appliance says of one targeted host (mutable while it is built)."""

    target: Target
    status: HostStatus
    reason: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    ports: list[Port] = field(default_factory=list)
    os: OsInfo | None = None
    auth: list[AuthOutcome] = field(default_factory=list)
    packages: Packages | None = None
    findings: list[Finding] = field(default_factory=list)
    instance_metadata: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def host_key(self) -> str:
        return self.target.host_key

    def to_wire(self) -> dict[str, Any]:
        """The HostResult JSON object of PROTOCOL.md."""
        return {
            "host_key": self.host_key,
            "target": self.target.to_wire(),
            "status": self.status,
            "reason": self.reason,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "ports": [asdict(p) for p in self.ports],
            "os": asdict(self.os) if self.os else None,
            "auth": [asdict(a) for a in self.auth],
            "packages": self.packages.to_wire() if self.packages else None,
            "findings": [_finding_wire(f) for f in self.findings],
            "instance_metadata": self.instance_metadata,
            "errors": list(self.errors),
        }


def _finding_wire(finding: Finding) -> dict[str, Any]:
    wire = asdict(finding)
    if wire["evidence"] is None:
        del wire["evidence"]  # only network findings carry evidence
    return wire
