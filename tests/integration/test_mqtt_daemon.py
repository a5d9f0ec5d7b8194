"""`vsa run` as a real process with a real Mosquitto (TLS, require_certificate) beside the reference platform.

The poll interval is 60 s, so a poll within a second or two of a wake-up can
only be the wake-up's doing. The platform's request log is the witness.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from conftest import require_tool
from daemon_harness import DaemonLab

from appliance.lab.mosquitto import BrokerTls, MosquittoBroker
from appliance.lab.platform import Platform
from appliance.lab.platform.mqtt import broker_files

pytestmark = pytest.mark.slow

POLL_INTERVAL_S = 60
WAKE_TO_POLL_MAX_S = 2.0
WAIT_S = 10.0


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DaemonLab]:
    require_tool("mosquitto")
    with DaemonLab(tmp_path, poll_interval_s=POLL_INTERVAL_S) as daemon_lab:
        yield daemon_lab


@pytest.fixture
def broker(lab: DaemonLab, tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker with a certificate from the platform's CA, prepared but not started."""
    assert lab.platform is not None
    files = broker_files(lab.platform, tmp_path / "broker", ["127.0.0.1"])
    mosquitto = MosquittoBroker(tmp_path / "broker", tls=BrokerTls(files.ca_file, files.cert_file, files.key_file),
                                acl_observers=("test-observer",))  # appliances limited to their own topics
    yield mosquitto
    mosquitto.stop()


def observer_tls(platform: Platform, directory: Path) -> ssl.SSLContext:
    """A watching client's TLS: a certificate of its own from the platform's CA."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = platform.ca.issue_keypair("test-observer", client=True)
    (directory / "observer.pem").write_text(cert_pem)
    (directory / "observer.key").write_bytes(key_pem if isinstance(key_pem, bytes) else key_pem.encode())
    ctx = ssl.create_default_context(cafile=str(platform.ca_file))
    ctx.load_cert_chain(str(directory / "observer.pem"), str(directory / "observer.key"))
    return ctx


def retained_status(lab: DaemonLab, broker: MosquittoBroker, appliance_id: str) -> str:
    """The retained message on ``vsa/<id>/status``, as a fresh subscriber is told it."""
    assert lab.platform is not None
    ctx = observer_tls(lab.platform, lab.tmp / "observer")

    async def read() -> str:
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=ctx, timeout=WAIT_S,
                                  identifier=f"observer-{time.monotonic_ns()}") as client:
            await client.subscribe(f"vsa/{appliance_id}/status", qos=1)
            async with asyncio.timeout(WAIT_S):
                message = await anext(aiter(client.messages))
        assert message.retain
        return bytes(message.payload).decode()  # type: ignore[arg-type]

    return asyncio.run(read())


def wait_status(lab: DaemonLab, broker: MosquittoBroker, appliance_id: str, expected: str) -> None:
    lab.wait_until(lambda: retained_status(lab, broker, appliance_id) == expected, timeout_s=WAIT_S,
                   what=f"the retained status {expected!r}")


def publish(lab: DaemonLab, broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    """Publish one QoS 1 message as a third party with a certificate from the platform's CA."""
    assert lab.platform is not None
    ctx = observer_tls(lab.platform, lab.tmp / "publisher")

    async def send() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_context=ctx, timeout=WAIT_S,
                                  identifier=f"publisher-{time.monotonic_ns()}") as client:
            await client.publish(topic, payload, qos=1)

    asyncio.run(send())


def assert_poll_follows(lab: DaemonLab, before: int, woken_at: float) -> None:
    """A poll arrives within WAKE_TO_POLL_MAX_S of ``woken_at`` (the next by the interval is ~60 s away)."""
    lab.wait_until(lambda: len(lab.polls()) > before, timeout_s=5, what="a poll after the wake-up")
    latency = lab.polls()[before]["at_s"] - woken_at
    assert latency < WAKE_TO_POLL_MAX_S, latency


def test_wake_polls_at_once_and_the_retained_status_follows_the_daemon(lab: DaemonLab,
                                                                       broker: MosquittoBroker) -> None:
    assert lab.platform is not None
    broker.start()
    lab.platform.set_mqtt(broker.url)
    lab.set_user_data(f"PERSCODE={lab.platform.create_perscode()}\n")
    lab.start_daemon()
    appliance_id = lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$").group(1)
    lab.wait_for(rf"^vsa: MQTT broker 127\.0\.0\.1:{broker.port}: connected \(wake-ups make the appliance poll "
                 rf"at once; status vsa/{appliance_id}/status online\)$")
    lab.wait_until(lambda: len(lab.polls()) >= 1, timeout_s=WAIT_S, what="the first poll")
    assert lab.wait_for(r"polling the platform every 60 s")
    wait_status(lab, broker, appliance_id, "online")

    # Two wake-ups from the platform (its own client certificate): each brings a poll at once.
    for _ in range(2):
        time.sleep(0.5)
        before = len(lab.polls())
        woken_at = time.time()
        lab.platform.wake(appliance_id)
        assert_poll_follows(lab, before, woken_at)
    assert len(lab.polls()) == 3  # the first, and one per wake-up: nothing by the 60 s interval yet

    # SIGTERM: a graceful stop says offline (retained) itself.
    assert lab.stop_daemon(signal.SIGTERM) == 0
    assert retained_status(lab, broker, appliance_id) == "offline"
    console = lab.console()
    assert console.count(": connected (") == 1 and "unreachable" not in console

    # SIGKILL: nobody says goodbye, the broker publishes the last will.
    lab.start_daemon()
    lab.wait_for(rf"^vsa: registered as {appliance_id} \(since ")
    lab.wait_for(r"^vsa: MQTT broker .*: connected")
    wait_status(lab, broker, appliance_id, "online")
    lab.stop_daemon(signal.SIGKILL)
    wait_status(lab, broker, appliance_id, "offline")


def test_broker_down_polls_go_on_said_once_then_mqtt_url_broker_is_used(lab: DaemonLab,
                                                                        broker: MosquittoBroker) -> None:
    # The platform gives no broker; mqtt.url (VSA_MQTT_URL) names one that is not running yet.
    assert lab.platform is not None
    lab.set_user_data(f"PERSCODE={lab.platform.create_perscode()}\n")
    started = time.time()
    lab.start_daemon(env=lab.env(VSA_MQTT_URL=broker.url))  # VSA_WAIT_CAP_S=2: reconnects every <= 2 s
    appliance_id = lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$").group(1)
    lab.wait_until(lambda: len(lab.polls()) >= 1, timeout_s=WAIT_S, what="the first poll")
    assert lab.polls()[0]["at_s"] - started < WAIT_S  # boot never waited for the broker
    lab.wait_for(rf"^vsa: MQTT broker 127\.0\.0\.1:{broker.port} unreachable: connection refused \(is the broker "
                 rf"running and listening on port {broker.port}\?\); the appliance works the same over HTTPS polling "
                 r"and keeps trying the broker in the background$")
    time.sleep(5)  # several more attempts
    assert lab.run_console().count("unreachable") == 1
    assert lab.journal().count("MQTT broker 127.0.0.1") >= 3  # the attempts are in the journal

    broker.start()
    lab.wait_for(rf"^vsa: MQTT broker 127\.0\.0\.1:{broker.port}: connected", timeout_s=WAIT_S)
    wait_status(lab, broker, appliance_id, "online")
    # With no mqtt in the registration, the topics are vsa/<id>/wake and vsa/<id>/events.
    time.sleep(0.5)
    before = len(lab.polls())
    woken_at = time.time()
    publish(lab, broker, f"vsa/{appliance_id}/wake", b"anything wakes")
    assert_poll_follows(lab, before, woken_at)
    assert lab.stop_daemon() == 0
    assert retained_status(lab, broker, appliance_id) == "offline"
    assert lab.run_console().count(": connected (") == 1


class StatusWatcher:
    """Collects every message on a status topic, in a thread of its own, while the test drives the daemon."""

    def __init__(self, lab: DaemonLab, broker: MosquittoBroker, appliance_id: str) -> None:
        assert lab.platform is not None
        self.ctx = observer_tls(lab.platform, lab.tmp / "watcher")
        self.port = broker.port
        self.topic = f"vsa/{appliance_id}/status"
        self.seen: list[str] = []
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._watch()), daemon=True)

    async def _watch(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, tls_context=self.ctx, timeout=WAIT_S,
                                  identifier=f"watcher-{time.monotonic_ns()}") as client:
            await client.subscribe(self.topic, qos=1)
            self.subscribed.set()
            while not self._stop.is_set():
                try:
                    async with asyncio.timeout(0.2):
                        message = await anext(aiter(client.messages))
                except TimeoutError:
                    continue
                self.seen.append(bytes(message.payload).decode())  # type: ignore[arg-type]

    def __enter__(self) -> StatusWatcher:
        self._thread.start()
        assert self.subscribed.wait(WAIT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)


def test_a_forgotten_appliance_goes_offline_and_comes_back_with_its_new_certificate(
    lab: DaemonLab, broker: MosquittoBroker
) -> None:
    assert lab.platform is not None
    broker.start()
    lab.platform.set_mqtt(broker.url)
    lab.set_user_data(f"PERSCODE={lab.platform.create_perscode()}\n")
    lab.start_daemon()
    appliance_id = lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$").group(1)
    lab.wait_for(r"^vsa: MQTT broker .*: connected")
    old_cert = (lab.state_dir / "identity" / "certificate.pem").read_bytes()
    with StatusWatcher(lab, broker, appliance_id) as watcher:
        lab.wait_until(lambda: watcher.seen == ["online"], timeout_s=WAIT_S, what="the retained online")
        lab.platform.forget_appliance(appliance_id)
        lab.platform.wake(appliance_id)  # the next poll, at once, is answered 401
        lab.wait_for(r"the platform does not know this appliance any more \(401 unknown_appliance")
        lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$", count=2)
        lab.wait_until(lambda: watcher.seen == ["online", "offline", "online"], timeout_s=WAIT_S,
                       what="offline with the old certificate, online with the new one")
    assert (lab.state_dir / "identity" / "certificate.pem").read_bytes() != old_cert
    assert lab.run_console().count(": connected (") == 2
    assert lab.stop_daemon() == 0
