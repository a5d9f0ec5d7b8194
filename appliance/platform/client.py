"""The platform protocol client (PROTOCOL.md): register, poll, and authenticated calls.

``register`` uses server-authenticated TLS only (no client certificate); every
other request uses mutual TLS with the certificate registration gave. The
server certificate is always verified (``platform.ca_file`` or the system trust
store), traffic goes through ``PROXY_URL`` when set, responses are bounded
(4 MiB of JSON) and parsed into typed messages at once.

Each call sends one request and either returns a typed message or raises one
typed error; retrying is the caller's business (the daemon's loop, driven by
:mod:`appliance.platform.retry`), so every outcome can be tested on its own:

- :class:`InvalidPerscode` (403 ``invalid_perscode``), :class:`PerscodeInUse`
  (409 ``perscode_in_use``), :class:`UnknownAppliance` (401): the platform's
  refusal, with its message;
- :class:`PlatformUnavailable` (429, 5xx): retry, honouring ``retry_after_s``;
- :class:`PlatformUnreachable` (DNS, refused, timeout, TLS, proxy): retry with
  backoff; the text is the console's ``unable to connect to HOST:PORT - please fix: ...``;
- :class:`PlatformProtocolError` (a malformed or oversized answer) and
  :class:`PlatformRejected` (another 4xx): retry with backoff, the detail goes to the journal.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from appliance.errors import PlatformError
from appliance.platform.http import (
    ProxySettings,
    ResponseTooLarge,
    platform_session,
    read_json,
    tls_context,
)
from appliance.platform.messages import (
    ErrorBody,
    MessageError,
    PollRequest,
    PollResponse,
    RegisterRequest,
    RegisterResponse,
)
from appliance.platform.retry import parse_retry_after

log = logging.getLogger("vsa.platform")

REGISTER_PATH = "/vsa/v1/register"
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_EMAIL_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH.
CERT_NAME_MISMATCH_CODES = (62, 63, 64)
POLL_PATH = "/vsa/v1/poll"
PROBE_PATH = "/vsa/v1/"


# --- errors ---


class PlatformRefusal(PlatformError):
    """The platform answered with an error status; ``code`` and ``detail`` are its words."""

    def __init__(self, status: int, code: str | None, detail: str | None, what: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        text = f"{what}: the platform answered {status}"
        if code:
            text += f" {code}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class InvalidPerscode(PlatformRefusal):
    """403 invalid_perscode: the personalization code is unknown or revoked."""


class PerscodeInUse(PlatformRefusal):
    """409 perscode_in_use: the code is bound to another instance."""


class UnknownAppliance(PlatformRefusal):
    """401 on an authenticated call: the platform forgot or deregistered this appliance."""


class PlatformRejected(PlatformRefusal):
    """Another 4xx: the request was refused (a bug on one side; retried with backoff)."""


class PlatformUnavailable(PlatformRefusal):
    """429 or 5xx: try again later, after ``retry_after_s`` when the platform said so."""

    def __init__(self, status: int, code: str | None, detail: str | None, what: str, retry_after_s: float | None) -> None:
        super().__init__(status, code, detail, what)
        self.retry_after_s = retry_after_s


class PlatformUnreachable(PlatformError):
    """The platform could not be reached (DNS, refused, timeout, TLS, proxy)."""

    def __init__(self, host: str, port: int, cause: str, remedy: str) -> None:
        self.host = host
        self.port = port
        self.cause = cause
        self.remedy = remedy
        super().__init__(f"unable to connect to {host}:{port} - please fix: {cause}; {remedy}")


class PlatformProtocolError(PlatformError):
    """The platform's answer is malformed, oversized or not what the protocol says."""


class NotRegistered(PlatformError):
    """An authenticated call was attempted without a client certificate."""


# --- the client ---


class PlatformClient:
    """Speaks PROTOCOL.md to one platform; build with :meth:`open`, close with :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: Path | None = None,
        proxy: ProxySettings | None = None,
        proxy_display: str | None = None,
        request_timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        """Prepare a client for ``base_url`` (``https://host[:port]``); no connection is made yet."""
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"the platform URL must be https://host[:port], not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.hostname
        self.port = parts.port or 443
        self.ca_file = ca_file
        self.proxy = proxy or ProxySettings()
        self.proxy_display = proxy_display
        self._timeouts = {"total_timeout_s": request_timeout_s, "connect_timeout_s": connect_timeout_s}
        self._anonymous: aiohttp.ClientSession | None = None
        self._mutual: aiohttp.ClientSession | None = None
        self._client_cert: tuple[Path, Path] | None = None

    # --- sessions ---

    def use_certificate(self, cert_path: Path | None, key_path: Path | None) -> None:
        """Present this certificate on authenticated calls from now on (None: forget it)."""
        new = (cert_path, key_path) if cert_path is not None and key_path is not None else None
        if new != self._client_cert:
            self._client_cert = new
            old, self._mutual = self._mutual, None
            if old is not None:
                # Closed in the background: the caller may be in a sync context.
                asyncio.get_running_loop().create_task(old.close())

    def _session(self, *, mutual: bool) -> aiohttp.ClientSession:
        if not mutual:
            if self._anonymous is None:
                self._anonymous = platform_session(self._context(None), **self._timeouts)
            return self._anonymous
        if self._client_cert is None:
            raise NotRegistered("no client certificate yet: register first")
        if self._mutual is None:
            self._mutual = platform_session(self._context(self._client_cert), **self._timeouts)
        return self._mutual

    def authenticated_transport(self) -> tuple[aiohttp.ClientSession, dict[str, Any]]:
        """The mTLS session and the options every request on it needs (the PROXY_URL tunnel).

        For streamed downloads (the signatures bundle) that cannot go through
        :meth:`call`'s bounded JSON reading, yet must take the same path.
        """
        return self._session(mutual=True), self.proxy.request_kwargs()

    def _context(self, client_cert: tuple[Path, Path] | None) -> ssl.SSLContext:
        try:
            if client_cert is None:
                return tls_context(self.ca_file)
            return tls_context(self.ca_file, client_cert=client_cert[0], client_key=client_cert[1])
        except (OSError, ssl.SSLError) as exc:
            if client_cert is not None:
                raise PlatformProtocolError(f"the client certificate cannot be loaded: {exc}") from exc
            raise PlatformUnreachable(
                self.host, self.port, f"the CA file {self.ca_file} cannot be loaded ({exc})",
                "point platform.ca_file at a PEM CA bundle",
            ) from exc

    async def aclose(self) -> None:
        """Close every connection."""
        for session in (self._anonymous, self._mutual):
            if session is not None:
                await session.close()
        self._anonymous = self._mutual = None

    async def __aenter__(self) -> PlatformClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the protocol ---

    async def probe(self) -> int:
        """Connect (through the proxy), verify TLS, send ``GET /vsa/v1/``: the HTTP status on success.

        Any HTTP answer means the path works (TCP, proxy, TLS with verification);
        a failure raises :class:`PlatformUnreachable` with the cause and the remedy.
        """
        status, _, _ = await self._request("GET", PROBE_PATH, None, mutual=False, what="connectivity check")
        return status

    async def register(self, request: RegisterRequest) -> RegisterResponse:
        """``POST /vsa/v1/register`` without a client certificate → the typed ``201`` answer."""
        status, body, headers = await self._request("POST", REGISTER_PATH, request.to_json(), mutual=False, what="register")
        if status in (200, 201):
            try:
                return RegisterResponse.parse(body)
            except MessageError as exc:
                raise PlatformProtocolError(f"register: {exc}") from exc
        raise self._refusal(status, body, headers, "register")

    async def poll(self, request: PollRequest) -> PollResponse:
        """``POST /vsa/v1/poll`` with mutual TLS → the typed ``200`` answer."""
        status, body, headers = await self._request("POST", POLL_PATH, request.to_json(), mutual=True, what="poll")
        if status == 200:
            try:
                return PollResponse.parse(body, origin=self.origin)
            except MessageError as exc:
                raise PlatformProtocolError(f"poll: {exc}") from exc
        raise self._refusal(status, body, headers, "poll")

    async def call(self, method: str, path: str, body: Any | None = None, *, what: str | None = None) -> tuple[int, Any]:
        """An authenticated (mTLS) JSON call for the job engine: returns ``(status, decoded body)``.

        Raises :class:`UnknownAppliance` on 401, :class:`PlatformUnavailable` on
        429/5xx and :class:`PlatformUnreachable` on network trouble; other
        statuses are returned for the caller to interpret (200, 404, 409, 410...).
        """
        label = what or f"{method} {path}"
        status, decoded, headers = await self._request(method, path, body, mutual=True, what=label)
        if status == 401 or status == 429 or status >= 500:
            raise self._refusal(status, decoded, headers, label)
        return status, decoded

    # --- plumbing ---

    def _refusal(self, status: int, body: Any, headers: dict[str, str], what: str) -> PlatformRefusal:
        error = ErrorBody.parse(body)
        if status == 403 and error.code == "invalid_perscode":
            return InvalidPerscode(status, error.code, error.message, what)
        if status == 409 and error.code == "perscode_in_use":
            return PerscodeInUse(status, error.code, error.message, what)
        if status == 401:
            return UnknownAppliance(status, error.code, error.message, what)
        if status == 429 or status >= 500:
            return PlatformUnavailable(status, error.code, error.message, what, parse_retry_after(headers.get("Retry-After")))
        return PlatformRejected(status, error.code, error.message, what)

    async def _request(
        self, method: str, path: str, body: Any | None, *, mutual: bool, what: str
    ) -> tuple[int, Any, dict[str, str]]:
        session = self._session(mutual=mutual)
        url = self.base_url + path
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with session.request(
                method, url, data=data, headers=headers, allow_redirects=False, **self.proxy.request_kwargs()
            ) as response:
                try:
                    decoded = await read_json(response)
                except ResponseTooLarge as exc:
                    raise PlatformProtocolError(f"{what}: {exc}") from exc
                except TimeoutError as exc:
                    # The status line came but the body stalled (issue 11: a body dripped a byte a
                    # second). "No answer in time; check the security groups" would send the
                    # operator after the network, which works: say what happened instead.
                    raise PlatformProtocolError(
                        f"{what}: the platform answered {response.status} but the body did not arrive in full "
                        f"within the {self._timeouts['total_timeout_s']:g} s request timeout (a stalled answer)"
                    ) from exc
                except (ValueError, UnicodeDecodeError) as exc:
                    if 200 <= response.status < 300:
                        raise PlatformProtocolError(f"{what}: the answer is not JSON ({exc})") from exc
                    decoded = None  # an error page (a proxy's, a load balancer's): the status says enough
                log.debug("%s %s -> %s", method, path, response.status)
                return response.status, decoded, dict(response.headers)
        except PlatformError:
            raise
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise self.unreachable(exc) from exc

    def unreachable(self, exc: BaseException) -> PlatformUnreachable:
        """Words for a connection failure: the cause and what to do (RUNTIME.md's verdict line)."""
        cause, remedy = describe_connection_failure(
            exc, host=self.host, port=self.port, proxy=self.proxy_display, ca_file=self.ca_file
        )
        return PlatformUnreachable(self.host, self.port, cause, remedy)


def describe_connection_failure(
    exc: BaseException, *, host: str, port: int, proxy: str | None, ca_file: Path | None
) -> tuple[str, str]:
    """(cause, remedy) for a failed connection: DNS, refused, timeout, TLS verify, proxy 407/refused."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        if exc.status == 407:
            return (f"the proxy {proxy} refused the credentials (407 Proxy Authentication Required)",
                    "correct the user name and password in PROXY_URL")
        return (f"the proxy {proxy} refused the connection to the platform ({exc.status} {exc.message})",
                f"allow CONNECT to {host}:{port} on the proxy")
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return (f"cannot connect to the proxy {proxy} ({_os_reason(exc)})",
                "check PROXY_URL's host and port, and that the proxy is running and reachable")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        if getattr(exc.certificate_error, "verify_code", None) in CERT_NAME_MISMATCH_CODES:
            # The chain is trusted; the name is not the one asked for. Pointing at the CA file
            # (the remedy below) would mislead: say which name was asked for (issue 11).
            return (f"the platform's TLS certificate is not valid for the name {host} ({exc.certificate_error})",
                    f"check that platform.url names the host the certificate was issued for ({host} is not "
                    "among its names), or have the certificate reissued with that name")
        if ca_file is None:
            remedy = "set platform.ca_file to the CA that issued it, or check the instance's clock"
        else:
            remedy = f"check that {ca_file} holds the CA that issued the platform's certificate, and the instance's clock"
        return f"the platform's TLS certificate cannot be verified ({exc.certificate_error})", remedy
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"the TLS handshake failed ({exc})", "check that the platform speaks TLS 1.2 or newer on this port"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"the name {host} cannot be resolved", "check platform.url and the VPC's DNS settings (enableDnsSupport)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = _os_reason(exc)
        if "refused" in reason.lower() or getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED:
            return ("the connection was refused",
                    f"check that the platform listens on port {port} and that nothing between rejects it")
        return (f"the connection failed ({reason})",
                "check the route, security groups and network ACLs to the platform, or set PROXY_URL")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return ("no answer in time",
                "check the security groups, network ACLs and routes to the platform, or set PROXY_URL")
    if isinstance(exc, ssl.SSLError):
        return f"the TLS connection failed ({exc.reason or exc})", "check the platform's TLS configuration"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return (f"the connection was dropped ({exc})",
                "check the network path to the platform; a proxy or firewall may be cutting connections")
    return f"the connection failed ({type(exc).__name__}: {exc})", "check the network path to the platform"


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(os_error, socket.gaierror):
        return "name not resolved"
    if os_error is None:
        return str(exc)
    if os_error.errno:
        # aiohttp's own text ("Connect call failed ('10.0.0.1', 443)") says less than the errno does.
        return os.strerror(os_error.errno)
    if isinstance(os_error, ConnectionResetError):
        # A reset during the TLS handshake comes without an errno or text: the verdict read
        # "the connection failed ()" (issue 11, a server that resets the handshake).
        return os.strerror(errno.ECONNRESET)
    return os_error.strerror or str(os_error) or type(os_error).__name__
