"""Linux inventory: the commands run on a target, and pure parsers of their output.

Collectors are shell text sent over SSH (:mod:`appliance.scan.ssh` runs them);
everything else here is pure: text in, typed values out, no I/O. A target is
not trusted: it may print anything, so every parser bounds what it reads and
either returns a value or raises :class:`InventoryParseError` (never anything
else; property tests check it).

One collector script gathers everything in a single SSH channel (fewer round
trips and fewer session processes on the target than one channel per command,
which matters at fleet scale), but each part keeps its own exit status: the
script prints a begin/end marker around every section, carrying a per-run
nonce, and :func:`split_sections` turns the output back into one
:class:`CommandResult` per command, as vuls does with one command per call.

Formats (the exact commands are the constants below):
  os-release (freedesktop os-release(5)), ``uname -r`` / ``uname -m``;
  dpkg: ``dpkg-query -W -f`` with ``${source:Package}``/``${source:Version}``;
  rpm: ``rpm -qa --qf`` with ``%{SOURCERPM}``, source name and version taken
  from the source RPM file name, epoch carried over as trivy does;
  apk: the installed database ``/lib/apk/db/installed`` (``P:`` name, ``V:``
  version, ``A:`` arch, ``o:`` origin = the source package);
  listening sockets: ``ss -Hltnu``, else ``/proc/net/{tcp,tcp6,udp,udp6}``;
  EC2 instance metadata (IMDSv2, then v1) through whatever HTTP client the
  target has (curl, wget, python3).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from appliance.errors import VsaError
from appliance.results import OsInfo, Package, Packages

# ---- bounds ---------------------------------------------------------------------------
MAX_SECTION_BYTES = 16 * 1024 * 1024  # one command's output (a big rpm list is ~1 MB)
MAX_OS_RELEASE_BYTES = 64 * 1024
MAX_OS_RELEASE_LINES = 200
MAX_PACKAGES = 100_000
MAX_FIELD_CHARS = 512  # a package name, version, arch or origin
MAX_SOCKETS = 65_536
MAX_SECTIONS = 64
MAX_IMDS_VALUE_CHARS = 8192
MAX_IDENTITY_DOC_CHARS = 16 * 1024

SECTION_PREFIX = "@@vsa-"


class InventoryParseError(VsaError):
    """A target's command output cannot be understood (the message says which and why)."""


# ---- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    """One command run on a target: what it printed and how it ended (vuls style).

    ``exit_status`` is None when the command did not finish (``error`` says why).
    """

    name: str
    stdout: str = ""
    stderr: str = ""
    exit_status: int | None = None
    error: str | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """Whether the command ran to the end with status 0."""
        return self.error is None and self.exit_status == 0 and not self.truncated


@dataclass(frozen=True)
class UnameInfo:
    """Kernel release and machine architecture, from ``uname -r`` and ``uname -m``."""

    kernel: str | None
    arch: str | None


@dataclass(frozen=True)
class ListeningSocket:
    """A socket listening for TCP connections or bound for UDP datagrams."""

    proto: Literal["tcp", "udp"]
    address: str
    port: int
    process: str | None = None


# ---- the collector script -------------------------------------------------------------

# dpkg-query: ${Status} works on every dpkg; ${source:Package} and ${source:Version}
# (dpkg >= 1.16.2) give the source package even for binNMUs; ${Source} is the
# raw field, a fallback for older dpkg.
DPKG_QUERY_FORMAT = (
    "${Status}\\t${Package}\\t${Version}\\t${Architecture}\\t"
    "${source:Package}\\t${source:Version}\\t${Source}\\n"
)
DPKG_COMMAND = f"dpkg-query -W -f='{DPKG_QUERY_FORMAT}'"
RPM_QUERY_FORMAT = "%{NAME}\\t%{EPOCH}\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}\\t%{SOURCERPM}\\n"
RPM_COMMAND = f"rpm -qa --qf '{RPM_QUERY_FORMAT}'"
APK_DB = "/lib/apk/db/installed"
# Only the fields we read (and the blank lines between packages): the file lists
# make the full database ten times larger.
APK_COMMAND = f"grep -E '^([PVAo]:|$)' {APK_DB}"
SS_COMMAND = "ss -Hltnu"

_NONCE_RE = re.compile(r"^[0-9a-f]{8,64}$")


def collector_script(nonce: str) -> str:
    """The POSIX shell script that gathers a host's inventory in one channel.

    Each section is wrapped in markers carrying ``nonce``; the script reads
    nothing from standard input (so a password meant for sudo can never reach a
    command) and discards the commands' standard error.
    """
    if not _NONCE_RE.match(nonce):
        raise ValueError("the nonce must be 8 to 64 lowercase hex digits")
    # Why each step: `exec </dev/null` so nothing can consume stdin; the package
    # manager is chosen by its database, so a Debian host with rpm installed is
    # still a dpkg host; ss first, /proc/net when iproute2 is absent.
    return f"""exec </dev/null 2>/dev/null
N={nonce}
s() {{ printf '\\n{SECTION_PREFIX}%s begin %s\\n' "$N" "$1"; }}
e() {{ printf '\\n{SECTION_PREFIX}%s end %s %s\\n' "$N" "$1" "$2"; }}
s id; id -u; e id $?
s os-release; if [ -r /etc/os-release ]; then cat /etc/os-release; else cat /usr/lib/os-release; fi; e os-release $?
s uname; uname -r && uname -m; e uname $?
if [ -s /var/lib/dpkg/status ] && command -v dpkg-query >/dev/null; then
 s dpkg; {DPKG_COMMAND}; e dpkg $?
elif [ -r {APK_DB} ]; then
 s apk; {APK_COMMAND}; e apk $?
elif command -v rpm >/dev/null; then
 s rpm; {RPM_COMMAND}; e rpm $?
fi
if command -v ss >/dev/null; then
 s ss; {SS_COMMAND} || ss -ltnu; e ss $?
else
 for f in tcp tcp6 udp udp6; do s proc-net-$f; cat /proc/net/$f; e proc-net-$f $?; done
fi
"""


IMDS_PATHS = (
    "meta-data/ami-id",
    "meta-data/instance-id",
    "meta-data/instance-type",
    "meta-data/local-ipv4",
    "meta-data/local-hostname",
    "meta-data/mac",
    "meta-data/public-ipv4",
    "meta-data/public-hostname",
    "meta-data/security-groups",
    "meta-data/placement/availability-zone",
    "dynamic/instance-identity/document",
)
IMDS_REQUEST_TIMEOUT_S = 2
IMDS_TOKEN_TTL_S = 60


def imds_script(nonce: str, base: str = "http://169.254.169.254") -> str:
    """The shell script that reads the target's own instance metadata (IMDSv2, then v1).

    It uses curl, else wget, else python3, whichever the target has; each
    request has a short timeout, and the token is asked for once. The first
    section says which client and IMDS version answered. Never reads IAM
    credentials (``meta-data/iam/security-credentials`` is not in the list).
    """
    if not _NONCE_RE.match(nonce):
        raise ValueError("the nonce must be 8 to 64 lowercase hex digits")
    if not re.match(r"^http://[0-9a-zA-Z.:\[\]-]+$", base):
        raise ValueError("the IMDS base must be a plain http:// address")
    t = IMDS_REQUEST_TIMEOUT_S
    paths = " ".join(shlex.quote(p) for p in IMDS_PATHS)
    # g METHOD PATH [TOKEN]: one request with whichever client exists; the body on stdout.
    py_get = (
        "import sys,urllib.request as u\n"
        "m,url,tok=sys.argv[1],sys.argv[2],sys.argv[3]\n"
        f"h={{'X-aws-ec2-metadata-token-ttl-seconds':'{IMDS_TOKEN_TTL_S}'}} if m=='PUT' "
        "else ({'X-aws-ec2-metadata-token':tok} if tok else {})\n"
        f"r=u.urlopen(u.Request(url,method=m,headers=h),timeout={t})\n"
        "sys.stdout.write(r.read(65536).decode('utf-8','replace'))\n"
    )
    return f"""exec </dev/null 2>/dev/null
N={nonce}; B={base}
s() {{ printf '\\n{SECTION_PREFIX}%s begin %s\\n' "$N" "$1"; }}
e() {{ printf '\\n{SECTION_PREFIX}%s end %s %s\\n' "$N" "$1" "$2"; }}
if command -v curl >/dev/null; then C=curl; elif command -v wget >/dev/null; then C=wget; elif command -v python3 >/dev/null; then C=python3; else C=none; fi
g() {{
 case $C in
 curl) if [ "$1" = PUT ]; then curl -sf -m {t} -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: {IMDS_TOKEN_TTL_S}' "$B/$2";
       elif [ -n "$3" ]; then curl -sf -m {t} -H "X-aws-ec2-metadata-token: $3" "$B/$2"; else curl -sf -m {t} "$B/$2"; fi ;;
 wget) if [ "$1" = PUT ]; then wget -q -O - -T {t} --method=PUT --header='X-aws-ec2-metadata-token-ttl-seconds: {IMDS_TOKEN_TTL_S}' "$B/$2";
       elif [ -n "$3" ]; then wget -q -O - -T {t} --header="X-aws-ec2-metadata-token: $3" "$B/$2"; else wget -q -O - -T {t} "$B/$2"; fi ;;
 python3) python3 -c {shlex.quote(py_get)} "$1" "$B/$2" "$3" ;;
 *) return 127 ;;
 esac
}}
T=$(g PUT latest/api/token)
if [ -n "$T" ]; then V=v2; else V=v1; T=; fi
s client; echo "$C $V"; e client 0
for p in {paths}; do s "imds:$p"; g GET "latest/$p" "$T"; r=$?; e "imds:$p" $r
 if [ "$p" = meta-data/ami-id ] && [ $r -ne 0 ]; then break; fi; done
"""


# ---- splitting the script's output ------------------------------------------------------


def split_sections(text: str, nonce: str) -> dict[str, CommandResult]:
    """Cut a collector script's output into one :class:`CommandResult` per section.

    Lines that are not markers of this ``nonce`` are content. A section with a
    begin but no end (the script was cut short) gets ``exit_status`` None and an
    error. Raises :class:`InventoryParseError` only for absurd outputs.
    """
    if len(text) > MAX_SECTION_BYTES * 4:
        raise InventoryParseError("the collector printed more than the appliance reads")
    begin = f"{SECTION_PREFIX}{nonce} begin "
    end = f"{SECTION_PREFIX}{nonce} end "
    results: dict[str, CommandResult] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]  # a pseudo-terminal turns \n into \r\n
        if line.startswith(begin):
            if current is not None:
                results[current] = _section(current, lines, None, "the section did not end")
            current = line[len(begin):].strip()[:128]
            lines = []
            if len(results) >= MAX_SECTIONS:
                raise InventoryParseError("the collector printed too many sections")
            continue
        if line.startswith(end) and current is not None:
            rest = line[len(end):].rsplit(" ", 1)
            status: int | None = None
            if len(rest) == 2 and rest[0].strip() == current and rest[1].strip().isdigit():
                status = int(rest[1].strip()[:6])
            results[current] = _section(current, lines, status, None if status is not None else "bad end marker")
            current = None
            lines = []
            continue
        if current is not None:
            lines.append(line)
    if current is not None:
        results[current] = _section(current, lines, None, "the output ended inside this section")
    return results


def _section(name: str, lines: list[str], status: int | None, error: str | None) -> CommandResult:
    # The end marker starts with a newline of its own: drop the empty line it adds.
    if lines and lines[-1] == "":
        lines = lines[:-1]
    body = "\n".join(lines)
    truncated = len(body) > MAX_SECTION_BYTES
    return CommandResult(name=name, stdout=body[:MAX_SECTION_BYTES], exit_status=status,
                         error=error, truncated=truncated)


# ---- os-release and uname ----------------------------------------------------------------

_OS_RELEASE_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_UNQUOTE_ESCAPES = re.compile(r"\\([\\$\"`])")


def parse_os_release(text: str) -> dict[str, str]:
    """Parse os-release(5) text into a dict (keys upper case, values unquoted).

    Invalid lines are skipped, as systemd does; sizes are bounded.
    """
    if len(text) > MAX_OS_RELEASE_BYTES:
        raise InventoryParseError("os-release is larger than any real one")
    fields: dict[str, str] = {}
    for count, raw in enumerate(text.splitlines()):
        if count >= MAX_OS_RELEASE_LINES:
            break
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if not _OS_RELEASE_KEY.match(key):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote = value[0]
            value = value[1:-1]
            if quote == '"':
                value = _UNQUOTE_ESCAPES.sub(r"\1", value)
        fields[key] = _clean(value, MAX_FIELD_CHARS)
    return fields


def parse_uname(text: str) -> UnameInfo:
    """Parse the two lines of ``uname -r && uname -m``."""
    lines = [ln.strip() for ln in text[:4096].splitlines() if ln.strip()]
    kernel = lines[0] if lines else None
    arch = lines[1] if len(lines) > 1 else None
    ok = re.compile(r"^[A-Za-z0-9._+~:-]{1,128}$")
    return UnameInfo(kernel=kernel if kernel and ok.match(kernel) else None,
                     arch=arch if arch and ok.match(arch) else None)


def os_info(os_release: Mapping[str, str], uname: UnameInfo | None = None) -> OsInfo:
    """The host's :class:`OsInfo` (family linux, source ssh) from os-release and uname."""
    name = os_release.get("NAME") or os_release.get("ID") or None
    version = os_release.get("VERSION_ID") or None
    return OsInfo(family="linux", name=name, version=version,
                  kernel=uname.kernel if uname else None, arch=uname.arch if uname else None,
                  source="ssh")


def _major(version: str) -> str | None:
    m = re.match(r"^(\d+)", version)
    return m.group(1) if m else None


def osv_ecosystem(os_release: Mapping[str, str]) -> str:
    """The OSV ecosystem name of a host's packages, from its os-release.

    Exact OSV strings (ossf/osv-schema ecosystems.json): ``Debian:12``,
    ``Ubuntu:22.04:LTS`` (``:LTS`` for LTS releases), ``Alpine:v3.20``,
    ``AlmaLinux:9``, ``Rocky Linux:9``, ``Red Hat:9`` (Red Hat records carry a
    CPE stream suffix such as ``Red Hat:enterprise_linux:9::baseos``; the
    knowledge base, appliance/kb/match.py, applies those of major release 9 to a
    host ``Red Hat:9``), ``openSUSE:Leap 15.5`` and ``SUSE:...``
    (the PRETTY_NAME), ``Mageia:9``. Distributions OSV has no data source for
    get a descriptive name in the same shape (``Amazon Linux:2023``,
    ``CentOS:7``, ``Oracle Linux:8``, ``Fedora:40``), which matches no record.
    """
    dist = (os_release.get("ID") or "").lower()
    version = os_release.get("VERSION_ID") or ""
    major = _major(version)
    if dist == "debian":
        return f"Debian:{major}" if major else "Debian"
    if dist == "ubuntu":
        if not re.match(r"^\d{2}\.\d{2}$", version):
            return "Ubuntu"
        lts = "LTS" in (os_release.get("VERSION") or "") or (
            int(version[:2]) % 2 == 0 and version.endswith(".04"))
        return f"Ubuntu:{version}:LTS" if lts else f"Ubuntu:{version}"
    if dist == "alpine":
        m = re.match(r"^(\d+)\.(\d+)", version)
        return f"Alpine:v{m.group(1)}.{m.group(2)}" if m else "Alpine"
    if dist == "rhel":
        # The knowledge base applies Red Hat's stream ecosystems
        # (Red Hat:enterprise_linux:9::appstream, ...) to a host "Red Hat:9".
        return f"Red Hat:{major}" if major else "Red Hat"
    named = {"almalinux": "AlmaLinux", "rocky": "Rocky Linux", "amzn": "Amazon Linux",
             "centos": "CentOS", "ol": "Oracle Linux", "fedora": "Fedora", "mageia": "Mageia"}
    if dist in named:
        if dist == "amzn":
            # Amazon Linux versions are "2", "2023" or "2018.03": keep them whole.
            return f"Amazon Linux:{version}" if version else "Amazon Linux"
        return f"{named[dist]}:{major}" if major else named[dist]
    if dist.startswith("opensuse"):
        pretty = os_release.get("PRETTY_NAME") or os_release.get("NAME") or "openSUSE"
        rest = re.sub(r"^openSUSE\s*", "", pretty)
        return f"openSUSE:{rest}" if rest else "openSUSE"
    if dist in ("sles", "sles_sap", "sled", "sle-micro"):
        pretty = os_release.get("PRETTY_NAME") or "SUSE"
        rest = re.sub(r"^SUSE\s*", "", pretty)
        return f"SUSE:{rest}" if rest else "SUSE"
    if dist == "wolfi":
        return "Wolfi"
    if dist == "chainguard":
        return "Chainguard"
    name = os_release.get("NAME") or dist or "Linux"
    return f"{name}:{version}" if version else name


# ---- packages --------------------------------------------------------------------------


def _clean(value: str, limit: int) -> str:
    """Drop control characters and bound the length of a field from a target."""
    value = "".join(ch for ch in value if ch >= " " and ch != "\x7f")
    return value[:limit]


def _field_ok(value: str) -> bool:
    return 0 < len(value) <= MAX_FIELD_CHARS and not any(ch in value for ch in "\t\n\r\x00")


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_SECTION_BYTES:
        raise InventoryParseError(f"the {what} list is larger than the appliance reads")


_DPKG_SOURCE_FIELD = re.compile(r"^(\S+)(?:\s+\((\S+)\))?$")


def parse_dpkg(text: str) -> tuple[Package, ...]:
    """Parse :data:`DPKG_COMMAND` output: installed packages with their source packages.

    Only packages whose status is ``installed`` are kept (removed packages with
    configuration files left, ``deinstall ok config-files``, are not installed).
    """
    _check_size(text, "dpkg")
    items: list[Package] = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        status, name, version, arch = parts[0], parts[1], parts[2], parts[3]
        if status.split()[-1:] != ["installed"]:
            continue
        if not (_field_ok(name) and _field_ok(version)):
            continue
        src_name = parts[4] if len(parts) > 4 else ""
        src_version = parts[5] if len(parts) > 5 else ""
        if not src_name and len(parts) > 6 and parts[6]:
            # Old dpkg: the raw Source field, "name" or "name (version)".
            m = _DPKG_SOURCE_FIELD.match(parts[6].strip())
            if m:
                src_name, src_version = m.group(1), m.group(2) or ""
        items.append(Package(
            name=name, version=version, arch=arch if _field_ok(arch) else None,
            source_name=src_name if _field_ok(src_name) else name,
            source_version=src_version if _field_ok(src_version) else version,
        ))
        if len(items) > MAX_PACKAGES:
            raise InventoryParseError("the dpkg list has more packages than any real host")
    return tuple(items)


_SRPM = re.compile(r"^(?P<name>.+)-(?P<version>[^-]+)-(?P<release>[^-]+)\.(?:no)?src\.rpm$")


def split_source_rpm(filename: str) -> tuple[str, str] | None:
    """``openssl-3.0.7-27.el9.src.rpm`` → ``("openssl", "3.0.7-27.el9")``; None if not one."""
    m = _SRPM.match(filename)
    if not m:
        return None
    return m.group("name"), f"{m.group('version')}-{m.group('release')}"


def parse_rpm(text: str) -> tuple[Package, ...]:
    """Parse :data:`RPM_COMMAND` output into packages.

    Versions are ``[epoch:]version-release`` (the epoch only when set and not 0,
    which RPM comparison treats alike). The source package's name and version
    come from ``SOURCERPM``; the source version takes the binary's epoch, since
    the file name does not carry one. ``gpg-pubkey`` pseudo-packages are skipped.
    """
    _check_size(text, "rpm")
    items: list[Package] = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 6:
            continue
        name, epoch, version, release, arch, srpm = (p.strip() for p in parts[:6])
        if name == "gpg-pubkey" or not (_field_ok(name) and _field_ok(version) and _field_ok(release)):
            continue
        prefix = f"{epoch}:" if epoch.isdigit() and int(epoch[:9]) != 0 else ""
        source = split_source_rpm(srpm) if srpm and srpm != "(none)" else None
        items.append(Package(
            name=name, version=f"{prefix}{version}-{release}",
            arch=arch if _field_ok(arch) and arch != "(none)" else None,
            source_name=source[0] if source else None,
            source_version=f"{prefix}{source[1]}" if source else None,
        ))
        if len(items) > MAX_PACKAGES:
            raise InventoryParseError("the rpm list has more packages than any real host")
    return tuple(items)


def parse_apk_installed(text: str) -> tuple[Package, ...]:
    """Parse Alpine's installed database (whole, or only its P/V/A/o lines).

    Each package is a stanza of ``X:value`` lines separated by a blank line;
    ``o:`` is the origin, i.e. the source package (aports), whose version is the
    same as the subpackage's.
    """
    _check_size(text, "apk")
    items: list[Package] = []
    current: dict[str, str] = {}

    def flush() -> None:
        name, version = current.get("P", ""), current.get("V", "")
        if _field_ok(name) and _field_ok(version):
            origin = current.get("o", "")
            arch = current.get("A", "")
            items.append(Package(name=name, version=version, arch=arch if _field_ok(arch) else None,
                                 source_name=origin if _field_ok(origin) else name,
                                 source_version=version))
            if len(items) > MAX_PACKAGES:
                raise InventoryParseError("the apk database has more packages than any real host")
        current.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            continue
        if len(line) >= 2 and line[1] == ":" and line[0] in "PVAo":
            if line[0] == "P" and "P" in current:
                flush()  # a stanza without its blank line: start anew
            current[line[0]] = line[2:].strip()
    flush()
    return tuple(items)


def packages_from(manager: str, text: str, os_release: Mapping[str, str]) -> Packages:
    """Parse one package manager's output into :class:`Packages` with its OSV ecosystem."""
    parser = {"dpkg": parse_dpkg, "rpm": parse_rpm, "apk": parse_apk_installed}.get(manager)
    if parser is None:
        raise InventoryParseError(f"unknown package manager {manager[:32]!r}")
    return Packages(manager=manager, ecosystem=osv_ecosystem(os_release), items=parser(text))


# ---- listening sockets -----------------------------------------------------------------


def _split_host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5:
        return None
    value = int(port)
    if not 0 < value <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.split("%", 1)[0]  # 127.0.0.53%lo: drop the interface
    if host == "*":
        host = "0.0.0.0"
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    return address, value


def parse_ss(text: str) -> tuple[ListeningSocket, ...]:
    """Parse ``ss -ltnu`` output (with or without its header line)."""
    if len(text) > MAX_SECTION_BYTES:
        raise InventoryParseError("the socket list is larger than the appliance reads")
    found: dict[tuple[str, str, int], ListeningSocket] = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 5 or cols[0] not in ("tcp", "udp"):
            continue
        state = cols[1]
        if cols[0] == "tcp" and state != "LISTEN":
            continue
        if cols[0] == "udp" and state not in ("UNCONN", "LISTEN"):
            continue
        hp = _split_host_port(cols[4])
        if hp is None:
            continue
        proto: Literal["tcp", "udp"] = "tcp" if cols[0] == "tcp" else "udp"
        found.setdefault((proto, hp[0], hp[1]), ListeningSocket(proto, hp[0], hp[1]))
        if len(found) > MAX_SOCKETS:
            raise InventoryParseError("more listening sockets than ports exist")
    return tuple(sorted(found.values(), key=lambda s: (s.proto, s.port, s.address)))


def _proc_address(hex_addr: str) -> str | None:
    try:
        raw = bytes.fromhex(hex_addr)
    except ValueError:
        return None
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    if len(raw) == 16:
        # Four 32-bit words, each in host (little-endian) byte order.
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return str(ipaddress.IPv6Address(words))
    return None


def parse_proc_net(text: str, proto: Literal["tcp", "udp"]) -> tuple[ListeningSocket, ...]:
    """Parse ``/proc/net/tcp[6]`` (state 0A, LISTEN) or ``/proc/net/udp[6]`` (state 07)."""
    if len(text) > MAX_SECTION_BYTES:
        raise InventoryParseError("the /proc/net table is larger than the appliance reads")
    wanted = "0A" if proto == "tcp" else "07"
    found: dict[tuple[str, int], ListeningSocket] = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 4 or cols[3].upper() != wanted:
            continue
        local, _, port_hex = cols[1].partition(":")
        try:
            port = int(port_hex, 16) if len(port_hex) <= 4 else 0
        except ValueError:
            continue
        if not 0 < port <= 65535:
            continue
        address = _proc_address(local)
        if address is None:
            continue
        found.setdefault((address, port), ListeningSocket(proto, address, port))
        if len(found) > MAX_SOCKETS:
            raise InventoryParseError("more listening sockets than ports exist")
    return tuple(sorted(found.values(), key=lambda s: (s.port, s.address)))


def listening_from(sections: Mapping[str, CommandResult]) -> tuple[ListeningSocket, ...]:
    """Listening sockets from the collector's ``ss`` or ``proc-net-*`` sections."""
    ss = sections.get("ss")
    if ss is not None and ss.stdout.strip():
        return parse_ss(ss.stdout)
    found: list[ListeningSocket] = []
    for name, proto in (("proc-net-tcp", "tcp"), ("proc-net-tcp6", "tcp"),
                        ("proc-net-udp", "udp"), ("proc-net-udp6", "udp")):
        section = sections.get(name)
        if section is not None:
            found.extend(parse_proc_net(section.stdout, proto))  # type: ignore[arg-type]
    return tuple(sorted(set(found), key=lambda s: (s.proto, s.port, s.address)))


# ---- instance metadata -------------------------------------------------------------------

_IMDS_SIMPLE = re.compile(r"^[\x20-\x7e]*$")


def parse_imds(sections: Mapping[str, CommandResult]) -> dict[str, Any] | None:
    """The target's instance metadata from :func:`imds_script` sections, or None.

    Keys are the IMDS path names (``ami-id``, ``instance-id``, ``instance-type``,
    ``local-ipv4``, ``mac``, ``public-ipv4``, ``security-groups`` as a list,
    ``availability-zone``, ``identity-document`` as an object) plus
    ``imds_version`` (``v2`` or ``v1``) and ``client`` (curl, wget, python3).
    None when no instance ID came back (not EC2, IMDS off, no HTTP client).
    """
    out: dict[str, Any] = {}
    client = sections.get("client")
    if client is not None:
        words = client.stdout.split()
        if len(words) == 2 and words[0] in ("curl", "wget", "python3") and words[1] in ("v1", "v2"):
            out["client"], out["imds_version"] = words[0], words[1]
    for path in IMDS_PATHS:
        section = sections.get(f"imds:{path}")
        if section is None or not section.ok:
            continue
        value = section.stdout.strip()
        if not value or len(value) > (MAX_IDENTITY_DOC_CHARS if path.endswith("document") else MAX_IMDS_VALUE_CHARS):
            continue
        key = path.rsplit("/", 1)[-1]
        if path.endswith("instance-identity/document"):
            doc = _identity_document(value)
            if doc is not None:
                out["identity-document"] = doc
            continue
        if key == "security-groups":
            groups = [g.strip() for g in value.splitlines() if g.strip() and _IMDS_SIMPLE.match(g)]
            out[key] = groups[:256]
            continue
        if "\n" in value or not _IMDS_SIMPLE.match(value):
            continue
        out[key] = value
    if not isinstance(out.get("instance-id"), str) or not re.match(r"^i-[0-9a-f]{8,32}$", out["instance-id"]):
        return None
    return out


def _identity_document(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    doc: dict[str, Any] = {}
    for key, value in list(obj.items())[:64]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        if value is None or isinstance(value, bool | int | float):
            doc[key] = value
        elif isinstance(value, str) and len(value) <= 1024:
            doc[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) and len(v) <= 256 for v in value[:64]):
            doc[key] = list(value[:64])
    return doc


# ---- putting it together -----------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    """Everything the collector script taught us of one host."""

    uid: int | None
    os: OsInfo | None
    os_release: Mapping[str, str]
    packages: Packages | None
    listening: tuple[ListeningSocket, ...]
    errors: tuple[str, ...]


def inventory_from(sections: Mapping[str, CommandResult]) -> Inventory:
    """Build an :class:`Inventory` from the sections of :func:`collector_script`.

    Never raises: a section that cannot be parsed becomes an error in words,
    and the rest of the inventory is kept.
    """
    errors: list[str] = []
    uid: int | None = None
    id_section = sections.get("id")
    if id_section is not None and id_section.ok and id_section.stdout.strip().isdigit():
        uid = int(id_section.stdout.strip()[:10])

    os_release: dict[str, str] = {}
    section = sections.get("os-release")
    if section is None or not section.ok:
        errors.append("os-release: " + _why(section))
    else:
        try:
            os_release = parse_os_release(section.stdout)
        except InventoryParseError as exc:
            errors.append(f"os-release: {exc}")
    uname = None
    section = sections.get("uname")
    if section is not None and section.ok:
        uname = parse_uname(section.stdout)
    else:
        errors.append("uname: " + _why(section))
    info = os_info(os_release, uname) if (os_release or uname) else None

    packages = None
    managers = [m for m in ("dpkg", "apk", "rpm") if m in sections]
    if not managers:
        errors.append("packages: no package manager found (dpkg, apk or rpm)")
    for manager in managers[:1]:
        section = sections[manager]
        if not section.ok:
            errors.append(f"packages: {manager}: " + _why(section))
            continue
        try:
            packages = packages_from(manager, section.stdout, os_release)
        except InventoryParseError as exc:
            errors.append(f"packages: {exc}")

    listening: tuple[ListeningSocket, ...] = ()
    try:
        listening = listening_from(sections)
    except InventoryParseError as exc:
        errors.append(f"listening sockets: {exc}")
    return Inventory(uid=uid, os=info, os_release=os_release, packages=packages,
                     listening=listening, errors=tuple(errors))


def _why(section: CommandResult | None) -> str:
    if section is None:
        return "not collected"
    if section.error:
        return section.error
    if section.truncated:
        return "output too large, cut short"
    return f"exited with status {section.exit_status}"
