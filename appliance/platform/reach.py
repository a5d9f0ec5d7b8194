"""Is the platform reachable? One HTTPS request, and a verdict an operator can act on.

Used by ``vsa doctor`` and by the daemon at boot for the console's connectivity
line (RUNTIME.md): ``reachable``, or
``unable to connect to HOST:PORT - please fix: <cause and remedy>``.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

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
    except aiohttp.ClientHttpProxyError as exc:
        if exc.status == 407:
            return failed(
                f"the proxy {shown_proxy} refused the credentials (407 Proxy Authentication Required)",
                "correct the user name and password in PROXY_URL",
            )
        return failed(
            f"the proxy {shown_proxy} refused the connection to the platform ({exc.status} {exc.message})",
            f"allow CONNECT to {host}:{port} on the proxy",
        )
    except aiohttp.ClientProxyConnectionError as exc:
        return failed(
            f"cannot connect to the proxy {shown_proxy} ({_os_reason(exc)})",
            "check PROXY_URL's host and port, and that the proxy is running and reachable",
        )
    except aiohttp.ClientConnectorCertificateError as exc:
        return failed(
            f"the platform's TLS certificate cannot be verified ({exc.certificate_error})",
            "set platform.ca_file to the CA that issued it, or check the instance's clock"
            if ca_file is None
            else f"check that {ca_file} holds the CA that issued the platform's certificate and the instance's clock",
        )
    except aiohttp.ClientConnectorSSLError as exc:
        return failed(
            f"the TLS handshake failed ({exc})",
            "check that the platform speaks TLS 1.2 or newer on this port",
        )
    except aiohttp.ClientConnectorDNSError:
        return failed(
            f"the name {host} cannot be resolved",
            "check platform.url and the VPC's DNS settings (enableDnsSupport)",
        )
    except aiohttp.ClientConnectorError as exc:
        reason = _os_reason(exc)
        if (
            getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED
            or "refused" in reason.lower()
        ):
            return failed(
                "the connection was refused",
                f"check that the platform listens on port {port} and that nothing between rejects it",
            )
        return failed(
            f"the connection failed ({reason})",
            "check the route, security groups and network ACLs to the platform, or set PROXY_URL",
        )
    except (TimeoutError, aiohttp.ServerTimeoutError):
        return failed(
            f"no answer within {timeout_s:g} s",
            "check the security groups, network ACLs and routes to the platform, or set PROXY_URL",
        )
    except ssl.SSLError as exc:
        return failed(
            f"the TLS handshake failed ({exc.reason or exc})",
            "check the platform's TLS configuration",
        )
    except aiohttp.ClientError as exc:
        return failed(
            f"the connection failed ({type(exc).__name__}: {exc})",
            "check the network path to the platform",
        )


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(os_error, socket.gaierror):
        return "name not resolved"
    return os_error.strerror or str(os_error) if os_error else str(exc)
