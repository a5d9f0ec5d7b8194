"""HTTPS to the platform: TLS contexts, the PROXY_URL tunnel, bounded responses.

Every connection to the platform is made here so that the contract's transport
rules (PROTOCOL.md, Transport) hold in one place:
- the server certificate is always verified, against ``platform.ca_file`` or the
  system trust store; there is no switch that turns verification off;
- TLS 1.2 or newer;
- through the HTTP CONNECT proxy of ``PROXY_URL`` when set (basic authentication,
  ``DOMAIN\\user`` as the login when a domain is given), never through the
  environment's proxy variables (``trust_env=False``): AWS and IMDS traffic must
  never take the platform's proxy, nor the platform take another;
- JSON responses are bounded (4 MiB).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from appliance import __version__
from appliance.console import register_secret
from appliance.userdata import ProxySpec

USER_AGENT = f"vsa/{__version__}"
MAX_JSON_RESPONSE_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0


class ResponseTooLarge(Exception):
    """A response body exceeded its size limit."""


def tls_context(
    ca_file: Path | None = None,
    *,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    """A verifying TLS 1.2+ client context, optionally presenting a client certificate."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return context


@dataclass(frozen=True)
class ProxySettings:
    """What aiohttp needs to tunnel through PROXY_URL."""

    url: str | None = None
    auth: aiohttp.BasicAuth | None = None

    @classmethod
    def from_spec(cls, spec: ProxySpec | None) -> ProxySettings:
        """Proxy settings from user-data's PROXY_URL (None: connect directly)."""
        if spec is None:
            return cls()
        auth = None
        if spec.login is not None:
            register_secret(spec.password)
            auth = aiohttp.BasicAuth(spec.login, spec.password or "")
        return cls(url=spec.url, auth=auth)

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``session.request`` (proxy and proxy_auth)."""
        if self.url is None:
            return {}
        return {"proxy": self.url, "proxy_auth": self.auth}


def platform_session(
    ssl_context: ssl.SSLContext,
    *,
    total_timeout_s: float = REQUEST_TIMEOUT_S,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> aiohttp.ClientSession:
    """An aiohttp session for the platform: verified TLS, no environment proxies."""
    connector = aiohttp.TCPConnector(ssl=ssl_context, limit=16)
    timeout = aiohttp.ClientTimeout(total=total_timeout_s, sock_connect=connect_timeout_s)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )


async def read_bounded(
    response: aiohttp.ClientResponse, limit: int = MAX_JSON_RESPONSE_BYTES
) -> bytes:
    """Read a response body, refusing more than ``limit`` bytes (declared or streamed)."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise ResponseTooLarge(f"the response declares {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise ResponseTooLarge(f"the response exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(response: aiohttp.ClientResponse, limit: int = MAX_JSON_RESPONSE_BYTES) -> Any:
    """Read and decode a bounded JSON body (ValueError when it is not JSON)."""
    return decode_json(await read_bounded(response, limit))


def decode_json(body: bytes) -> Any:
    """Decode a JSON body (None when empty); ValueError when it is not JSON or nests too deeply."""
    if not body:
        return None
    try:
        return json.loads(body.decode("utf-8"))
    except RecursionError:
        # json's decoder recurses per nesting level: 4 MiB of "[" would escape as RecursionError.
        raise ValueError("the JSON nests too deeply") from None
