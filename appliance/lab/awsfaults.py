"""A fault-injecting reverse proxy in front of moto: AWS denials and throttling, for real.

moto accepts any ExternalId and even roles that do not exist (LAB-NOTES.md),
so the denials a connector role produces in AWS come from here instead: an
aiohttp server on 127.0.0.1 that the STS and EC2 clients use as their endpoint.
It reads each request (AWS query protocol: a form body with ``Action``,
``RoleArn``, ``ExternalId``; the region from the SigV4 ``Authorization``
header), answers AWS-formatted XML errors when a rule says so, and otherwise
forwards the request unchanged to moto and relays the answer.

Rules (all mutable between requests):

- ``deny_roles``: role ARNs (or ``"*"``) whose AssumeRole is answered
  ``403 AccessDenied``, the caller not being trusted;
- ``external_ids``: role ARN → the ExternalId its trust policy requires;
  AssumeRole with another or no ExternalId is ``403 AccessDenied``, exactly as
  AWS answers it;
- ``throttle``: action → how many of the next calls are answered with the
  service's throttling error (EC2 ``503 RequestLimitExceeded``, STS
  ``400 Throttling``);
- ``deny_ec2_regions``: regions whose EC2 calls are ``403 UnauthorizedOperation``.

Every request is recorded in :attr:`AwsFaultProxy.requests` (action, region,
whether a fault answered). Lab code: never imported by the daemon.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

UPSTREAM_TIMEOUT_S = 30.0
STS_XMLNS = "https://sts.amazonaws.com/doc/2011-06-15/"
_REGION_RE = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request")
# Hop-by-hop headers are never relayed (RFC 9110, 7.6.1).
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "content-encoding", "host",
}


@dataclass(frozen=True)
class SeenRequest:
    """One request the proxy received."""

    service: str | None  # from the signature's credential scope: sts, ec2
    region: str | None
    action: str | None
    role_arn: str | None
    external_id: str | None
    fault: str | None  # the error code answered, or None when forwarded


@dataclass
class AwsFaultProxy:
    """The reverse proxy; ``await start()`` then use :attr:`url` as STS/EC2 endpoint."""

    upstream: str  # moto's base URL
    deny_roles: set[str] = field(default_factory=set)
    external_ids: dict[str, str] = field(default_factory=dict)
    throttle: dict[str, int] = field(default_factory=dict)
    deny_ec2_regions: set[str] = field(default_factory=set)
    requests: list[SeenRequest] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)
    _client: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> AwsFaultProxy:
        """Listen on 127.0.0.1 (a free port unless one was given)."""
        # trust_env False: the relay to moto never follows HTTP(S)_PROXY.
        self._client = aiohttp.ClientSession(
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        # The bound port (when 0 was asked): from the runner's listening addresses.
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Stop listening and close the upstream session."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> AwsFaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def count(self, action: str, *, fault: bool | None = None) -> int:
        """How many requests of an action arrived (only faulted/forwarded ones if asked)."""
        return sum(
            1 for r in self.requests
            if r.action == action and (fault is None or (r.fault is not None) == fault)
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form = parse_qs(body.decode("utf-8", "replace")) if body else {}
        for key, values in parse_qs(request.query_string).items():
            form.setdefault(key, values)
        action = _first(form, "Action")
        role_arn = _first(form, "RoleArn")
        external_id = _first(form, "ExternalId")
        match = _REGION_RE.search(request.headers.get("Authorization", ""))
        region, service = (match.group(1), match.group(2)) if match else (None, None)

        fault = self._fault_for(service, region, action, role_arn, external_id)
        self.requests.append(SeenRequest(service, region, action, role_arn, external_id,
                                         fault[0] if fault else None))
        if fault is not None:
            code, status, message = fault
            return web.Response(
                status=status,
                body=_error_xml(service, code, message).encode(),
                content_type="text/xml",
            )
        return await self._forward(request, body)

    def _fault_for(
        self,
        service: str | None,
        region: str | None,
        action: str | None,
        role_arn: str | None,
        external_id: str | None,
    ) -> tuple[str, int, str] | None:
        if action and self.throttle.get(action, 0) > 0:
            self.throttle[action] -= 1
            if service == "sts":
                return "Throttling", 400, "Rate exceeded"
            return "RequestLimitExceeded", 503, "Request limit exceeded."
        if action == "AssumeRole" and role_arn is not None:
            denied = "*" in self.deny_roles or role_arn in self.deny_roles
            required = self.external_ids.get(role_arn)
            if required is not None and external_id != required:
                denied = True
            if denied:
                return (
                    "AccessDenied",
                    403,
                    "User: arn:aws:sts::123456789012:assumed-role/VsaInstance/i-0lab is not "
                    f"authorized to perform: sts:AssumeRole on resource: {role_arn}",
                )
        if service == "ec2" and region in self.deny_ec2_regions:
            return (
                "UnauthorizedOperation",
                403,
                f"You are not authorized to perform this operation. ({action})",
            )
        return None

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._client.request(
            request.method,
            self.upstream.rstrip("/") + request.path_qs,
            headers=headers,
            data=body,
        ) as upstream:
            payload = await upstream.read()
            relay = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            return web.Response(status=upstream.status, body=payload, headers=relay)


def _first(form: dict[str, list[str]], key: str) -> str | None:
    values = form.get(key)
    return values[0] if values else None


def _error_xml(service: str | None, code: str, message: str) -> str:
    """An error body in the service's own XML shape (EC2 and STS differ)."""
    request_id = str(uuid.uuid4())
    if service == "ec2":
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Errors><Error><Code>{code}</Code><Message>{_xml(message)}</Message>"
            f"</Error></Errors><RequestID>{request_id}</RequestID></Response>"
        )
    kind = "Receiver" if code == "Throttling" else "Sender"
    return (
        f'<ErrorResponse xmlns="{STS_XMLNS}"><Error><Type>{kind}</Type><Code>{code}</Code>'
        f"<Message>{_xml(message)}</Message></Error><RequestId>{request_id}</RequestId>"
        "</ErrorResponse>"
    )


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
