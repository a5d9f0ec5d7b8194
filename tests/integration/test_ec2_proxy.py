"""AWS calls go through the EC2 API proxy (Squid, basic auth) and never through PROXY_URL.

Two real Squid processes on 127.0.0.1, each logging every request it passes:
the EC2 API proxy (with basic authentication from an ``openssl passwd -apr1``
file) and a second one standing for the platform proxy PROXY_URL, also put
in HTTP_PROXY/HTTPS_PROXY to prove that the environment cannot leak it into
boto. A control test shows that a plain botocore client would have used it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aioboto3
import pytest
from conftest import require, require_tool

from appliance.aws.ec2 import (
    AwsEndpoints,
    Ec2ApiProxy,
    parse_ec2_selection,
    resolve_ec2_targets,
)
from appliance.lab.moto import (
    LAB_ACCESS_KEY_ID,
    LAB_SECRET_ACCESS_KEY,
    Ec2Seeder,
    MotoServer,
    free_port,
)

SQUID_START_TIMEOUT_S = 20.0
SQUID_LOG_WAIT_S = 3.0
ROLE = "arn:aws:iam::123456789012:role/VsaConnector"
REGION = "us-east-1"
PROXY_USER = "scanner"
# Characters that must be percent-encoded in a proxy URL, on purpose.
PROXY_PASSWORD = "p@ss:w0rd/ec2-proxy"
ENV_PROXY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


@dataclass
class Squid:
    """One Squid process with its own config, logs and password file in a temp dir."""

    directory: Path
    port: int
    proc: subprocess.Popen[bytes]
    seen: int = 0  # log lines that belong to earlier tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def all_lines(self) -> list[str]:
        log = self.directory / "access.log"
        return log.read_text().splitlines() if log.exists() else []

    def mark(self) -> None:
        """Forget what is logged so far (the servers outlive one test)."""
        time.sleep(0.2)  # let a request of the previous test finish its log line
        self.seen = len(self.all_lines())

    def access_lines(self) -> list[str]:
        """The access log's request lines since :meth:`mark` (not the readiness probe's)."""
        return [line for line in self.all_lines()[self.seen :] if "HIER_NONE/- -" not in line
                or "TCP_DENIED" in line]

    def wait_for_lines(self, count: int) -> list[str]:
        deadline = time.monotonic() + SQUID_LOG_WAIT_S
        while time.monotonic() < deadline and len(self.access_lines()) < count:
            time.sleep(0.05)
        return self.access_lines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_squid(squid: str, *, auth: tuple[str, str] | None) -> Squid:
    """Start Squid on a free 127.0.0.1 port; with ``auth`` it demands basic authentication."""
    # Squid drops to the `proxy` user: the directory must be reachable and writable by it,
    # so not under pytest's private tmp_path.
    directory = Path(tempfile.mkdtemp(prefix="vsa-squid-"))
    directory.chmod(0o755)
    port = free_port()
    lines = [
        f"http_port 127.0.0.1:{port}",
        f"pid_filename {directory}/squid.pid",
        "cache_effective_user proxy",
        f"access_log stdio:{directory}/access.log",
        f"cache_log {directory}/cache.log",
        "cache_store_log none",
        "cache deny all",
        f"coredump_dir {directory}",
        "shutdown_lifetime 0 seconds",
    ]
    if auth is not None:
        hashed = subprocess.run(
            ["openssl", "passwd", "-apr1", auth[1]], capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout.strip()
        (directory / "passwd").write_text(f"{auth[0]}:{hashed}\n")
        (directory / "passwd").chmod(0o644)
        lines += [
            f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {directory}/passwd",
            "auth_param basic realm vsa-lab",
            "acl authed proxy_auth REQUIRED",
            "http_access allow authed",
        ]
    else:
        lines += ["http_access allow localhost"]
    lines += ["http_access deny all"]
    (directory / "squid.conf").write_text("\n".join(lines) + "\n")
    shutil.chown(directory, user="proxy")
    proc = subprocess.Popen(
        [squid, "-N", "-f", str(directory / "squid.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = Squid(directory, port, proc)
    deadline = time.monotonic() + SQUID_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (directory / "cache.log").read_text() if (directory / "cache.log").exists() else ""
            server.stop()
            raise RuntimeError(f"squid exited ({proc.returncode}): {log[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError("squid did not listen in time")


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[MotoServer, list[str]]]:
    server = MotoServer().start()
    try:
        seed = Ec2Seeder(server)
        vpc = seed.vpc(REGION, "10.9.0.0/16")
        ids = seed.launch(seed.subnet(REGION, vpc, "10.9.0.0/24"), count=3)
        yield server, ids
    finally:
        server.stop()


@pytest.fixture(scope="module")
def squid_servers() -> Iterator[tuple[Squid, Squid]]:
    """(the EC2 API proxy with basic auth, the platform proxy standing for PROXY_URL)."""
    squid = require_tool("squid")
    require(os.geteuid() == 0, "Squid drops to the proxy user: the test runs as root")
    ec2_proxy = start_squid(squid, auth=(PROXY_USER, PROXY_PASSWORD))
    try:
        platform_proxy = start_squid(squid, auth=None)
    except Exception:
        ec2_proxy.stop()
        raise
    try:
        yield ec2_proxy, platform_proxy
    finally:
        ec2_proxy.stop()
        platform_proxy.stop()


@pytest.fixture
def squids(squid_servers: tuple[Squid, Squid]) -> tuple[Squid, Squid]:
    """The module's two Squids, their logs marked at the start of the test."""
    for server in squid_servers:
        server.mark()
    return squid_servers


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch, squids: tuple[Squid, Squid]) -> None:
    """The platform proxy in every environment variable boto could read."""
    for name in ENV_PROXY_NAMES:
        monkeypatch.setenv(name, squids[1].url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def lab_session() -> aioboto3.Session:
    return aioboto3.Session(
        aws_access_key_id=LAB_ACCESS_KEY_ID, aws_secret_access_key=LAB_SECRET_ACCESS_KEY
    )


SELECTION = parse_ec2_selection({"role_arn": ROLE, "regions": [REGION]})


async def test_aws_calls_use_the_ec2_api_proxy_and_never_proxy_url(
    moto: tuple[MotoServer, list[str]], squids: tuple[Squid, Squid], proxy_env: None
) -> None:
    server, ids = moto
    ec2_proxy, platform_proxy = squids
    proxy = Ec2ApiProxy(url=ec2_proxy.url, username=PROXY_USER, password=PROXY_PASSWORD)
    assert SELECTION is not None
    res = await resolve_ec2_targets(
        SELECTION, endpoints=AwsEndpoints(sts=server.url, ec2=server.url), proxy=proxy,
        session=lab_session(),
    )
    assert res.ok, res.message
    assert {t.instance_id for t in res.targets} == set(ids)

    lines = ec2_proxy.wait_for_lines(res.api_calls)
    # Every AWS call (AssumeRole, then DescribeInstances) passed the EC2 API proxy,
    # authenticated as its user, to moto.
    assert len(lines) == res.api_calls == 2
    for line in lines:
        assert f"POST {server.url}/ {PROXY_USER} " in line and "TCP_MISS/200" in line
    assert platform_proxy.access_lines() == []


async def test_direct_when_no_ec2_api_proxy_even_with_env_proxies(
    moto: tuple[MotoServer, list[str]], squids: tuple[Squid, Squid], proxy_env: None
) -> None:
    server, ids = moto
    ec2_proxy, platform_proxy = squids
    assert SELECTION is not None
    res = await resolve_ec2_targets(
        SELECTION, endpoints=AwsEndpoints(sts=server.url, ec2=server.url), session=lab_session()
    )
    assert res.ok and {t.instance_id for t in res.targets} == set(ids)
    await asyncio.sleep(0.5)  # give a (wrongly) proxied request time to reach the log
    assert platform_proxy.access_lines() == [] and ec2_proxy.access_lines() == []


async def test_control_a_plain_client_would_leak_to_the_env_proxy(
    moto: tuple[MotoServer, list[str]], squids: tuple[Squid, Squid], proxy_env: None
) -> None:
    # Without the explicit empty proxies mapping, botocore reads HTTP_PROXY: the test above
    # would catch such a leak.
    server, _ = moto
    async with lab_session().client("ec2", region_name=REGION, endpoint_url=server.url) as ec2:
        await ec2.describe_instances()
    lines = squids[1].wait_for_lines(1)
    assert len(lines) == 1 and f"POST {server.url}/" in lines[0]


async def test_wrong_proxy_password_is_named(
    moto: tuple[MotoServer, list[str]], squids: tuple[Squid, Squid]
) -> None:
    server, _ = moto
    ec2_proxy, _ = squids
    wrong = "not-the-password"
    proxy = Ec2ApiProxy(url=ec2_proxy.url, username=PROXY_USER, password=wrong)
    assert SELECTION is not None
    res = await resolve_ec2_targets(
        SELECTION, endpoints=AwsEndpoints(sts=server.url, ec2=server.url), proxy=proxy,
        session=lab_session(), max_attempts=1,
    )
    (failure,) = res.failures
    assert failure.kind == "proxy_denied"
    assert ec2_proxy.url in failure.message and "407" in failure.message
    assert wrong not in (res.message or "")
    assert "TCP_DENIED/407" in ec2_proxy.wait_for_lines(1)[0]


@pytest.fixture
def imds_only_credentials(
    monkeypatch: pytest.MonkeyPatch, moto: tuple[MotoServer, list[str]], tmp_path: Path
) -> str:
    """botocore's default chain with nothing but IMDS to find (moto serves instance credentials)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_EC2_METADATA_DISABLED", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto[0].url + "/")
    return moto[0].url


async def test_instance_profile_credentials_from_imds_never_proxied(
    moto: tuple[MotoServer, list[str]], squids: tuple[Squid, Squid], proxy_env: None,
    imds_only_credentials: str,
) -> None:
    server, ids = moto
    ec2_proxy, platform_proxy = squids
    own = parse_ec2_selection({"role_arn": None, "regions": [REGION]})
    assert own is not None
    proxy = Ec2ApiProxy(url=ec2_proxy.url, username=PROXY_USER, password=PROXY_PASSWORD)
    res = await resolve_ec2_targets(
        own, endpoints=AwsEndpoints(sts=server.url, ec2=server.url), proxy=proxy
    )
    assert res.ok, res.message
    assert {t.instance_id for t in res.targets} == set(ids)
    # EC2 through the EC2 API proxy; the metadata service (token, role, credentials) direct.
    lines = ec2_proxy.wait_for_lines(1)
    assert len(lines) == res.api_calls == 1 and "POST" in lines[0]
    await asyncio.sleep(0.5)
    assert platform_proxy.access_lines() == []
    assert not any("latest" in line for line in ec2_proxy.access_lines())


async def test_control_botocore_imds_fetcher_follows_env_proxy(
    moto: tuple[MotoServer, list[str]], squids: tuple[Squid, Squid], proxy_env: None,
    imds_only_credentials: str,
) -> None:
    # What the replacement fetcher prevents: a stock session fetches IMDS through HTTP_PROXY.
    credentials = await aioboto3.Session().get_credentials()
    assert credentials is not None
    lines = squids[1].wait_for_lines(2)
    assert any("/latest/api/token" in line for line in lines)
