"""`vsa doctor` reaches a TLS server through a real Squid with basic authentication.

The proxy password is a unique canary: it must appear nowhere in the output.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from conftest import require

from appliance.lab.squid import Squid, free_port, squid_available

CANARY_PASSWORD = "Canary-pw@7:x91"  # contains '@' and ':' on purpose
PERSCODE = "DOCTOR-perscode-0042"


class TlsServer:
    """A minimal HTTPS server on 127.0.0.1 standing for the platform."""

    def __init__(self, cert_dir: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = cert_dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        app = web.Application()

        async def not_found(request: web.Request) -> web.Response:
            return web.json_response(
                {"error": "not_found", "message": "no such endpoint"}, status=404
            )

        app.router.add_get("/vsa/v1/", not_found)
        context = self.server_cert.configure_cert  # bound method, applied below

        async def serve() -> None:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context(ssl_context)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=ssl_context).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def platform_tls(tmp_path: Path) -> Iterator[TlsServer]:
    server = TlsServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def squid() -> Iterator[Squid]:
    reason = squid_available()
    require(reason is None, reason or "")
    with Squid(users={"jdoe": CANARY_PASSWORD, "CORP\\jdoe": CANARY_PASSWORD}) as proxy:
        yield proxy


def run_doctor(
    tmp_path: Path, server: TlsServer, proxy_url: str
) -> subprocess.CompletedProcess[str]:
    user_data = tmp_path / "user-data"
    user_data.write_text(f"PERSCODE={PERSCODE}\nPROXY_URL={proxy_url}\n")
    closed = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VSA_", "AWS_"))},
        "VSA_CONFIG": str(tmp_path / "none.toml"),
        "VSA_PLATFORM_URL": f"https://127.0.0.1:{server.port}",
        "VSA_PLATFORM_CA_FILE": str(server.ca_file),
        "AWS_EC2_METADATA_DISABLED": "true",
        # AWS endpoints are only reported; point them at a closed local port (no outside traffic).
        "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{closed}",
        "AWS_ENDPOINT_URL_EC2": f"http://127.0.0.1:{closed}",
    }
    (tmp_path / "none.toml").write_text("")
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "doctor", "--user-data", str(user_data)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("login", ["jdoe", r"CORP\jdoe"])
def test_doctor_reaches_platform_through_squid(
    tmp_path: Path, platform_tls: TlsServer, squid: Squid, login: str
) -> None:
    result = run_doctor(tmp_path, platform_tls, f"{login}:{CANARY_PASSWORD}@127.0.0.1:{squid.port}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"reachable through the proxy {login}:***@127.0.0.1:{squid.port}" in output
    assert "PERSCODE found (ending in 0042)" in output
    assert CANARY_PASSWORD not in output
    assert PERSCODE not in output
    # The request really went through Squid, as the authenticated user, by CONNECT.
    log = squid.access_log_text()
    assert f"CONNECT 127.0.0.1:{platform_tls.port}" in log
    assert "jdoe" in log


def test_doctor_wrong_proxy_password_is_a_clear_failure(
    tmp_path: Path, platform_tls: TlsServer, squid: Squid
) -> None:
    wrong = "Wrong-canary-pw:55"
    result = run_doctor(tmp_path, platform_tls, f"jdoe:{wrong}@127.0.0.1:{squid.port}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"unable to connect to 127.0.0.1:{platform_tls.port} - please fix:" in output
    assert "refused the credentials (407" in output
    assert "correct the user name and password in PROXY_URL" in output
    assert wrong not in output and CANARY_PASSWORD not in output


def test_doctor_untrusted_certificate(
    tmp_path: Path, platform_tls: TlsServer, squid: Squid
) -> None:
    other_ca = trustme.CA()
    platform_tls.ca_file.write_bytes(other_ca.cert_pem.bytes())
    result = run_doctor(tmp_path, platform_tls, f"jdoe:{CANARY_PASSWORD}@127.0.0.1:{squid.port}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "certificate cannot be verified" in output
    assert CANARY_PASSWORD not in output


def test_doctor_proxy_not_listening(tmp_path: Path, platform_tls: TlsServer) -> None:
    port = free_port()
    result = run_doctor(tmp_path, platform_tls, f"jdoe:{CANARY_PASSWORD}@127.0.0.1:{port}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot connect to the proxy jdoe:***@127.0.0.1:{port}" in output
    assert CANARY_PASSWORD not in output
