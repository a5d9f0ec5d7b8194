"""A namespace lab for port scanning: hosts with known open ports, a silent host, an empty address.

Built on :class:`appliance.lab.netns.NetnsLab` (the scanner runs in the hub
namespace at ``.1``). Layout, as issue 5 and LAB-NOTES.md describe it:

- ``answering`` hosts, each running one listener process (this module's
  ``serve`` entry point) on a known set of TCP ports: low well-known ports
  with real-looking services (SSH identification line, HTTP with a
  ``Server`` header, TLS with a known certificate subject) and high ports
  spread over the whole range, so that only a full scan finds everything;
- one host that drops every packet (an nftables ``drop`` policy on input in
  its namespace; it still answers ARP, as a firewalled host does);
- one address on the bridge with no host at all.

The ground truth (which ports are open where) is :attr:`PortLab.open_ports`;
both ``bench/portscan`` and the integration tests use it.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.lab.netns import Host, LabError, NetnsLab

SSH_BANNER = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"
HTTP_SERVER = "nginx/1.22.1"
TLS_SUBJECT_CN = "portlab.vsa.test"
LISTEN_BACKLOG = 4096
READY_TIMEOUT_S = 10.0
# Ports every answering host opens, then one per host in each of these bands,
# so a full scan is needed to find them all.
BASE_PORTS = (22, 80, 443)
EXTRA_PORT_BANDS = ((3000, 9999), (10000, 39999), (40000, 65535))
UDP_OPEN_PORTS = (53,)  # every answering host answers on these UDP ports


def host_ports(index: int, count: int) -> tuple[int, ...]:
    """The open ports of answering host number ``index`` (0-based): deterministic, ``count`` of them."""
    ports = list(BASE_PORTS[:count])
    band = 0
    while len(ports) < count:
        low, high = EXTRA_PORT_BANDS[band % len(EXTRA_PORT_BANDS)]
        # A multiplicative spread keeps ports distinct across hosts and bands.
        span = high - low + 1
        port = low + (index * 7919 + band * 104_729 + 1) % span
        if port not in ports:
            ports.append(port)
        band += 1
    return tuple(sorted(ports))


@dataclass
class PortLab:
    """The built lab: its addresses and the ground truth."""

    lab: NetnsLab
    open_ports: dict[str, tuple[int, ...]] = field(default_factory=dict)  # answering hosts (TCP)
    udp_open_ports: tuple[int, ...] = UDP_OPEN_PORTS
    dropping_ip: str | None = None
    empty_ip: str | None = None
    hosts: dict[str, Host] = field(default_factory=dict)
    tls_dir: Path | None = None

    @property
    def scanner_ip(self) -> str:
        """The scanner's address on the lab bridge (in the hub namespace)."""
        return self.lab.scanner_ip

    @property
    def answering_ips(self) -> list[str]:
        """Addresses of the hosts that answer."""
        return list(self.open_ports)

    @property
    def all_ips(self) -> list[str]:
        """Every lab address: answering hosts, the dropping host, the empty address."""
        extra = [ip for ip in (self.dropping_ip, self.empty_ip) if ip]
        return self.answering_ips + extra


def _tls_material(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate with a known subject, generated at set-up (never committed)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SUBJECT_CN),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "VSA lab")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def build_port_lab(
    lab: NetnsLab,
    *,
    answering: int = 7,
    ports_per_host: int = 6,
    dropping: bool = True,
    empty: bool = True,
    services: bool = True,
) -> PortLab:
    """Populate ``lab`` with answering hosts, a dropping host and an empty address; wait until ready."""
    if ports_per_host < 1:
        raise LabError("each answering host needs at least one port")
    portlab = PortLab(lab=lab)
    if services:
        portlab.tls_dir = Path(tempfile.mkdtemp(prefix="vsa-portlab-"))
        cert, key = _tls_material(portlab.tls_dir)
    for index in range(answering):
        host = lab.add_host(f"p{index + 1}")
        ports = host_ports(index, ports_per_host)
        portlab.hosts[host.ip] = host
        portlab.open_ports[host.ip] = ports
        argv = [sys.executable, "-m", "appliance.lab.portlab", "serve", "--ports", ",".join(map(str, ports)),
                "--udp-ports", ",".join(map(str, UDP_OPEN_PORTS))]
        if services:
            argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        lab.popen(host.netns, argv, stdout=subprocess.DEVNULL)
    if dropping:
        host = lab.add_host("drop")
        portlab.hosts[host.ip] = host
        portlab.dropping_ip = host.ip
        # A listener too: if the drop rule failed, the tests would see its ports.
        lab.popen(host.netns, [sys.executable, "-m", "appliance.lab.portlab", "serve", "--ports", "22,80,443"],
                  stdout=subprocess.DEVNULL)
        lab.host_run(host, "nft", "add table inet vsadrop")
        lab.host_run(host, "nft", "add chain inet vsadrop input { type filter hook input priority 0 ; policy drop ; }")
    if empty:
        last = max(int(ipaddress.ip_address(h.ip)) for h in lab.hosts.values()) if lab.hosts else 0
        portlab.empty_ip = str(ipaddress.ip_address(last + 50))
    for ip, ports in portlab.open_ports.items():
        _wait_listening(lab, portlab.hosts[ip], ports)
    return portlab


def _wait_listening(lab: NetnsLab, host: Host, ports: tuple[int, ...]) -> None:
    """Wait until every port of ``host`` listens (read from its namespace, nothing sent)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    wanted = set(ports)
    while time.monotonic() < deadline:
        out = lab.host_run(host, "ss", "-Htln", check=False).stdout
        listening = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.split()}
        if wanted <= listening:
            return
        time.sleep(0.05)
    raise LabError(f"listeners on {host.ip} did not come up: wanted {sorted(wanted)}")


# ---- the listener process ------------------------------------------------------------


def _http_response() -> bytes:
    body = b"<html><body>portlab</body></html>"
    return (b"HTTP/1.1 200 OK\r\nServer: " + HTTP_SERVER.encode() + b"\r\nContent-Type: text/html\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


async def _serve(ports: list[int], cert: str | None, key: str | None, udp_ports: list[int]) -> None:
    import ssl

    tls = None
    if cert and key:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)

    def handler(port: int):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if port == 22:
                    writer.write((SSH_BANNER + "\r\n").encode())
                    await writer.drain()
                    await asyncio.wait_for(reader.read(256), 2.0)
                elif port in (80, 443):
                    request = await asyncio.wait_for(reader.read(4096), 2.0)
                    if request:
                        writer.write(_http_response())
                        await writer.drain()
                else:
                    await asyncio.wait_for(reader.read(64), 0.5)
            except (TimeoutError, OSError, ConnectionError):
                pass  # scanners hang up early; nothing to report in a lab listener
            finally:
                writer.close()

        return handle

    loop = asyncio.get_running_loop()
    for port in udp_ports:
        # A UDP service that answers anything with what it got (enough to be "open"); bound
        # before the TCP listeners, whose readiness the lab waits for.
        await loop.create_datagram_endpoint(_UdpEcho, local_addr=("0.0.0.0", port))
    servers = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(LISTEN_BACKLOG)
        servers.append(await asyncio.start_server(handler(port), sock=sock, ssl=tls if port == 443 else None,
                                                  backlog=LISTEN_BACKLOG))
    await asyncio.gather(*(s.serve_forever() for s in servers))


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.transport.sendto(data or b"\x00", addr)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """``python -m appliance.lab.portlab serve --ports 22,80 [--tls-cert C --tls-key K]``."""
    parser = argparse.ArgumentParser(prog="portlab")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="listen on TCP ports (run inside a target namespace)")
    serve.add_argument("--ports", required=True)
    serve.add_argument("--tls-cert")
    serve.add_argument("--tls-key")
    serve.add_argument("--udp-ports", default="")
    args = parser.parse_args(argv)
    ports = [int(p) for p in args.ports.split(",") if p]
    udp = [int(p) for p in args.udp_ports.split(",") if p]
    asyncio.run(_serve(ports, args.tls_cert, args.tls_key, udp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
