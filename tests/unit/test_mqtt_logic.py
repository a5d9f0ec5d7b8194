"""The MQTT channel's pure logic: the event wire format, broker choice, words for failures, backoff."""

from __future__ import annotations

import io
import json
import random
import ssl
import threading

import pytest

from appliance.console import Console
from appliance.mqtt import (
    MQTTS_DEFAULT_PORT,
    RECONNECT_FLOOR_S,
    BrokerSettings,
    EventPublisher,
    MqttChannel,
    MqttChannelError,
    NullPublisher,
    ProgressEventError,
    broker_settings,
    describe_failure,
    progress_payload,
    reconnect_delay_s,
)
from appliance.platform.retry import Backoff
from appliance.platform.sink import PollWaker

REG = {"url": "mqtts://broker.example:8884", "wake_topic": "vsa/vsa-1/wake", "events_topic": "vsa/vsa-1/events"}


# --- progress events ---


def test_progress_payload_is_the_progress_body_plus_job_id_in_compact_json() -> None:
    payload = progress_payload("j-42", "scanning", 120, 37)
    assert payload == b'{"job_id":"j-42","phase":"scanning","hosts_total":120,"hosts_done":37}'
    assert json.loads(payload) == {"job_id": "j-42", "phase": "scanning", "hosts_total": 120, "hosts_done": 37}


@pytest.mark.parametrize("phase", ["resolving", "discovery", "scanning", "uploading"])
def test_every_protocol_phase_is_accepted(phase: str) -> None:
    assert json.loads(progress_payload("j-1", phase, 0, 0))["phase"] == phase


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("j-1", "ports", 1, 0), "phase 'ports' is not one of"),
        (("", "scanning", 1, 0), "needs a job ID"),
        (("j-1", "scanning", -1, 0), "hosts_total must be a whole number"),
        (("j-1", "scanning", 3, True), "hosts_done must be a whole number"),
        (("j-1", "scanning", 2.0, 1), "hosts_total must be a whole number"),
        (("j-1", "scanning", 2, 3), "hosts_done 3 exceeds hosts_total 2"),
    ],
)
def test_a_malformed_event_is_a_value_error_with_words(args: tuple, words: str) -> None:
    with pytest.raises(ProgressEventError, match=words) as info:
        progress_payload(*args)
    assert isinstance(info.value, ValueError)


def test_null_publisher_checks_like_the_channel_and_drops() -> None:
    publisher = NullPublisher()
    assert isinstance(publisher, EventPublisher)
    publisher.publish_progress("j-1", "discovery", 4, 1)
    publisher.publish_progress("j-1", "nope", 4, 1)  # logged, never raised: progress must not disturb a scan
    assert (publisher.dropped, publisher.rejected) == (2, 1)
    with pytest.raises(ValueError, match="phase 'nope'"):
        NullPublisher(strict=True).publish_progress("j-1", "nope", 4, 1)  # for the engine's own tests


def test_the_channel_is_a_publisher_that_drops_while_disconnected(caplog: pytest.LogCaptureFixture) -> None:
    channel = MqttChannel(console=Console(io.StringIO()), waker=PollWaker())
    assert isinstance(channel, EventPublisher)
    assert not channel.connected
    channel.publish_progress("j-1", "scanning", 10, 2)  # no loop, no broker: returns at once
    thread = threading.Thread(target=channel.publish_progress, args=("j-1", "uploading", 10, 10))
    thread.start()
    thread.join(5)
    assert channel.dropped == 2
    channel.publish_progress("j-1", "scanning", 1, 2)  # malformed: logged and dropped, never raised
    assert (channel.dropped, channel.rejected) == (2, 1)
    assert "progress event not published (a bug in its sender): progress hosts_done 2 exceeds hosts_total 1" in caplog.text


# --- which broker, which topics ---


def test_registration_gives_the_broker_and_topics() -> None:
    s = broker_settings("vsa-1", REG, None)
    assert s == BrokerSettings(
        url=REG["url"], host="broker.example", port=8884, client_id="vsa-1", wake_topic="vsa/vsa-1/wake",
        events_topic="vsa/vsa-1/events", status_topic="vsa/vsa-1/status", source="registration",
    )
    assert s.display == "broker.example:8884"


def test_configuration_overrides_the_url_and_keeps_the_registration_topics() -> None:
    reg = dict(REG, wake_topic="tenant/7/wake", events_topic="tenant/7/events")
    s = broker_settings("vsa-1", reg, "mqtts://10.0.0.9")
    assert s is not None
    assert (s.host, s.port, s.source) == ("10.0.0.9", MQTTS_DEFAULT_PORT, "configuration")
    assert (s.wake_topic, s.events_topic, s.status_topic) == ("tenant/7/wake", "tenant/7/events", "vsa/vsa-1/status")


def test_configuration_alone_provides_a_broker_with_the_default_topics() -> None:
    s = broker_settings("vsa-9", None, "mqtts://[::1]:9883")
    assert s is not None
    assert (s.wake_topic, s.events_topic, s.status_topic) == ("vsa/vsa-9/wake", "vsa/vsa-9/events", "vsa/vsa-9/status")
    assert s.display == "[::1]:9883" and s.client_id == "vsa-9"


def test_no_broker_anywhere_is_none() -> None:
    assert broker_settings("vsa-1", None, None) is None
    assert broker_settings("vsa-1", {"url": ""}, None) is None


def test_a_wildcard_topic_from_the_registration_falls_back_to_the_default() -> None:
    s = broker_settings("vsa-1", dict(REG, wake_topic="vsa/+/wake", events_topic=7), None)
    assert s is not None and (s.wake_topic, s.events_topic) == ("vsa/vsa-1/wake", "vsa/vsa-1/events")


@pytest.mark.parametrize(
    ("reg", "config", "words"),
    [
        (None, "mqtt://broker:1883", "mqtt.url is mqtt://broker:1883: plain MQTT is not used"),
        ({"url": "mqtt://b"}, None, "the registration's mqtt.url is mqtt://b: plain MQTT is not used"),
        ({"url": "https://b"}, None, "it must be mqtts://host"),
        (None, "mqtts://b:99999", "the port is invalid"),
    ],
)
def test_unusable_urls_are_refused_naming_the_source(reg: dict | None, config: str | None, words: str) -> None:
    with pytest.raises(MqttChannelError, match=words):
        broker_settings("vsa-1", reg, config)


# --- words for the console ---


def _settings() -> BrokerSettings:
    s = broker_settings("vsa-1", REG, None)
    assert s is not None
    return s


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (Exception("[Errno 111] Connection refused"), "connection refused (is the broker running and listening on port 8884?)"),
        (Exception("Operation timed out"), "no answer within 10 s"),
        (TimeoutError(), "refused this appliance's client certificate"),
        (Exception("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"),
         "its TLS certificate is not trusted"),
        (Exception("[Errno -2] Name or service not known"), "the host name broker.example cannot be resolved"),
        (Exception("[code:135] Not authorized"), "not authorized"),
        (FileNotFoundError(2, "No such file or directory"), "certificate or key cannot be read"),
        (Exception("something new"), "something new"),
    ],
)
def test_failures_are_said_in_words(exc: BaseException, words: str) -> None:
    assert words in describe_failure(exc, _settings())


def test_a_real_verification_error_is_recognised() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    assert "not trusted" in describe_failure(exc, _settings())


# --- reconnecting ---


def test_reconnect_waits_grow_are_capped_and_never_zero() -> None:
    backoff = Backoff(base_s=1.0, cap_s=60.0)
    rng = random.Random(7)
    waits = [reconnect_delay_s(n, backoff, rng) for n in range(1, 40)]
    assert all(RECONNECT_FLOOR_S <= w <= 60.0 for w in waits)
    assert max(waits[:3]) <= 4.0  # the first attempts come quickly
    assert max(waits[10:]) > 10.0  # later ones spread out up to the cap
    assert backoff.worst_case_total_s(39) <= 39 * 60
