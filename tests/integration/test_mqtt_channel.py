"""MqttChannel against a real Mosquitto (TLS, require_certificate) with certificates from the platform's CA.

The appliance's identity is made as registration makes it (a P-256 key and CSR
in the identity store, the certificate signed by the reference platform's CA,
``ca_pem`` and the ``mqtt`` object stored); an observer client with a
certificate of its own from the same CA watches the topics.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
from conftest import require_tool

from appliance.console import Console
from appliance.lab.mosquitto import BrokerTls, MosquittoBroker
from appliance.lab.platform import Platform
from appliance.lab.platform.mqtt import broker_files
from appliance.mqtt import MqttChannel
from appliance.platform.retry import Backoff
from appliance.platform.sink import PollWaker
from appliance.state.identity import Identity, IdentityStore

APPLIANCE_ID = "vsa-mqtt01"
EVENTS = f"vsa/{APPLIANCE_ID}/events"
STATUS = f"vsa/{APPLIANCE_ID}/status"
WAIT_S = 10.0
FAST = Backoff(base_s=0.2, cap_s=0.5)  # reconnect quickly: these tests watch it happen


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform.init(tmp_path / "platform")
    yield p
    p.close()


def _tls(platform: Platform, directory: Path) -> BrokerTls:
    files = broker_files(platform, directory, ["127.0.0.1"])
    return BrokerTls(files.ca_file, files.cert_file, files.key_file)


@pytest.fixture
def broker(platform: Platform, tmp_path: Path) -> Iterator[MosquittoBroker]:
    require_tool("mosquitto")
    with MosquittoBroker(tmp_path / "broker", tls=_tls(platform, tmp_path / "broker"),
                         acl_observers=("test-observer",)) as mosquitto:  # appliances: their own topics only
        platform.set_mqtt(mosquitto.url)
        yield mosquitto


def registered_identity(platform: Platform, state_dir: Path) -> Identity:
    """An identity as registration leaves it: key, certificate from the platform's CA, ca_pem, mqtt."""
    store = IdentityStore(state_dir)
    identity = store.create("i-0123456789abcdef0")
    cert = platform.ca.sign_csr(identity.csr_pem(), APPLIANCE_ID).pem
    return store.save_registration(
        identity, appliance_id=APPLIANCE_ID, certificate_pem=cert, ca_pem=platform.ca_pem,
        platform_url=None, poll_interval_s=60, mqtt=platform.mqtt_for(APPLIANCE_ID),
    )


def observer_context(platform: Platform, directory: Path) -> ssl.SSLContext:
    """TLS for a watching client with its own certificate from the platform's CA."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = platform.ca.issue_keypair("test-observer", client=True)
    (directory / "observer.pem").write_text(cert_pem)
    (directory / "observer.key").write_bytes(key_pem if isinstance(key_pem, bytes) else key_pem.encode())
    ctx = ssl.create_default_context(cafile=str(platform.ca_file))
    ctx.load_cert_chain(str(directory / "observer.pem"), str(directory / "observer.key"))
    return ctx


@asynccontextmanager
async def observer(platform: Platform, broker: MosquittoBroker, tmp: Path, *topics: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=observer_context(platform, tmp / "observer"),
                              identifier=f"observer-{time.monotonic_ns()}", timeout=WAIT_S) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        yield client


async def next_message(client: aiomqtt.Client, timeout_s: float = WAIT_S) -> aiomqtt.Message:
    async with asyncio.timeout(timeout_s):
        return await anext(aiter(client.messages))


async def retained_status(platform: Platform, broker: MosquittoBroker, tmp: Path) -> str:
    """What a fresh subscriber is told on the status topic (the retained message)."""
    async with observer(platform, broker, tmp, STATUS) as client:
        message = await next_message(client)
    assert message.retain and str(message.topic) == STATUS
    return bytes(message.payload).decode()  # type: ignore[arg-type]


async def wait_until(predicate, timeout_s: float = WAIT_S, what: str = "a condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def make_channel(platform: Platform, console: io.StringIO, waker: PollWaker) -> MqttChannel:
    return MqttChannel(console=Console(console), waker=waker, platform_ca_file=None, reconnect=FAST,
                       connect_timeout_s=3.0)


async def test_progress_events_have_the_exact_wire_format(platform: Platform, broker: MosquittoBroker,
                                                          tmp_path: Path) -> None:
    identity = registered_identity(platform, tmp_path / "state")
    channel = make_channel(platform, io.StringIO(), PollWaker())
    await channel.use_identity(identity)
    try:
        await wait_until(lambda: channel.connected, what="the channel to connect")
        async with observer(platform, broker, tmp_path, EVENTS) as client:
            channel.publish_progress("j-42", "scanning", 120, 37)  # from the event loop
            thread = threading.Thread(target=channel.publish_progress, args=("j-42", "uploading", 120, 120))
            thread.start()  # and from a worker thread
            thread.join(5)
            first, second = await next_message(client), await next_message(client)
    finally:
        await channel.aclose()
    for message in (first, second):
        assert str(message.topic) == EVENTS
        assert message.qos == 0  # published at QoS 0 (the subscription allows 1)
        assert message.retain is False
    assert bytes(first.payload) == b'{"job_id":"j-42","phase":"scanning","hosts_total":120,"hosts_done":37}'  # type: ignore[arg-type]
    assert json.loads(second.payload) == {"job_id": "j-42", "phase": "uploading",  # type: ignore[arg-type]
                                          "hosts_total": 120, "hosts_done": 120}
    assert channel.dropped == 0


async def test_wake_online_then_offline_on_a_graceful_stop(platform: Platform, broker: MosquittoBroker,
                                                           tmp_path: Path) -> None:
    identity = registered_identity(platform, tmp_path / "state")
    console, waker = io.StringIO(), PollWaker()
    channel = make_channel(platform, console, waker)
    await channel.use_identity(identity)
    await wait_until(lambda: channel.connected, what="the channel to connect")
    await channel.use_identity(identity)  # the daemon calls this on every poll-loop start: a no-op
    assert await retained_status(platform, broker, tmp_path) == "online"
    assert not await waker.wait(0.2)  # the first connection asks for no extra poll

    await asyncio.to_thread(platform.wake, APPLIANCE_ID)  # the platform's own client certificate, QoS 1
    assert await waker.wait(5.0)

    await channel.aclose()
    assert not channel.connected
    assert await retained_status(platform, broker, tmp_path) == "offline"
    lines = console.getvalue().splitlines()
    assert lines == [f"vsa: MQTT broker 127.0.0.1:{broker.port}: connected (wake-ups make the appliance poll at once; "
                     f"status {STATUS} online)"]
    # Dropped, not queued, once stopped.
    channel.publish_progress("j-1", "scanning", 1, 0)
    assert channel.dropped == 1


async def test_broker_down_then_up_then_lost_then_back(platform: Platform, tmp_path: Path) -> None:
    require_tool("mosquitto")
    mosquitto = MosquittoBroker(tmp_path / "broker", tls=_tls(platform, tmp_path / "broker"))  # not started
    platform.set_mqtt(mosquitto.url)
    identity = registered_identity(platform, tmp_path / "state")
    console, waker = io.StringIO(), PollWaker()
    channel = make_channel(platform, console, waker)
    started = time.monotonic()
    await channel.use_identity(identity)
    assert time.monotonic() - started < 0.5  # never waits for the broker
    try:
        await asyncio.sleep(2.0)  # several refused attempts (0.5 s cap)
        assert not channel.connected
        down = [line for line in console.getvalue().splitlines() if "unreachable" in line]
        assert down == [f"vsa: MQTT broker 127.0.0.1:{mosquitto.port} unreachable: connection refused (is the broker "
                        f"running and listening on port {mosquitto.port}?); the appliance works the same over HTTPS "
                        "polling and keeps trying the broker in the background"]
        channel.publish_progress("j-1", "discovery", 5, 0)
        assert channel.dropped == 1

        mosquitto.start()
        await wait_until(lambda: channel.connected, what="the channel to connect once the broker is up")
        assert not await waker.wait(0.2)
        assert await retained_status(platform, mosquitto, tmp_path) == "online"

        mosquitto.stop()
        await wait_until(lambda: not channel.connected, what="the channel to notice the broker is gone")
        await asyncio.sleep(1.0)
        mosquitto.start()
        await wait_until(lambda: channel.connected, what="the channel to reconnect")
        assert await waker.wait(2.0)  # wake-ups sent meanwhile are lost (clean session): poll once to catch up
        assert await retained_status(platform, mosquitto, tmp_path) == "online"
    finally:
        await channel.aclose()
        mosquitto.stop()
    text = console.getvalue()
    assert text.count(": connected (") == 2
    assert text.count("unreachable") == 1 and text.count("connection lost") == 1, text


async def test_a_client_without_a_certificate_is_refused(platform: Platform, broker: MosquittoBroker) -> None:
    # LAB-NOTES: the refusal surfaces as a timeout, not as an error naming the certificate.
    ctx = ssl.create_default_context(cafile=str(platform.ca_file))
    started = time.monotonic()
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=ctx, identifier="no-cert", timeout=3):
            pass
    assert time.monotonic() - started < 8


async def test_the_broker_is_trusted_by_the_platform_ca_and_platform_ca_file_only(
    platform: Platform, tmp_path: Path
) -> None:
    require_tool("mosquitto")
    stranger = Platform.init(tmp_path / "stranger")  # another CA: it signs the broker's certificate
    try:
        tls = _tls(stranger, tmp_path / "broker")
        # The broker accepts client certificates from either CA; only the appliance's trust is under test.
        bundle = tmp_path / "broker" / "client-cas.pem"
        bundle.write_text(platform.ca_pem + stranger.ca_pem)
        with MosquittoBroker(tmp_path / "broker", tls=BrokerTls(bundle, tls.cert_file, tls.key_file)) as mosquitto:
            platform.set_mqtt(mosquitto.url)
            identity = registered_identity(platform, tmp_path / "state")

            # Trusting only the registration's ca_pem: refused, said once in words.
            console = io.StringIO()
            channel = make_channel(platform, console, PollWaker())
            await channel.use_identity(identity)
            try:
                await wait_until(lambda: "unreachable" in console.getvalue(), what="the refusal")
                await asyncio.sleep(1.0)  # more attempts, nothing more said
                assert not channel.connected
            finally:
                await channel.aclose()
            assert "its TLS certificate is not trusted" in console.getvalue()
            assert console.getvalue().count("vsa: ") == 1

            # platform.ca_file naming that CA (an operator's private CA): trusted.
            channel = MqttChannel(console=Console(io.StringIO()), waker=PollWaker(), reconnect=FAST,
                                  platform_ca_file=stranger.ca_file, connect_timeout_s=3.0)
            await channel.use_identity(identity)
            try:
                await wait_until(lambda: channel.connected, what="the channel to connect")
            finally:
                await channel.aclose()
    finally:
        stranger.close()


async def test_the_lab_acl_holds_an_appliance_to_its_own_topics(platform: Platform, broker: MosquittoBroker,
                                                                tmp_path: Path) -> None:
    # Every test here runs under that ACL, so the channel provably stays within its own topics.
    identity = registered_identity(platform, tmp_path / "state")
    ctx = ssl.create_default_context(cafile=str(platform.ca_file))
    ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    async with observer(platform, broker, tmp_path, "vsa/#") as watcher:
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=ctx, identifier=APPLIANCE_ID,
                                  timeout=WAIT_S) as appliance:
            await appliance.publish("vsa/vsa-other/status", b"offline", qos=1)  # not its own: dropped
            await appliance.publish("vsa/vsa-other/wake", b"x", qos=1)  # waking others: dropped
            await appliance.publish(EVENTS, b"{}", qos=1)  # its own: delivered
        message = await next_message(watcher)
        assert str(message.topic) == EVENTS
        with pytest.raises(TimeoutError):
            await next_message(watcher, timeout_s=0.5)
