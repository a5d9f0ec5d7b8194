"""Service detection on open ports: the appliance's own light probes, or nmap's -sV.

``banner`` (the default): connect, read what the service says first (SSH,
FTP, SMTP, ...); on TLS ports complete a handshake (no verification: we
identify, we do not trust) and record the certificate subject; where nothing
was said, send a plain ``HEAD / HTTP/1.0`` and read the ``Server`` header. The
parsers are pure and fill ``Port.service``, ``banner``, ``product``, ``version``.

``nmap``: python-nmap runs ``nmap -n -Pn -sV`` on the open ports only, when
nmap is installed; otherwise the banner probes run and the host's errors say so.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
from collections.abc import Sequence
from dataclasses import replace

from appliance.results import Port

BANNER_TIMEOUT_S = 2.0  # for an answer to our request
FIRST_WORDS_TIMEOUT_S = 1.0  # for a service that speaks first (SSH, FTP, SMTP do at once)
CONNECT_TIMEOUT_S = 2.0
READ_LIMIT_BYTES = 4096
MAX_BANNER_CHARS = 200
PROBES_PER_HOST = 8  # concurrent probes on one host: real hosts limit simultaneous sessions
NMAP_TIMEOUT_S = 300
TLS_PORTS = frozenset({443, 465, 636, 853, 993, 995, 2376, 5986, 6443, 8443, 9443})
# Short names for the commonest ports, used when a service says nothing that identifies it.
WELL_KNOWN: dict[int, str] = {
    21: "ftp", 22: "ssh", 23: "telnet", 25: "smtp", 53: "domain", 80: "http", 110: "pop3",
    111: "rpcbind", 135: "msrpc", 139: "netbios-ssn", 143: "imap", 389: "ldap", 443: "https",
    445: "microsoft-ds", 465: "smtps", 587: "submission", 636: "ldaps", 993: "imaps", 995: "pop3s",
    1433: "ms-sql-s", 1521: "oracle", 2049: "nfs", 3306: "mysql", 3389: "ms-wbt-server",
    5432: "postgresql", 5900: "vnc", 5985: "wsman", 5986: "wsmans", 6379: "redis", 8080: "http-proxy",
    8443: "https-alt", 9200: "elasticsearch", 27017: "mongodb",
}

_SSH = re.compile(r"^SSH-(?P<proto>[\d.]+)-(?P<software>\S+)(?:\s+(?P<comment>.*))?$")
_PRODUCT_VERSION = re.compile(r"^(?P<product>[A-Za-z][\w.\-]*?)[_/ -]v?(?P<version>\d[\w.\-+~]*)")


def parse_ssh_banner(line: str) -> tuple[str | None, str | None]:
    """(product, version) from an SSH identification line.

    ``SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3`` gives ("OpenSSH", "9.2p1").
    """
    match = _SSH.match(line.strip())
    if not match:
        return None, None
    software = match.group("software")
    pv = _PRODUCT_VERSION.match(software)
    if pv:
        return pv.group("product"), pv.group("version")
    return software, None


def parse_server_header(value: str) -> tuple[str | None, str | None]:
    """(product, version) from an HTTP ``Server`` header: ``nginx/1.22.1`` gives ("nginx", "1.22.1")."""
    first = value.strip().split(" ")[0] if value.strip() else ""
    if not first:
        return None, None
    if "/" in first:
        product, _, version = first.partition("/")
        return product or None, version or None
    return first, None


def parse_http_response(data: bytes) -> tuple[str | None, str | None]:
    """(status line, Server header value) of an HTTP response head, or (None, None)."""
    text = data.decode("latin-1", "replace")
    if not text.startswith("HTTP/"):
        return None, None
    lines = text.split("\r\n\r\n", 1)[0].split("\r\n")
    server = None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "server":
            server = value.strip()
            break
    return lines[0].strip(), server


def identify(port: int, *, first_bytes: bytes = b"", http: bytes = b"", tls_subject: str | None = None) -> Port:
    """Build the Port from what was seen: the service's first words, an HTTP answer, a TLS subject."""
    service = WELL_KNOWN.get(port)
    banner: str | None = None
    product = version = None
    text = first_bytes.decode("utf-8", "replace").strip()
    first_line = text.splitlines()[0].strip() if text else ""
    if first_line.startswith("SSH-"):
        service = "ssh"
        banner = first_line
        product, version = parse_ssh_banner(first_line)
    elif first_line:
        banner = first_line
        if first_line.startswith("220") and "ftp" in first_line.lower():
            service = "ftp"
        elif first_line.startswith("220") and "smtp" in first_line.lower():
            service = "smtp"
    status, server = parse_http_response(http) if http else (None, None)
    if status is not None:
        service = "https" if tls_subject is not None else "http"
        banner = f"{status}; Server: {server}" if server else status
        if server:
            product, version = parse_server_header(server)
    if tls_subject is not None:
        if service in (None, "http"):
            service = "https" if status is not None else (service or "ssl")
        banner = f"TLS subject: {tls_subject}" + (f"; {banner}" if banner else "")
    if banner is not None and len(banner) > MAX_BANNER_CHARS:
        banner = banner[:MAX_BANNER_CHARS]
    return Port(proto="tcp", port=port, service=service, banner=banner, product=product, version=version)


def certificate_subject(der: bytes) -> str | None:
    """The RFC 4514 subject of a DER certificate, or None when it cannot be parsed."""
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return None


def _tls_context() -> ssl.SSLContext:
    """TLS for *probing scan targets* only, never for the platform (platform/http.py verifies).

    A target's certificate (self-signed or expired ones included) is read to
    name its service; nothing is sent to the target beyond the probe, so there
    is nothing to protect by verifying it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _exchange(ip: str, port: int, *, tls: bool, send: bytes | None,
                    read_timeout_s: float = BANNER_TIMEOUT_S) -> tuple[bytes, str | None]:
    """Connect (with TLS when asked), optionally send, read what comes back within the timeout."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(ip, port, ssl=_tls_context() if tls else None,
                                server_hostname="" if tls else None),
        CONNECT_TIMEOUT_S,
    )
    subject = None
    try:
        if tls:
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            subject = certificate_subject(der) if der else None
        if send:
            writer.write(send)
            await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(READ_LIMIT_BYTES), read_timeout_s)
        except TimeoutError:
            data = b""
        return data, subject
    finally:
        writer.close()


async def probe_service(ip: str, port: int) -> tuple[Port, str | None]:
    """Probe one open port; returns the Port and an error text (None when all went well)."""
    head = f"HEAD / HTTP/1.0\r\nHost: {ip}\r\nUser-Agent: vsa\r\n\r\n".encode()
    try:
        if port in TLS_PORTS:
            try:
                http, subject = await _exchange(ip, port, tls=True, send=head)
                return identify(port, http=http, tls_subject=subject or "unknown"), None
            except (ssl.SSLError, ConnectionError):
                pass  # not TLS after all: fall through to the plain probes
        first, _ = await _exchange(ip, port, tls=False, send=None, read_timeout_s=FIRST_WORDS_TIMEOUT_S)
        if first:
            return identify(port, first_bytes=first), None
        http, _ = await _exchange(ip, port, tls=False, send=head)
        if http.startswith(b"HTTP/"):
            return identify(port, http=http), None
        return identify(port, first_bytes=http), None
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        return Port(proto="tcp", port=port, service=WELL_KNOWN.get(port)), f"tcp/{port}: banner probe failed ({exc.__class__.__name__})"


async def banner_detection(ip: str, ports: Sequence[int]) -> tuple[list[Port], list[str]]:
    """Banner probes on every open port of one host, a few at a time."""
    limit = asyncio.Semaphore(PROBES_PER_HOST)

    async def one(port: int) -> tuple[Port, str | None]:
        async with limit:
            return await probe_service(ip, port)

    done = await asyncio.gather(*(one(p) for p in sorted(ports)))
    return [p for p, _ in done], [e for _, e in done if e]


def nmap_available() -> bool:
    """True when the nmap binary and python-nmap are both usable."""
    if shutil.which("nmap") is None:
        return False
    try:
        import nmap  # noqa: F401
    except ImportError:
        return False
    return True


def _nmap_blocking(ip: str, ports: Sequence[int]) -> list[Port]:
    import nmap

    from appliance.scan.portlists import format_port_list

    scanner = nmap.PortScanner()
    # -n: name lookups cost seconds (LAB-NOTES); -Pn: the host is known alive.
    scanner.scan(ip, format_port_list(list(ports)), arguments="-n -Pn -sV", timeout=NMAP_TIMEOUT_S)
    out: list[Port] = []
    host = scanner[ip] if ip in scanner.all_hosts() else None
    tcp = host.get("tcp", {}) if host is not None else {}
    for port in sorted(ports):
        info = tcp.get(port, {})
        extra = " ".join(x for x in (info.get("product"), info.get("version"), info.get("extrainfo")) if x)
        out.append(Port(proto="tcp", port=port, service=info.get("name") or WELL_KNOWN.get(port),
                        banner=extra or None, product=info.get("product") or None,
                        version=info.get("version") or None))
    return out


async def detect_services(ip: str, ports: Sequence[int], *, method: str = "banner") -> tuple[list[Port], list[str]]:
    """Fill service facts for the open TCP ``ports`` of ``ip``; returns ports and error texts.

    ``method``: ``banner``, ``nmap`` (falls back to banner when nmap is
    missing, and says so) or ``none`` (ports only).
    """
    if not ports:
        return [], []
    if method == "none":
        return [Port(proto="tcp", port=p, service=WELL_KNOWN.get(p)) for p in sorted(ports)], []
    if method == "nmap":
        if not nmap_available():
            found, errors = await banner_detection(ip, ports)
            return found, ["service_detection nmap: nmap is not installed; used the appliance's banner probes",
                           *errors]
        try:
            return await asyncio.to_thread(_nmap_blocking, ip, ports), []
        except Exception as exc:  # python-nmap raises its own and OS errors; fall back, saying why
            found, errors = await banner_detection(ip, ports)
            return found, [f"service_detection nmap failed ({exc}); used the appliance's banner probes", *errors]
    return await banner_detection(ip, ports)


def merge_port(base: Port, found: Port) -> Port:
    """Keep the state of ``base`` and the service facts of ``found``."""
    return replace(found, proto=base.proto, port=base.port, state=base.state)
