"""Is the platform reachable? One HTTPS request, and a verdict an operator can act on.

Used by ``vsa doctor`` and by the daemon at boot for the console's connectivity
line (RUNTIME.md): ``reachable``, or
``unable to connect to HOST:PORT - please fix: <cause and remedy>``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from appliance.platform.client import describe_connection_failure
from appliance.platform.http import ProxySettings, platform_session, tls_context
from appliance.userdata import ProxySpec

REACH_TIMEOUT_S = 15.0
REACH_PATH = "/vsa/v1/"


@dataclass(frozen=True)
class Reachability:
    """The verdict of one reachability check."""

    ok: bool
    host: str
    port: int
    via_proxy: str | None  # the proxy as shown to an operator (password masked)
    cause: str | None = None
    remedy: str | None = None
    http_status: int | None = None

    @property
    def verdict(self) -> str:
        """The console's words: ``reachable`` or ``unable to connect to ... - please fix: ...``."""
        if self.ok:
            via = f" through the proxy {self.via_proxy}" if self.via_proxy else ""
            return f"reachable{via}"
        return f"unable to connect to {self.host}:{self.port} - please fix: {self.cause}; {self.remedy}"


async def check_platform(
    platform_url: str,
    *,
    ca_file: Path | None,
    proxy: ProxySpec | None,
    timeout_s: float = REACH_TIMEOUT_S,
) -> Reachability:
    """Connect to the platform (through the proxy when set) and complete a TLS handshake.

    Any HTTP answer counts as reachable: the question is whether TCP, the proxy
    and TLS (with certificate verification) work, not what the platform says.
    """
    parts = urlsplit(platform_url)
    host, port = parts.hostname or "", parts.port or 443
    shown_proxy = proxy.display() if proxy else None

    def failed(cause: str, remedy: str) -> Reachability:
        return Reachability(False, host, port, shown_proxy, cause, remedy)

    try:
        context = tls_context(ca_file)
    except (OSError, ssl.SSLError) as exc:
        return failed(
            f"the CA file {ca_file} cannot be loaded ({exc})",
            "point platform.ca_file at a PEM CA bundle",
        )
    settings = ProxySettings.from_spec(proxy)
    try:
        async with platform_session(
            context, total_timeout_s=timeout_s, connect_timeout_s=timeout_s
        ) as session:
            async with session.get(
                platform_url + REACH_PATH, allow_redirects=False, **settings.request_kwargs()
            ) as response:
                return Reachability(True, host, port, shown_proxy, http_status=response.status)
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        cause, remedy = describe_connection_failure(
            exc, host=host, port=port, proxy=shown_proxy, ca_file=ca_file
        )
        return failed(cause, remedy)
