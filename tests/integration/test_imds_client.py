"""The IMDS client against the lab emulator, in every mode (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest

from appliance.aws.imds import (
    ImdsClient,
    ImdsDisabledError,
    ImdsHopLimitError,
    ImdsUnreachableError,
    InstanceFacts,
)
from appliance.console import redact
from appliance.errors import ImdsError
from appliance.lab.imds import (
    EmulatorConfig,
    ImdsEmulator,
    InstanceProfile,
    NetworkInterface,
)

TOKEN_PATH = "/latest/api/token"


@dataclass
class FakeClock:
    """A clock both the client and the emulator read, moved by the test."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def running(
    config: EmulatorConfig | None = None, **client_options: object
) -> AsyncIterator[tuple[ImdsEmulator, ImdsClient]]:
    """An emulator on 127.0.0.1 and a client pointed at it."""
    emulator = ImdsEmulator(config)
    async with emulator.serve() as url:
        client = ImdsClient(endpoint=url, **client_options)  # type: ignore[arg-type]
        try:
            yield emulator, client
        finally:
            await client.aclose()


def gets(emulator: ImdsEmulator) -> list[str]:
    """How each logged GET presented a token."""
    return [r.token for r in emulator.requests if r.method == "GET"]


async def test_v2_token_is_fetched_once_and_reused() -> None:
    async with running(EmulatorConfig(mode="v2-optional")) as (emulator, client):
        assert await client.probe() == "v2"
        for _ in range(10):
            assert await client.get_text("meta-data/instance-id") == "i-0abc1234def567890"
        await client.instance_facts()
        assert emulator.count("PUT", TOKEN_PATH) == 1
        # v2 works, so v1 (a GET without a token) is never used.
        assert gets(emulator) and set(gets(emulator)) == {"valid"}
        assert client.version == "v2"


async def test_v2_required() -> None:
    async with running(EmulatorConfig(mode="v2-required")) as (emulator, client):
        assert await client.probe() == "v2"
        assert await client.get_text("meta-data/placement/region") == "us-east-1"
        assert emulator.count(status=401) == 0
        assert set(gets(emulator)) == {"valid"}


async def test_token_expiring_mid_run_is_fetched_again() -> None:
    async with running(EmulatorConfig(mode="v2-required")) as (emulator, client):
        assert await client.get_text("meta-data/instance-id") == "i-0abc1234def567890"
        # The emulator's clock jumps past the TTL; the client's does not, so it
        # still believes its token and learns otherwise from a 401.
        emulator.advance_clock(21600 + 1)
        assert await client.get_text("meta-data/instance-type") == "c5.xlarge"
        assert emulator.count("PUT", TOKEN_PATH) == 2
        assert emulator.count("GET", "/latest/meta-data/instance-type", status=401) == 1
        assert emulator.count("GET", "/latest/meta-data/instance-type", status=200) == 1
        # A revoked token (e.g. the service restarted) is handled the same way.
        emulator.expire_tokens()
        assert await client.user_data() is None
        assert emulator.count("PUT", TOKEN_PATH) == 3


async def test_token_is_refreshed_before_it_expires() -> None:
    clock = FakeClock()
    config = EmulatorConfig(mode="v2-required", max_token_ttl_s=10, clock=clock)
    async with running(config, clock=clock) as (emulator, client):
        await client.get_text("meta-data/instance-id")
        clock.now += 5  # half-way: the token is still good
        await client.get_text("meta-data/instance-id")
        assert emulator.count("PUT", TOKEN_PATH) == 1
        clock.now += 4.5  # 0.5 s left, inside the refresh margin: replaced before use
        await client.get_text("meta-data/instance-id")
        assert emulator.count("PUT", TOKEN_PATH) == 2
        assert emulator.count(status=401) == 0


@pytest.mark.parametrize("status", [404, 405])
async def test_v1_only_when_the_token_call_is_absent(status: int) -> None:
    config = EmulatorConfig(mode="v1-only", v1_only_status=status, user_data=b"PERSCODE=abcdefgh12")
    async with running(config) as (emulator, client):
        assert await client.probe() == "v1"
        assert client.version_reason is not None and str(status) in client.version_reason
        assert await client.user_data() == b"PERSCODE=abcdefgh12"
        await client.get_text("meta-data/instance-id")
        assert emulator.count("PUT", TOKEN_PATH) == 1  # asked once, not on every call
        assert set(gets(emulator)) == {"none"}


async def test_v1_service_that_starts_requiring_tokens_is_followed() -> None:
    async with running(EmulatorConfig(mode="v1-only")) as (emulator, client):
        assert await client.probe() == "v1"
        emulator.mode = "v2-required"  # the operator set HttpTokens=required
        assert await client.get_text("meta-data/instance-id") == "i-0abc1234def567890"
        assert client.version == "v2"


async def test_disabled_names_the_setting_without_a_retry_storm() -> None:
    async with running(EmulatorConfig(mode="disabled")) as (emulator, client):
        started = time.monotonic()
        with pytest.raises(ImdsDisabledError) as caught:
            await client.probe()
        assert "HttpEndpoint=enabled" in str(caught.value)
        assert "HttpEndpoint=enabled" in caught.value.fix
        assert isinstance(caught.value, ImdsError)
        assert len(emulator.requests) == 1
        assert time.monotonic() - started < 1.0
        with pytest.raises(ImdsDisabledError):
            await client.user_data()
        assert len(emulator.requests) == 2


async def test_hop_limit_is_diagnosed_within_a_few_seconds() -> None:
    # Default timeouts and attempts: what the daemon will do on a real instance.
    async with running(EmulatorConfig(mode="hop-limit")) as (emulator, client):
        started = time.monotonic()
        with pytest.raises(ImdsHopLimitError) as caught:
            await client.probe()
        elapsed = time.monotonic() - started
        assert "HttpPutResponseHopLimit" in str(caught.value)
        assert elapsed < 6.0, elapsed
        assert emulator.count("PUT", TOKEN_PATH, status=0) == 3  # never answered
        assert emulator.count("GET", status=401) == 1
        assert client.version is None


async def test_token_timeout_with_working_v1_falls_back_and_says_so() -> None:
    async with running(EmulatorConfig(mode="hop-limit-optional"), timeout_s=0.3) as (
        emulator,
        client,
    ):
        assert await client.probe() == "v1"
        assert client.version_reason is not None and "timed out" in client.version_reason
        assert await client.get_text("meta-data/instance-id") == "i-0abc1234def567890"


async def test_user_data_missing_is_none() -> None:
    async with running(EmulatorConfig(mode="v2-required")) as (_emulator, client):
        assert await client.user_data() is None
        assert await client.get_text("meta-data/no-such-thing") is None


async def test_user_data_bytes_pass_through_exactly() -> None:
    raw = gzip.compress(
        b"PERSCODE=abcdefgh12\r\nPROXY_URL=u:p@x@10.0.0.1:3128\n" + bytes(range(256))
    )
    async with running(EmulatorConfig(mode="v2-required", user_data=raw)) as (_emulator, client):
        assert await client.user_data() == raw


async def test_503_honours_retry_after() -> None:
    async with running(EmulatorConfig(mode="v2-required")) as (emulator, client):
        await client.probe()
        emulator.fail_next(1, status=503, retry_after="1")
        started = time.monotonic()
        assert await client.get_text("meta-data/instance-id") == "i-0abc1234def567890"
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 3.0, elapsed
        assert emulator.count(status=503) == 1


async def test_retry_after_is_bounded_and_attempts_are_capped() -> None:
    options = {"max_retry_after_s": 0.2, "attempts": 3}
    async with running(EmulatorConfig(mode="v2-required"), **options) as (emulator, client):
        await client.probe()
        emulator.fail_next(100, status=503, retry_after="3600")
        started = time.monotonic()
        with pytest.raises(ImdsUnreachableError) as caught:
            await client.get_text("meta-data/instance-id")
        assert time.monotonic() - started < 2.0
        assert emulator.count(status=503) == 3
        assert "503" in str(caught.value)


async def test_imds_not_listening_is_an_error_value_after_bounded_retries() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ImdsClient(endpoint=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        with pytest.raises(ImdsUnreachableError) as caught:
            await client.probe()
    finally:
        await client.aclose()
    assert time.monotonic() - started < 3.0
    assert "3 attempts" in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)


async def test_instance_facts_and_addresses() -> None:
    profile = InstanceProfile(
        instance_id="i-0fedcba9876543210",
        region="eu-central-1",
        availability_zone="eu-central-1b",
        interfaces=(
            NetworkInterface(
                mac="0e:00:00:00:00:01",
                local_ipv4s=("10.1.0.10", "10.1.0.11"),
                vpc_id="vpc-1",
                subnet_id="subnet-1",
            ),
            NetworkInterface(
                mac="0e:00:00:00:00:02",
                local_ipv4s=("10.1.1.20", "10.1.0.10"),
                vpc_id="vpc-1",
                subnet_id="subnet-2",
                device_number=1,
            ),
        ),
    )
    async with running(EmulatorConfig(mode="v2-required", profile=profile)) as (emulator, client):
        facts = await client.instance_facts()
        assert facts == InstanceFacts(
            instance_id="i-0fedcba9876543210",
            region="eu-central-1",
            account_id="111122223333",
            availability_zone="eu-central-1b",
            image_id="ami-0123456789abcdef0",
            instance_type="c5.xlarge",
            private_ip="10.1.0.10",
            mac="0e:00:00:00:00:01",
            vpc_id="vpc-1",
            subnet_id="subnet-1",
        )
        assert await client.local_ipv4s() == ["10.1.0.10", "10.1.0.11", "10.1.1.20"]
        raw, parsed = await client.identity_document()
        assert parsed["instanceId"] == "i-0fedcba9876543210"
        assert '"instanceId" : "i-0fedcba9876543210"' in raw  # the raw text, untouched
        pkcs7 = await client.identity_pkcs7()
        assert pkcs7 is not None and pkcs7.startswith("MI")


async def test_no_pkcs7_is_none() -> None:
    async with running(EmulatorConfig(pkcs7=False)) as (_emulator, client):
        assert await client.identity_pkcs7() is None


async def test_proxy_environment_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with running(EmulatorConfig(mode="v2-required")) as (_emulator, client):
        assert await client.probe() == "v2"


async def test_a_given_session_is_used_and_left_open() -> None:
    emulator = ImdsEmulator()
    async with emulator.serve() as url, aiohttp.ClientSession(trust_env=False) as session:
        async with ImdsClient(endpoint=url, session=session) as client:
            assert await client.probe() == "v2"
        assert not session.closed


async def test_token_never_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    config = EmulatorConfig(mode="v2-required", max_token_ttl_s=10, clock=clock)
    async with running(config, clock=clock) as (emulator, client):
        await client.instance_facts()
        clock.now += 9.5  # proactive refresh
        await client.get_text("meta-data/instance-id")
        emulator.expire_tokens()  # refetch on 401
        await client.user_data()
        emulator.mode = "disabled"
        with pytest.raises(ImdsDisabledError):
            await client.get_text("meta-data/instance-id")
    assert len(emulator.tokens_issued) == 3
    assert caplog.records, "the client logs its calls"
    everything = caplog.text + "".join(str(r.args) for r in caplog.records)
    for token in emulator.tokens_issued:
        assert token not in everything
        assert redact(f"x {token} y") == "x *** y"  # registered as a secret


async def test_concurrent_first_calls_share_one_token() -> None:
    async with running(EmulatorConfig(mode="v2-required")) as (emulator, client):
        paths = ["meta-data/instance-id", "meta-data/mac", "meta-data/ami-id"] * 7
        answers = await asyncio.gather(*(client.get_text(p) for p in paths))
        assert all(answers)
        assert emulator.count("PUT", TOKEN_PATH) == 1
        emulator.expire_tokens()
        await asyncio.gather(*(client.get_text(p) for p in paths))
        # Each 401 drops only the token it used: one refetch at a time, not one per call.
        assert emulator.count("PUT", TOKEN_PATH) == 2
