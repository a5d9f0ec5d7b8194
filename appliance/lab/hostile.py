"""A hostile platform for the lab: it registers an appliance properly, then misbehaves on purpose.

Issue 11 asks that a platform that lies, stalls or impersonates be refused with
words on the console while the daemon keeps running and installs nothing. This
server speaks just enough of PROTOCOL.md (``POST /vsa/v1/register`` signs the
CSR with a lab CA; ``POST /vsa/v1/poll``; ``GET /vsa/v1/signatures/{v}``) and
answers polls according to :attr:`HostilePlatform.mode`, switchable at run time:

- ``ok``: a well-formed, empty poll answer (the fault removed);
- ``oversized``: a JSON body over the 4 MiB limit, streamed (no Content-Length);
- ``drip``: a valid JSON body dripped one byte per second (the client's total
  timeout must end it);
- ``invalid_json``: a body that is not JSON;
- ``wrong_types``: JSON of the right shape with the wrong types;
- ``foreign_signatures``: a signatures offer whose ``url`` is on another origin
  (a second listener of this server, so that a request to it would be counted);
- ``bad_signature``: a signatures offer on the right origin whose bundle is
  signed by another Ed25519 key.

:attr:`HostilePlatform.wrong_name` makes every new TLS handshake present a
certificate issued by the same CA for another host name (``wrong.invalid``).
Every response closes its connection, so each request starts a new handshake.

Lab code only: never imported by the daemon.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import shutil
import socket
import ssl
import struct
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.lab.platform.ca import CertificateAuthority

MODES = ("ok", "oversized", "drip", "invalid_json", "wrong_types", "foreign_signatures", "bad_signature")
OVERSIZED_BYTES = 5 * 1024 * 1024  # over the client's 4 MiB JSON limit
DRIP_INTERVAL_S = 1.0
DRIP_MAX_S = 600.0  # the drip gives up by itself long after any client should have
POLL_INTERVAL_S = 1  # the daemon's test floor lets it poll every second
APPLIANCE_ID = "vsa-hostile"
BAD_VERSION = "2026.12.04.66"
FOREIGN_VERSION = "2026.12.04.77"
WRONG_NAME = "wrong.invalid"  # reserved TLD: never resolvable anywhere
START_TIMEOUT_S = 10.0


def _bundle_bytes() -> bytes:
    record = {"id": "VSA-HOSTILE-1", "modified": "2026-12-04T00:00:00Z",
              "affected": [{"package": {"ecosystem": "Debian:12", "name": "openssl"},
                            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}]}]}
    return gzip.compress((json.dumps(record) + "\n").encode(), mtime=0)


class HostilePlatform:
    """The hostile server; :meth:`serve_in_thread` runs it on 127.0.0.1 (two ports)."""

    def __init__(self, directory: Path) -> None:
        """Create the lab CA, a good and a wrong-name server certificate, and the bundle key."""
        self.directory = directory
        self.ca = CertificateAuthority(directory / "ca")
        self.ca.create(["127.0.0.1", "localhost"])
        self.good_cert = directory / "good.pem"
        self.good_key = directory / "good.key"
        shutil.copy(self.ca.server_cert_file, self.good_cert)
        shutil.copy(self.ca.server_key_file, self.good_key)
        self.ca.reissue_server([WRONG_NAME])
        self.wrong_cert = directory / "wrong.pem"
        self.wrong_key = directory / "wrong.key"
        shutil.copy(self.ca.server_cert_file, self.wrong_cert)
        shutil.copy(self.ca.server_key_file, self.wrong_key)
        self.ca_file = self.ca.ca_file
        # The key the appliance is configured to trust, and another that signs the bad bundle.
        self.trusted_key = Ed25519PrivateKey.generate()
        self.other_key = Ed25519PrivateKey.generate()
        self.bundle = _bundle_bytes()
        self.mode = "ok"
        self.wrong_name = False
        self.hits: Counter[str] = Counter()  # "<path> <mode>" and "foreign <path>"
        self.port = 0
        self.foreign_port = 0
        self._lock = threading.Lock()

    # --- knobs and views ---

    def public_key_b64(self) -> str:
        """``signatures.public_key`` for the appliance (base64 of the raw Ed25519 key)."""
        raw = self.trusted_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    @property
    def url(self) -> str:
        """The platform URL (``https://127.0.0.1:PORT``)."""
        return f"https://127.0.0.1:{self.port}"

    def count(self, key: str) -> int:
        """How many requests matched ``key`` (e.g. ``"/vsa/v1/poll ok"``)."""
        with self._lock:
            return self.hits[key]

    def _hit(self, key: str) -> None:
        with self._lock:
            self.hits[key] += 1

    # --- TLS ---

    def _server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.good_cert, self.good_key)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(self.ca_file))
        wrong = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        wrong.minimum_version = ssl.TLSVersion.TLSv1_2
        wrong.load_cert_chain(self.wrong_cert, self.wrong_key)

        def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            # Called for every ClientHello (with or without SNI): swap in the wrong-name certificate.
            if self.wrong_name:
                sslobj.context = wrong

        ctx.sni_callback = pick
        return ctx

    # --- handlers ---

    async def _register(self, request: web.Request) -> web.StreamResponse:
        self._hit("/vsa/v1/register")
        body = await request.json()
        issued = self.ca.sign_csr(body["csr_pem"], APPLIANCE_ID)
        return self._json({"appliance_id": APPLIANCE_ID, "certificate_pem": issued.pem,
                           "ca_pem": self.ca.ca_pem(), "poll_interval_s": POLL_INTERVAL_S, "mqtt": None},
                          status=201)

    def _json(self, obj: Any, status: int = 200) -> web.Response:
        response = web.json_response(obj, status=status)
        response.force_close()
        return response

    def _offer(self, version: str, url: str, key: Ed25519PrivateKey) -> dict[str, Any]:
        return {"version": version, "url": url, "sha256": hashlib.sha256(self.bundle).hexdigest(),
                "signature": base64.b64encode(key.sign(self.bundle)).decode("ascii")}

    async def _poll(self, request: web.Request) -> web.StreamResponse:
        mode = self.mode
        self._hit(f"/vsa/v1/poll {mode}")
        await request.read()
        empty: dict[str, Any] = {"poll_interval_s": POLL_INTERVAL_S, "jobs": [], "cancel_jobs": [],
                                 "ec2_api_proxy": None, "signatures": None}
        if mode == "oversized":
            return await self._stream(request, self._oversized_chunks())
        if mode == "drip":
            return await self._drip(request, json.dumps(empty | {"padding": "x" * 4096}).encode())
        if mode == "invalid_json":
            response = web.Response(body=b'{"poll_interval_s": 1, "jobs": [', content_type="application/json")
            response.force_close()
            return response
        if mode == "wrong_types":
            return self._json({"poll_interval_s": "soon", "jobs": {"job_id": 7}, "cancel_jobs": 5,
                               "ec2_api_proxy": [], "signatures": "yes"})
        if mode == "foreign_signatures":
            url = f"https://127.0.0.1:{self.foreign_port}/vsa/v1/signatures/{FOREIGN_VERSION}"
            return self._json(empty | {"signatures": self._offer(FOREIGN_VERSION, url, self.trusted_key)})
        if mode == "bad_signature":
            url = f"/vsa/v1/signatures/{BAD_VERSION}"
            return self._json(empty | {"signatures": self._offer(BAD_VERSION, url, self.other_key)})
        return self._json(empty)

    def _oversized_chunks(self) -> Iterator[bytes]:
        yield b'{"poll_interval_s": 1, "jobs": [], "padding": "'
        chunk = b"x" * 65536
        for _ in range(OVERSIZED_BYTES // len(chunk) + 1):
            yield chunk
        yield b'"}'

    async def _stream(self, request: web.Request, chunks: Iterator[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        response.force_close()
        await response.prepare(request)
        try:
            for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client gave up, as it should
        return response

    async def _drip(self, request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        response.force_close()
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            for index in range(len(body)):
                if loop.time() - started > DRIP_MAX_S:
                    break
                await response.write(body[index:index + 1])
                await asyncio.sleep(DRIP_INTERVAL_S)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self._hit("drip abandoned by the client")
        return response

    async def _signatures(self, request: web.Request) -> web.StreamResponse:
        local_port = request.transport.get_extra_info("sockname")[1] if request.transport else None
        where = "foreign" if local_port == self.foreign_port else "own"
        self._hit(f"{where} {request.path}")
        response = web.Response(body=self.bundle, content_type="application/gzip")
        response.force_close()
        return response

    # --- serving ---

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/vsa/v1/register", self._register)
        app.router.add_post("/vsa/v1/poll", self._poll)
        app.router.add_get("/vsa/v1/signatures/{version}", self._signatures)
        app.router.add_get("/vsa/v1/", self._root)
        return app

    async def _root(self, _request: web.Request) -> web.StreamResponse:
        return self._json({"protocol": 1})

    @contextmanager
    def serve_in_thread(self) -> Iterator[str]:
        """Serve on two 127.0.0.1 ports (the platform and a foreign origin) until the block ends."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        stop: dict[str, Any] = {}

        async def main() -> None:
            runner = web.AppRunner(self._app(), handle_signals=False)
            await runner.setup()
            context = self._server_context()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            foreign = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            await foreign.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.foreign_port = foreign._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            done = asyncio.Event()
            stop["event"] = done
            ready.set()
            await done.wait()
            await runner.cleanup()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True,
                                  name="hostile-platform")
        thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the hostile platform did not start")
        try:
            yield self.url
        finally:
            loop.call_soon_threadsafe(stop["event"].set)
            thread.join(START_TIMEOUT_S)
            loop.close()


class BadTlsServer:
    """A platform port that cannot complete a TLS 1.2 handshake: plain HTTP, or TLS 1.0 only.

    ``mode`` (switchable at run time): ``plain`` answers the ClientHello with an
    HTTP 400 page, as a web server on the wrong port would; ``tls10`` speaks
    TLS 1.0 and nothing newer (the appliance requires 1.2 or newer); ``reset``
    reads the ClientHello and resets the connection.
    """

    def __init__(self, cert_file: Path, key_file: Path, mode: str = "plain") -> None:
        """Serve ``cert_file``/``key_file`` in ``tls10`` mode; start with :meth:`serve_in_thread`."""
        self.mode = mode
        self.port = 0
        self.connections: Counter[str] = Counter()
        self._lock = threading.Lock()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.0 at the default level
        with warnings.catch_warnings():  # deprecated on purpose: this server is the outdated one
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1
        context.load_cert_chain(cert_file, key_file)
        self._tls10 = context

    def _handle(self, conn: socket.socket) -> None:
        mode = self.mode
        with self._lock:
            self.connections[mode] += 1
        conn.settimeout(START_TIMEOUT_S)
        try:
            if mode == "reset":
                # Read the ClientHello, then abort: SO_LINGER 0 makes close() send a RST.
                conn.recv(4096)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "plain":
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                with self._tls10.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
        except (OSError, ssl.SSLError):
            pass  # the handshake failing is the point
        finally:
            conn.close()

    @contextmanager
    def serve_in_thread(self) -> Iterator[int]:
        """Listen on 127.0.0.1 until the block ends (one thread per connection); yields the port."""
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        stopping = threading.Event()

        def accept_loop() -> None:
            while not stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

        thread = threading.Thread(target=accept_loop, daemon=True, name="bad-tls")
        thread.start()
        try:
            yield self.port
        finally:
            stopping.set()
            thread.join(START_TIMEOUT_S)
            listener.close()
