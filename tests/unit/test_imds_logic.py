"""IMDS client: the pure pieces (retry policy, Retry-After, listings, facts) and its construction."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.aws.imds import (
    TOKEN_REFRESH_MARGIN_S,
    ImdsClient,
    ImdsDisabledError,
    ImdsHopLimitError,
    ImdsResponseError,
    ImdsUnreachableError,
    InstanceFacts,
    RetryPolicy,
    facts_from_document,
    parse_listing,
    parse_retry_after,
    token_refresh_margin_s,
)
from appliance.config import DEFAULT_IMDS_ENDPOINT, Config
from appliance.errors import ImdsError

# PROTOCOL.md, POST /vsa/v1/register: the "instance" object, in order.
PROTOCOL_INSTANCE_FIELDS = [
    "instance_id",
    "region",
    "account_id",
    "availability_zone",
    "image_id",
    "instance_type",
    "private_ip",
    "mac",
    "vpc_id",
    "subnet_id",
]


def test_instance_facts_are_exactly_the_protocol_fields() -> None:
    assert [f.name for f in dataclasses.fields(InstanceFacts)] == PROTOCOL_INSTANCE_FIELDS
    facts = InstanceFacts(*([None] * len(PROTOCOL_INSTANCE_FIELDS)))
    assert facts.to_json() == dict.fromkeys(PROTOCOL_INSTANCE_FIELDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.region = "x"  # type: ignore[misc]


def test_facts_from_document_takes_strings_only() -> None:
    facts = facts_from_document(
        {
            "instanceId": "i-1",
            "region": "eu-west-1",
            "accountId": "123456789012",
            "availabilityZone": "eu-west-1b",
            "imageId": "ami-1",
            "instanceType": "t3.micro",
            "privateIp": "",
            "kernelId": None,
        }
    )
    assert facts["instance_id"] == "i-1"
    assert facts["availability_zone"] == "eu-west-1b"
    assert facts["private_ip"] is None  # empty is not a fact
    assert facts_from_document({"region": 5})["region"] is None


def test_parse_listing_strips_directory_slashes() -> None:
    assert parse_listing("ami-id\nplacement/\n\nnetwork/\r\n") == ["ami-id", "placement", "network"]
    assert parse_listing("") == []


def test_retry_after_forms() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now) == pytest.approx(30.0)
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier, now=now) == 0.0


def test_retry_policy_honours_retry_after_within_its_bound() -> None:
    policy = RetryPolicy(attempts=3, base_delay_s=0.2, max_delay_s=2.0, max_retry_after_s=5.0)
    assert policy.delay_s(1, "1") == 1.0
    assert policy.delay_s(1, "3600") == 5.0  # clamped: IMDS is local
    # Without Retry-After: exponential, equal jitter (between half and all of the ceiling).
    assert policy.delay_s(1, None, jitter=0.0) == pytest.approx(0.1)
    assert policy.delay_s(1, None, jitter=1.0) == pytest.approx(0.2)
    assert policy.delay_s(2, None, jitter=1.0) == pytest.approx(0.4)
    assert policy.delay_s(10, None, jitter=1.0) == pytest.approx(2.0)  # capped


@given(
    attempt=st.integers(min_value=1, max_value=50),
    jitter=st.floats(min_value=-1, max_value=2, allow_nan=False),
)
def test_retry_delay_is_bounded(attempt: int, jitter: float) -> None:
    policy = RetryPolicy()
    delay = policy.delay_s(attempt, None, jitter)
    assert 0 < delay <= policy.max_delay_s


def test_worst_case_is_computable_and_short() -> None:
    # Defaults: 3 attempts of 1 s; the worst case (Retry-After at its cap) stays under 15 s.
    assert RetryPolicy().worst_case_s(1.0) <= 15.0


def test_refresh_margin_scales_with_short_tokens() -> None:
    assert token_refresh_margin_s(21600) == TOKEN_REFRESH_MARGIN_S
    assert token_refresh_margin_s(10) == pytest.approx(1.0)


def test_errors_are_imds_errors_with_operator_words() -> None:
    disabled = ImdsDisabledError("http://169.254.169.254", "/latest/api/token")
    hop = ImdsHopLimitError("http://169.254.169.254")
    down = ImdsUnreachableError("http://169.254.169.254", "/latest/api/token", 3, "cannot connect")
    odd = ImdsResponseError("http://169.254.169.254", "/latest/x", "unexpected answer 418")
    for error in (disabled, hop, down, odd):
        assert isinstance(error, ImdsError)
        assert "please fix" in str(error) or "keeps retrying" in error.fix
    assert "HttpEndpoint=enabled" in str(disabled)
    assert "HttpPutResponseHopLimit" in str(hop)
    assert "3 attempts" in str(down)


async def test_construction_defaults_and_refusals() -> None:
    client = ImdsClient()
    assert client.endpoint == DEFAULT_IMDS_ENDPOINT
    assert client.version is None
    await client.aclose()
    configured = ImdsClient.from_config(Config(imds_endpoint="http://127.0.0.1:9"))
    assert configured.endpoint == "http://127.0.0.1:9"
    with pytest.raises(ValueError):
        ImdsClient(endpoint="ftp://x")
    with pytest.raises(ValueError):
        ImdsClient(attempts=0)
    # A session that reads proxies from the environment would send IMDS through a proxy.
    async with aiohttp.ClientSession(trust_env=True) as session:
        with pytest.raises(ValueError, match="trust_env"):
            ImdsClient(session=session)
