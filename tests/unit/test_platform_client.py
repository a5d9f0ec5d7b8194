"""The platform client against a real TLS server on 127.0.0.1: register without a client
certificate, poll with one, every refusal typed, Retry-After read, bounded bodies, verification."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from appliance.platform.client import (
    InvalidPerscode,
    PerscodeInUse,
    PlatformClient,
    PlatformProtocolError,
    PlatformRejected,
    PlatformUnavailable,
    PlatformUnreachable,
    UnknownAppliance,
)
from appliance.platform.messages import Capabilities, PollRequest, RegisterRequest

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@dataclass
class Server:
    url: str
    ca_file: Path
    client_cert: Path
    client_key: Path
    seen: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, tuple[int, Any, dict[str, str]]] = field(default_factory=dict)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("appliance.test")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    state = Server("", ca_file, cert_file, key_file)

    async def handle(request: web.Request) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        peer = ssl_object.getpeercert() if ssl_object else None
        body = await request.json() if request.can_read_body else None
        state.seen.append({"path": request.path, "peer": bool(peer), "body": body,
                           "user_agent": request.headers.get("User-Agent")})
        if request.path in state.answers:
            status, payload, headers = state.answers[request.path]
            if isinstance(payload, bytes):
                return web.Response(status=status, body=payload, headers=headers)
            return web.json_response(payload, status=status, headers=headers)
        if request.path == "/vsa/v1/register":
            return web.json_response({"appliance_id": "vsa-1", "certificate_pem": CERT, "ca_pem": None,
                                      "poll_interval_s": 60, "mqtt": None}, status=201)
        if not peer:
            return web.json_response({"error": "unknown_appliance", "message": "no certificate"}, status=401)
        return web.json_response({"poll_interval_s": 60, "jobs": [], "cancel_jobs": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    context.load_verify_locations(cafile=str(ca_file))
    context.verify_mode = ssl.CERT_OPTIONAL
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"https://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


def register_request() -> RegisterRequest:
    return RegisterRequest(perscode="12345678901234", csr_pem="csr", instance={"instance_id": "i-0abc"},
                           identity_document="{}", identity_pkcs7=None, software_version="0.1.0",
                           capabilities=Capabilities(True, 2, 7900, "x86_64", 16))


def poll_request() -> PollRequest:
    return PollRequest("vsa-1", "i-0abc", "0.1.0", None, "10.0.0.5", "idle")


async def test_register_without_and_poll_with_a_client_certificate(server: Server) -> None:
    async with PlatformClient(server.url, ca_file=server.ca_file) as client:
        answer = await client.register(register_request())
        assert answer.appliance_id == "vsa-1"
        assert server.seen[-1]["peer"] is False
        assert set(server.seen[-1]["body"]) == {"perscode", "csr_pem", "instance", "identity_document",
                                                "identity_pkcs7", "software_version", "capabilities"}
        assert server.seen[-1]["user_agent"] == "vsa/0.1.0"
        client.use_certificate(server.client_cert, server.client_key)
        polled = await client.poll(poll_request())
        assert polled.poll_interval_s == 60
        assert server.seen[-1]["peer"] is True


@pytest.mark.parametrize(
    ("status", "body", "headers", "error"),
    [
        (403, {"error": "invalid_perscode", "message": "unknown code"}, {}, InvalidPerscode),
        (409, {"error": "perscode_in_use", "message": "bound to i-0aaa"}, {}, PerscodeInUse),
        (503, {"error": "unavailable", "message": "maintenance"}, {"Retry-After": "7"}, PlatformUnavailable),
        (429, {"error": "rate_limited", "message": "slow down"}, {"Retry-After": "3"}, PlatformUnavailable),
        (500, b"<html>oops</html>", {}, PlatformUnavailable),
        (400, {"error": "bad_request", "message": "csr_pem: not a CSR"}, {}, PlatformRejected),
    ],
)
async def test_register_refusals_are_typed(server: Server, status: int, body: Any, headers: dict[str, str],
                                           error: type[Exception]) -> None:
    server.answers["/vsa/v1/register"] = (status, body, headers)
    async with PlatformClient(server.url, ca_file=server.ca_file) as client:
        with pytest.raises(error) as info:
            await client.register(register_request())
    exc = info.value
    if isinstance(body, dict):
        assert exc.detail == body["message"]  # type: ignore[attr-defined]
    if "Retry-After" in headers:
        assert exc.retry_after_s == float(headers["Retry-After"])  # type: ignore[attr-defined]


async def test_poll_401_is_unknown_appliance(server: Server) -> None:
    async with PlatformClient(server.url, ca_file=server.ca_file) as client:
        with pytest.raises(Exception, match="register first"):
            await client.poll(poll_request())
        server.answers["/vsa/v1/poll"] = (401, {"error": "unknown_appliance", "message": "forgotten"}, {})
        client.use_certificate(server.client_cert, server.client_key)
        with pytest.raises(UnknownAppliance, match="forgotten"):
            await client.poll(poll_request())


async def test_malformed_and_oversized_answers(server: Server) -> None:
    async with PlatformClient(server.url, ca_file=server.ca_file) as client:
        client.use_certificate(server.client_cert, server.client_key)
        server.answers["/vsa/v1/poll"] = (200, {"jobs": []}, {})
        with pytest.raises(PlatformProtocolError, match="poll_interval_s is missing"):
            await client.poll(poll_request())
        server.answers["/vsa/v1/poll"] = (200, b"not json", {"Content-Type": "application/json"})
        with pytest.raises(PlatformProtocolError, match="not JSON"):
            await client.poll(poll_request())
        big = json.dumps({"poll_interval_s": 60, "pad": "x" * (5 * 1024 * 1024)}).encode()
        server.answers["/vsa/v1/poll"] = (200, big, {"Content-Type": "application/json"})
        with pytest.raises(PlatformProtocolError, match="limit"):
            await client.poll(poll_request())


async def test_an_untrusted_server_certificate_is_never_accepted(server: Server, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with PlatformClient(server.url, ca_file=other) as client:
        with pytest.raises(PlatformUnreachable) as info:
            await client.register(register_request())
    text = str(info.value)
    assert text.startswith(f"unable to connect to 127.0.0.1:{server.url.rsplit(':', 1)[1]} - please fix:")
    assert "cannot be verified" in text and str(other) in text
    assert server.seen == []  # nothing was sent


async def test_a_refused_port_is_said_in_words(tmp_path: Path) -> None:
    from appliance.lab.squid import free_port

    port = free_port()
    async with PlatformClient(f"https://127.0.0.1:{port}") as client:
        with pytest.raises(PlatformUnreachable, match="the connection was refused; check that the platform listens"):
            await client.register(register_request())


async def test_a_silent_server_is_a_timeout_in_words() -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the TCP connection, never speaks TLS
    port = listener.getsockname()[1]
    try:
        async with PlatformClient(f"https://127.0.0.1:{port}", request_timeout_s=1.0) as client:
            with pytest.raises(PlatformUnreachable, match="no answer in time; check the security groups"):
                await client.probe()
    finally:
        listener.close()


def test_dns_failure_is_said_in_words() -> None:
    import socket

    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    from appliance.platform.client import describe_connection_failure

    key = ConnectionKey("platform.example", 443, True, True, None, None, None)
    exc = aiohttp.ClientConnectorDNSError(key, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    cause, remedy = describe_connection_failure(exc, host="platform.example", port=443, proxy=None, ca_file=None)
    assert cause == "the name platform.example cannot be resolved"
    assert "DNS" in remedy
