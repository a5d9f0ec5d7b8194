"""The reference platform's HTTPS server: every endpoint of PROTOCOL.md, to the letter.

aiohttp over TLS 1.2+ with the platform's own CA. The listener asks for a
client certificate without requiring one (``CERT_OPTIONAL``), so that
``/register`` works without one; every other endpoint maps the presented
certificate to an appliance and answers ``401 unknown_appliance`` otherwise.
Every request is recorded (method, path, status, appliance) for the tests, and
the faults injected through :class:`~appliance.lab.platform.admin.Platform`
are applied here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.console import register_secret
from appliance.lab.platform.admin import Platform
from appliance.lab.platform.ca import CsrError, IssuedCertificate, der_fingerprint, load_csr
from appliance.lab.platform.errors import LabPlatformError
from appliance.lab.platform.schemas import PATH_ID_RE, is_host_key, schema_errors
from appliance.lab.platform.store import CallerCert, ProtocolRefusal

log = logging.getLogger("vsa.lab.platform")

KIB = 1024
MIB = 1024 * KIB
REGISTER_LIMIT_BYTES = 64 * KIB
POLL_LIMIT_BYTES = 256 * KIB
ACCEPT_LIMIT_BYTES = 64 * KIB
PROGRESS_LIMIT_BYTES = 16 * KIB
HOST_LIMIT_BYTES = 16 * MIB
COMPLETE_LIMIT_BYTES = 16 * MIB
READ_CHUNK_BYTES = 64 * KIB
SIGNATURES_CHUNK_BYTES = 256 * KIB
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

CALLER_KEY = web.RequestKey("caller", CallerCert)
REGISTERED_KEY = web.RequestKey("registered", str)
PLATFORM_KEY = web.AppKey("platform", Platform)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
           **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status,
                             headers=headers)


def _refusal(refusal: ProtocolRefusal) -> web.Response:
    return web.json_response(refusal.body(), status=refusal.status)


def _peer_fingerprint(request: web.Request) -> str | None:
    """The SHA-256 fingerprint of the client certificate presented on this connection."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der_fingerprint(der) if der else None


def _caller(request: web.Request) -> CallerCert:
    """The appliance behind this request's certificate, or ``401 unknown_appliance``."""
    caller = request.get(CALLER_KEY)
    if caller is None:
        raise ProtocolRefusal(
            401, "unknown_appliance",
            "no client certificate was presented: register first, then use mutual TLS",
        )
    if caller.state != "active":
        why = ("a newer registration superseded this certificate" if caller.state == "superseded"
               else "the platform forgot this appliance")
        raise ProtocolRefusal(401, "unknown_appliance", f"{why}: register again")
    return caller


async def _read_json(request: web.Request, limit: int, *, allow_empty: bool = False) -> Any:
    """The request's JSON body within ``limit`` bytes, or the protocol's 413/415/400."""
    if request.content_length is not None and request.content_length > limit:
        raise ProtocolRefusal(413, "payload_too_large", f"the body exceeds {limit} bytes")
    buf = bytearray()
    while True:
        chunk = await request.content.read(READ_CHUNK_BYTES)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ProtocolRefusal(413, "payload_too_large", f"the body exceeds {limit} bytes")
    if not buf and allow_empty:
        return {}
    if request.content_type != "application/json":
        raise ProtocolRefusal(415, "unsupported_media_type", "the body must be application/json")
    if request.charset is not None and request.charset.lower() not in ("utf-8", "utf8"):
        raise ProtocolRefusal(415, "unsupported_media_type", "the body must be UTF-8 JSON")
    try:
        return json.loads(bytes(buf).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolRefusal(400, "invalid_json", "the body is not valid UTF-8 JSON") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check(schema: str, body: Any) -> dict[str, Any]:
    problem = schema_errors(schema, body)
    if problem is not None:
        raise ProtocolRefusal(400, "invalid_request", problem)
    assert isinstance(body, dict)
    return body


def _path_job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not PATH_ID_RE.match(job_id):
        raise ProtocolRefusal(400, "invalid_parameter", "job_id must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return job_id


class PlatformApp:
    """The aiohttp application of one :class:`Platform`."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.store = platform.store

    def build(self) -> web.Application:
        """The application with its routes and the logging/fault middleware."""
        # The largest body limit; each route enforces its own, smaller one.
        app = web.Application(middlewares=[self._middleware], client_max_size=HOST_LIMIT_BYTES + 1)
        app[PLATFORM_KEY] = self.platform
        app.router.add_post("/vsa/v1/register", self.register)
        app.router.add_post("/vsa/v1/poll", self.poll)
        app.router.add_get("/vsa/v1/signatures/{version}", self.signatures, allow_head=False)
        app.router.add_post("/vsa/v1/jobs/{job_id}/accept", self.accept)
        app.router.add_put("/vsa/v1/jobs/{job_id}/hosts/{host_key}", self.put_host)
        app.router.add_post("/vsa/v1/jobs/{job_id}/progress", self.progress)
        app.router.add_post("/vsa/v1/jobs/{job_id}/complete", self.complete)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        fingerprint = _peer_fingerprint(request)
        caller = self.store.caller(fingerprint) if fingerprint else None
        if caller is not None:
            request[CALLER_KEY] = caller
        appliance_id = caller.appliance_id if caller else None
        user_agent = request.headers.get("User-Agent")
        fault_name: str | None = None
        status = 0
        try:
            fault = self.store.take_fault(("status", "drop", "delay"), request.method, request.path)
            if fault is not None:
                fault_name = f"{fault.kind}#{fault.id}"
            if fault is not None and fault.kind == "drop":
                # Close without an answer: the client sees a reset/disconnect.
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError("fault injection: connection dropped")
            if fault is not None and fault.kind == "status":
                params = fault.params
                headers = {}
                if params.get("retry_after_s") is not None:
                    headers["Retry-After"] = str(int(params["retry_after_s"]))
                response: web.StreamResponse = _error(
                    int(params["status"]), params["code"],
                    "the platform is temporarily unavailable (injected fault): retry later",
                    headers=headers,
                )
            else:
                if fault is not None and fault.kind == "delay":
                    await asyncio.sleep(float(fault.params["delay_s"]))
                response = await self._handle(request, handler)
            status = response.status
            return response
        finally:
            # A registration is logged under the appliance it created or renewed.
            appliance_id = appliance_id or request.get(REGISTERED_KEY)
            self.store.log_request(request.method, request.path, status, appliance_id,
                                   fault_name, user_agent)

    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProtocolRefusal as refusal:
            return _refusal(refusal)
        except web.HTTPException as exc:
            # Routing errors (404, 405) in the protocol's error shape.
            code = {404: "not_found", 405: "method_not_allowed",
                    413: "payload_too_large"}.get(exc.status, "http_error")
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error(exc.status, code, exc.reason, headers=headers)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error on %s %s", request.method, request.path)
            return _error(500, "internal_error", "the platform failed to handle the request")

    # -- endpoints -------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.StreamResponse:
        """POST /vsa/v1/register: perscode + CSR → client certificate (201)."""
        body = _check("RegisterRequest", await _read_json(request, REGISTER_LIMIT_BYTES))
        register_secret(body["perscode"])
        instance_id = body["instance"]["instance_id"]
        document = body.get("identity_document")
        if isinstance(document, str):
            try:
                parsed = json.loads(document)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and "instanceId" in parsed and parsed["instanceId"] != instance_id:
                raise ProtocolRefusal(
                    400, "identity_mismatch",
                    "identity_document names another instance than instance.instance_id",
                )
        try:
            load_csr(body["csr_pem"])
        except CsrError as exc:
            raise ProtocolRefusal(400, "invalid_csr", str(exc)) from exc
        issued: list[IssuedCertificate] = []

        def sign(aid: str) -> IssuedCertificate:
            issued.append(self.platform.ca.sign_csr(body["csr_pem"], aid))
            return issued[-1]

        appliance_id, again = self.store.register(
            perscode=body["perscode"], instance_id=instance_id, sign=sign,
            instance=body["instance"], capabilities=body.get("capabilities"),
            software_version=body["software_version"],
        )
        certificate = issued[-1].pem
        request[REGISTERED_KEY] = appliance_id
        log.info("%s %s from %s", "re-registered" if again else "registered", appliance_id, instance_id)
        return web.json_response(
            {
                "appliance_id": appliance_id,
                "certificate_pem": certificate,
                "ca_pem": self.platform.ca_pem,
                "poll_interval_s": self.store.poll_interval_for(appliance_id),
                "mqtt": self.platform.mqtt_for(appliance_id),
            },
            status=201,
        )

    async def poll(self, request: web.Request) -> web.StreamResponse:
        """POST /vsa/v1/poll: heartbeat in, offers/cancellations/proxy/signatures out."""
        caller = _caller(request)
        body = _check("PollRequest", await _read_json(request, POLL_LIMIT_BYTES))
        aid = caller.appliance_id
        self.store.record_heartbeat(aid, body)
        jobs = [self.platform.job_spec_for(row["job_id"], caller)
                for row in self.store.queued_jobs_for(aid)]
        running = [j["job_id"] for j in body["running_jobs"]]
        return web.json_response({
            "poll_interval_s": self.store.poll_interval_for(aid),
            "jobs": jobs,
            "cancel_jobs": self.store.take_cancellations(aid, running),
            "ec2_api_proxy": self.platform.ec2_api_proxy(),
            "signatures": self.platform.signatures_offer(),
        })

    async def signatures(self, request: web.Request) -> web.StreamResponse:
        """GET /vsa/v1/signatures/{version}: the bundle bytes, streamed, application/gzip."""
        _caller(request)
        version = request.match_info["version"]
        if not PATH_ID_RE.match(version):
            raise ProtocolRefusal(400, "invalid_parameter", "version must be 1-64 characters of A-Z a-z 0-9 . _ -")
        path = self.platform.signatures_file(version)
        if path is None or not path.exists():
            raise ProtocolRefusal(404, "unknown_signatures", f"no signatures bundle {version}")
        response = web.StreamResponse(status=200)
        response.content_type = "application/gzip"
        response.content_length = path.stat().st_size
        await response.prepare(request)
        with path.open("rb") as fh:
            while chunk := fh.read(SIGNATURES_CHUNK_BYTES):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def accept(self, request: web.Request) -> web.StreamResponse:
        """POST /vsa/v1/jobs/{job_id}/accept: first accept wins; the holder may accept again."""
        caller = _caller(request)
        _check("AcceptRequest", await _read_json(request, ACCEPT_LIMIT_BYTES, allow_empty=True))
        job_id = _path_job_id(request)
        self.store.accept(job_id, caller.appliance_id)
        return web.json_response({"job": self.platform.job_spec_for(job_id, caller)})

    async def put_host(self, request: web.Request) -> web.StreamResponse:
        """PUT /vsa/v1/jobs/{job_id}/hosts/{host_key}: idempotent host result (201 new, 200 replaced)."""
        caller = _caller(request)
        body = _check("HostResult", await _read_json(request, HOST_LIMIT_BYTES))
        job_id = _path_job_id(request)
        host_key = request.match_info["host_key"]
        if not is_host_key(host_key):
            raise ProtocolRefusal(400, "invalid_host_key", "host_key must be an EC2 instance ID or an IP address")
        if body["host_key"] != host_key:
            raise ProtocolRefusal(400, "host_key_mismatch", "the body's host_key differs from the path's")
        self.store.held_job(job_id, caller.appliance_id)
        created, received_at = self.store.put_host(job_id, host_key, caller.appliance_id, body)
        return web.json_response({"job_id": job_id, "host_key": host_key, "received_at": received_at},
                                 status=201 if created else 200)

    async def progress(self, request: web.Request) -> web.StreamResponse:
        """POST /vsa/v1/jobs/{job_id}/progress: best effort, 204."""
        caller = _caller(request)
        body = _check("Progress", await _read_json(request, PROGRESS_LIMIT_BYTES))
        job_id = _path_job_id(request)
        if body["hosts_done"] > body["hosts_total"]:
            raise ProtocolRefusal(400, "invalid_request", "hosts_done exceeds hosts_total")
        self.store.held_job(job_id, caller.appliance_id)
        self.store.add_progress(job_id, caller.appliance_id, body)
        return web.Response(status=204)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        """POST /vsa/v1/jobs/{job_id}/complete: 200 when every host_key is held, else 409 missing_hosts."""
        caller = _caller(request)
        body = _check("Completion", await _read_json(request, COMPLETE_LIMIT_BYTES))
        job_id = _path_job_id(request)
        bad = next((k for k in body["host_keys"] if not is_host_key(k)), None)
        if bad is not None:
            raise ProtocolRefusal(400, "invalid_host_key", "host_keys holds a value that is neither an EC2 instance ID nor an IP address")
        self.store.held_job(job_id, caller.appliance_id)
        fault = self.store.take_fault(("lose_hosts",), request.method, request.path)
        if fault is not None:
            lost = self.store.drop_host_results(job_id, body["host_keys"][: int(fault.params["count"])])
            log.info("fault injection: forgot %d host results of %s", len(lost), job_id)
        held = self.store.complete(job_id, caller.appliance_id, body)
        return web.json_response({"job_id": job_id, "status": body["status"], "hosts_received": held})


class PlatformServer:
    """The HTTPS server of a platform in the current event loop (``async with``)."""

    def __init__(self, platform: Platform, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.platform = platform
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL, ``https://host:port`` (IPv6 bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port (read it from :attr:`port` afterwards)."""
        # handler_cancellation: a dropped client connection cancels its handler.
        self._runner = web.AppRunner(PlatformApp(self.platform).build(), access_log=None,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port,
                           ssl_context=self.platform.ca.server_ssl_context())
        await site.start()
        server = site._server  # aiohttp exposes the bound port only on the asyncio server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and finish."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PlatformServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class PlatformThread:
    """The server in a background thread with its own event loop (for synchronous tests)."""

    def __init__(self, data_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: PlatformServer | None = None
        self._platform: Platform | None = None

    @property
    def url(self) -> str:
        """The base URL."""
        assert self._server is not None
        return self._server.url

    def start(self) -> PlatformThread:
        """Start the thread and wait until the server listens."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._platform = Platform(self.data_dir)
                self._server = PlatformServer(self._platform, host=self.host, port=self.port)
                loop.run_until_complete(self._server.start())
                self.port = self._server.port
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._server.stop())
            self._platform.close()
            loop.close()

        self._thread = threading.Thread(target=run, name="vsa-lab-platform", daemon=True)
        self._thread.start()
        if not ready.wait(STARTUP_TIMEOUT_S):
            raise LabPlatformError("the platform thread did not start in time")
        if failure:
            raise LabPlatformError(f"the platform failed to start: {failure[0]}") from failure[0]
        return self

    def stop(self) -> None:
        """Stop the server and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = None

    def __enter__(self) -> PlatformThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PlatformProcess:
    """The server as a child process (``python -m appliance.lab.platform serve``)."""

    def __init__(
        self, data_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 0,
        extra_args: list[str] | None = None, stdout: Any = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.extra_args = extra_args or []
        self.stdout = stdout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> PlatformProcess:
        """Spawn the server and wait until it listens (it writes its port to a file)."""
        with tempfile.TemporaryDirectory() as tmp:
            port_file = Path(tmp) / "port"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.lab.platform", "serve", "--data-dir", str(self.data_dir),
                 "--host", self.host, "--port", str(self.port), "--port-file", str(port_file),
                 *self.extra_args],
                stdout=self.stdout, stderr=self.stdout,
            )
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not port_file.exists() or not port_file.read_text().strip():
                if self.proc.poll() is not None:
                    raise LabPlatformError(f"the platform process exited with status {self.proc.returncode}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise LabPlatformError("the platform process did not start in time")
                time.sleep(0.05)
            self.port = int(port_file.read_text())
        return self

    def stop(self) -> None:
        """SIGTERM, wait, and SIGKILL if it does not go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self.proc = None

    def __enter__(self) -> PlatformProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_forever(platform: Platform, *, host: str, port: int, port_file: Path | None) -> None:
    """Run the server until SIGTERM/SIGINT (the ``serve`` command)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with PlatformServer(platform, host=host, port=port) as server:
        print(f"vsa-lab-platform: listening on {server.url} (CA {platform.ca_file})", flush=True)
        if port_file is not None:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(str(server.port))
            os.replace(tmp, port_file)
        await stop.wait()
    print("vsa-lab-platform: stopped", flush=True)


def client_ssl_context(ca_file: str | os.PathLike[str], cert_file: str | os.PathLike[str] | None = None,
                       key_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client TLS context for the platform: verify against its CA, optionally present a certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


with contextlib.suppress(Exception):  # keep aiohttp's own error logs quiet on injected drops
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
