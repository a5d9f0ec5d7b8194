"""Port lists: named sets ranked by how often ports are found open, and explicit lists.

``options.tcp_ports`` (PROTOCOL.md): ``light`` (the 100 most frequently open
TCP ports), ``standard`` (the 1,000 most frequently open), ``full``
(1-65535), or an explicit list such as ``"22,80,443,8000-8100"``.
``options.udp_ports``: ``none``, ``light`` (the 20 most frequently open UDP
ports) or an explicit list.

The rankings come from nmap's published open-frequency data (the
``nmap-services`` file); they ship as data files under ``data/`` whose headers
say where they come from and how they were derived. ``python -m
appliance.scan.portlists /usr/share/nmap/nmap-services`` regenerates them.
Everything but the data loading is pure.
"""

from __future__ import annotations

import datetime as _dt
import re
import sys
from functools import cache
from pathlib import Path

from appliance.errors import VsaError

DATA_DIR = Path(__file__).with_name("data")
TCP_RANKING_FILE = DATA_DIR / "tcp-top1000.txt"
UDP_RANKING_FILE = DATA_DIR / "udp-top100.txt"
TCP_LIGHT_COUNT = 100
TCP_STANDARD_COUNT = 1000
UDP_LIGHT_COUNT = 20
UDP_RANKED_COUNT = 100
MIN_PORT = 1
MAX_PORT = 65535
# An explicit list is text from a job or a command line: bound its length.
MAX_SPEC_CHARS = 65536

_TOKEN = re.compile(r"^(\d+)(?:-(\d+))?$")


class PortSpecError(VsaError):
    """A port specification is malformed; the message names the field and the bad part."""

    def __init__(self, spec: str, problem: str, *, field: str = "tcp_ports") -> None:
        self.spec = spec
        self.field = field
        self.problem = problem
        shown = spec if len(spec) <= 80 else spec[:77] + "..."
        super().__init__(f"{field}: {shown!r} {problem}")


def parse_port_list(spec: str, *, field: str = "tcp_ports") -> tuple[int, ...]:
    """Parse ``"22,80,443,8000-8100"`` into sorted distinct ports.

    Raises :class:`PortSpecError` naming the offending item.
    """
    if len(spec) > MAX_SPEC_CHARS:
        raise PortSpecError(spec, f"is longer than {MAX_SPEC_CHARS} characters", field=field)
    ports: set[int] = set()
    items = spec.split(",")
    for position, raw in enumerate(items, start=1):
        item = raw.strip()
        if not item:
            raise PortSpecError(spec, f"has an empty item at position {position}", field=field)
        match = _TOKEN.match(item)
        if not match:
            raise PortSpecError(
                spec, f"has {item!r}, which is neither a port nor a first-last range of ports", field=field
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        for value in (first, last):
            if not MIN_PORT <= value <= MAX_PORT:
                raise PortSpecError(spec, f"has {item!r}: port {value} is outside {MIN_PORT}-{MAX_PORT}", field=field)
        if last < first:
            raise PortSpecError(spec, f"has {item!r}, a range that ends before it starts", field=field)
        ports.update(range(first, last + 1))
    return tuple(sorted(ports))


def tcp_ports(spec: str) -> tuple[int, ...]:
    """The TCP ports of ``options.tcp_ports`` (sorted, distinct)."""
    if not isinstance(spec, str):
        raise PortSpecError(repr(spec), "must be a string", field="tcp_ports")
    name = spec.strip().lower()
    if name == "light":
        return tuple(sorted(tcp_ranking()[:TCP_LIGHT_COUNT]))
    if name == "standard":
        return tuple(sorted(tcp_ranking()[:TCP_STANDARD_COUNT]))
    if name == "full":
        return tuple(range(MIN_PORT, MAX_PORT + 1))
    if name in ("", "none"):
        raise PortSpecError(spec, "names no ports; use light, standard, full or a list", field="tcp_ports")
    return parse_port_list(name, field="tcp_ports")


def udp_ports(spec: str) -> tuple[int, ...]:
    """The UDP ports of ``options.udp_ports`` (sorted, distinct; empty for ``none``)."""
    if not isinstance(spec, str):
        raise PortSpecError(repr(spec), "must be a string", field="udp_ports")
    name = spec.strip().lower()
    if name == "none":
        return ()
    if name == "light":
        return tuple(sorted(udp_ranking()[:UDP_LIGHT_COUNT]))
    if name == "":
        raise PortSpecError(spec, "is empty; use none, light or a list", field="udp_ports")
    return parse_port_list(name, field="udp_ports")


def format_port_list(ports: tuple[int, ...] | list[int]) -> str:
    """Compress ports into ``"22,80,8000-8100"`` form (for nmap's -p and for messages)."""
    out: list[str] = []
    ordered = sorted(set(ports))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


# ---- ranked data ------------------------------------------------------------------


def parse_ranking_file(text: str) -> tuple[int, ...]:
    """Ports of a shipped ranking file, most frequently open first ('#' lines are provenance)."""
    ports: list[int] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ports.append(int(line))
    return tuple(ports)


@cache
def tcp_ranking() -> tuple[int, ...]:
    """The 1,000 most frequently open TCP ports, most frequent first."""
    return parse_ranking_file(TCP_RANKING_FILE.read_text())


@cache
def udp_ranking() -> tuple[int, ...]:
    """The 100 most frequently open UDP ports, most frequent first."""
    return parse_ranking_file(UDP_RANKING_FILE.read_text())


def derive_ranking(nmap_services: str, proto: str, count: int) -> tuple[int, ...]:
    """Rank ports of ``proto`` in an nmap-services text by open-frequency.

    Highest frequency first; ties broken by the lower port number so the
    result is deterministic. Only ports with a frequency above zero are kept.
    """
    entries: dict[int, float] = {}
    for line in nmap_services.splitlines():
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 3 or "/" not in fields[1]:
            continue
        port_text, _, line_proto = fields[1].partition("/")
        if line_proto != proto:
            continue
        try:
            port, freq = int(port_text), float(fields[2])
        except ValueError:
            continue
        if freq > 0:
            entries[port] = max(freq, entries.get(port, 0.0))
    ranked = sorted(entries, key=lambda p: (-entries[p], p))
    return tuple(ranked[:count])


def nmap_services_version(nmap_services: str) -> str:
    """The ``$Id: ...$`` revision line of an nmap-services text, or 'unknown'."""
    match = re.search(r"\$Id: (.*?) \$", nmap_services)
    return match.group(1) if match else "unknown"


def render_ranking_file(ports: tuple[int, ...], *, proto: str, source: str, revision: str, nmap_version: str) -> str:
    """The text of a shipped ranking file, provenance header first."""
    header = [
        f"# The {len(ports)} most frequently open {proto.upper()} ports, most frequent first.",
        f"# Source: {source} ($Id {revision}), shipped with nmap {nmap_version}.",
        "# Derived: the open-frequency column (third field) of every '<port>/" + proto + "' line,",
        "#   sorted by frequency descending, ties by port ascending, frequencies of zero dropped,",
        f"#   first {len(ports)} kept (appliance.scan.portlists.derive_ranking).",
        f"# Generated: {_dt.date.today().isoformat()} by `python -m appliance.scan.portlists`.",
        "# nmap-services is (C) Insecure.Com LLC under the Nmap Public Source License; only",
        "#   the resulting order of port numbers is kept here, not the file.",
    ]
    return "\n".join(header + [str(p) for p in ports]) + "\n"


def _regenerate(services_path: str, nmap_version: str) -> None:
    text = Path(services_path).read_text()
    revision = nmap_services_version(text)
    for proto, count, path in (("tcp", TCP_STANDARD_COUNT, TCP_RANKING_FILE), ("udp", UDP_RANKED_COUNT, UDP_RANKING_FILE)):
        ports = derive_ranking(text, proto, count)
        path.write_text(render_ranking_file(ports, proto=proto, source=services_path, revision=revision, nmap_version=nmap_version))


if __name__ == "__main__":
    _regenerate(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/nmap/nmap-services",
                sys.argv[2] if len(sys.argv) > 2 else "7.93")
