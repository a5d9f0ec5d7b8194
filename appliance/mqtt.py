"""The optional MQTT channel: wake-ups in, progress events and an online/offline status out.

PROTOCOL.md, MQTT. When registration or configuration gives a broker, the
appliance keeps one connection to it (TLS, authenticated with the appliance's
own client certificate) and:

- subscribes to ``wake_topic`` (QoS 1): any message there makes it poll now
  (:meth:`PollWaker.wake`);
- publishes job progress to ``events_topic`` (QoS 0, not retained): the JSON of
  the progress body plus ``job_id``, exactly
  ``{"job_id": "j-42", "phase": "scanning", "hosts_total": 120, "hosts_done": 37}``;
- keeps a retained ``vsa/<appliance_id>/status`` message: ``online`` (QoS 1)
  once connected, ``offline`` as its last will (QoS 1, retained: the broker
  says it when the connection dies) and ``offline`` again on a graceful stop.

The broker is an accelerator, never a dependency: the channel runs beside the
poll loop, never blocks boot, never raises into the daemon, and reconnects with
capped exponential backoff and full jitter. The console says once that the
broker is unreachable (and why, in words) and once when it is connected.

Decisions (the OpenAPI document's ``Mqtt`` schema already states the trust one):

- **Which broker.** ``mqtt.url`` (``VSA_MQTT_URL``) wins over the registration's
  ``url`` (an operator may reach the platform's broker under another name);
  the topics stay the registration's. With no ``mqtt`` in the registration,
  ``mqtt.url`` provides the broker and the topics are ``vsa/<appliance_id>/wake``
  and ``vsa/<appliance_id>/events``. The status topic is always
  ``vsa/<appliance_id>/status``; the MQTT client ID is the appliance ID.
- **TLS only.** ``mqtts://`` (default port 8883). A plain ``mqtt://`` broker is
  not used (the console says so): the protocol authenticates by certificate.
- **Who is trusted.** The broker's certificate is verified (host name
  included) against the platform's CA as registration returned it (``ca_pem``,
  kept as ``identity/ca.pem``), plus ``platform.ca_file`` when configured.
  A broker from ``mqtt.url`` may also carry a certificate from the system trust
  store (an operator's own broker). With neither CA file, the system store.
- **Missed wake-ups.** The session is clean (the broker keeps nothing for an
  absent appliance); after a *re*connection the channel asks for one poll, so
  a wake-up published while it was away is not lost.

The job engine sees only :class:`EventPublisher` (DESIGN.md: the scanning
logic imports an abstract publisher, never the MQTT library), handed to it as
``SinkContext.events``; a malformed event is logged and dropped, never raised. This is the only
module that imports aiomqtt, and only when a connection is made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from appliance.console import Console
from appliance.errors import VsaError
from appliance.platform.retry import Backoff
from appliance.platform.sink import PollWaker
from appliance.state.identity import Identity


class StatusWriter(Protocol):
    """Where the channel records its state for `vsa status` (the daemon's status file)."""

    def update(self, **changes: Any) -> None: ...


log = logging.getLogger("vsa.mqtt")

MQTTS_DEFAULT_PORT = 8883
WAKE_QOS = 1  # PROTOCOL.md
EVENTS_QOS = 0  # PROTOCOL.md: progress is best effort
STATUS_QOS = 1  # the status must arrive: it is the platform's view of the appliance
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
PHASES = ("resolving", "discovery", "scanning", "uploading")  # PROTOCOL.md, progress
CONNECT_TIMEOUT_S = 10.0  # every MQTT round trip (CONNACK, SUBACK, PUBACK) is bounded by this
KEEPALIVE_S = 30  # a silently dead broker is noticed within 1.5 × this
OFFLINE_PUBLISH_TIMEOUT_S = 3.0  # the graceful stop never waits longer for the broker
EVENT_QUEUE_SIZE = 256  # progress events waiting for the socket; more are dropped
RECONNECT_BASE_S = 1.0
RECONNECT_CAP_S = 60.0  # a broker that is back is used again within a minute
RECONNECT_FLOOR_S = 0.5  # full jitter may draw 0: never spin


class MqttChannelError(VsaError):
    """The MQTT channel cannot be used as configured (the message says what to fix)."""


class ProgressEventError(MqttChannelError, ValueError):
    """A progress event with a phase or counts the protocol does not allow (a caller's bug)."""


# --- the interface the job engine sees ---


@runtime_checkable
class EventPublisher(Protocol):
    """Where the job engine sends progress events (the MQTT channel, or nothing)."""

    def publish_progress(self, job_id: str, phase: str, hosts_total: int, hosts_done: int) -> None:
        """Queue one progress event and return at once; dropped while no broker is connected.

        Never blocks and never raises: an event the protocol does not allow
        (``phase`` not one of ``resolving``, ``discovery``, ``scanning``,
        ``uploading``; counts not whole numbers with ``0 <= hosts_done <= hosts_total``)
        is logged as a warning and dropped, because progress is best effort and
        must never disturb a scan. Safe to call from the event loop or any thread.
        """
        ...


class NullPublisher:
    """An :class:`EventPublisher` that checks each event and drops it (no broker; tests).

    With ``strict`` a malformed event raises :class:`ProgressEventError` (for the
    job engine's own tests); otherwise it is logged, as the real channel does.
    """

    def __init__(self, *, strict: bool = False) -> None:
        """Count what was dropped, for tests."""
        self.strict = strict
        self.dropped = 0
        self.rejected = 0

    def publish_progress(self, job_id: str, phase: str, hosts_total: int, hosts_done: int) -> None:
        """Check the event as the real channel does, then drop it."""
        if checked_payload(job_id, phase, hosts_total, hosts_done, strict=self.strict) is None:
            self.rejected += 1
        self.dropped += 1


def checked_payload(job_id: str, phase: str, hosts_total: int, hosts_done: int, *, strict: bool) -> bytes | None:
    """:func:`progress_payload`, or None (with a warning) for an event the protocol does not allow."""
    try:
        return progress_payload(job_id, phase, hosts_total, hosts_done)
    except ProgressEventError as exc:
        if strict:
            raise
        log.warning("progress event not published (a bug in its sender): %s", exc)
        return None


# --- pure logic ---


def progress_payload(job_id: str, phase: str, hosts_total: int, hosts_done: int) -> bytes:
    """The wire form of one progress event (compact JSON, fields in this order)."""
    if not isinstance(job_id, str) or not job_id:
        raise ProgressEventError(f"a progress event needs a job ID, not {job_id!r}")
    if phase not in PHASES:
        raise ProgressEventError(f"progress phase {phase!r} is not one of {', '.join(PHASES)}")
    for name, value in (("hosts_total", hosts_total), ("hosts_done", hosts_done)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProgressEventError(f"progress {name} must be a whole number >= 0, not {value!r}")
    if hosts_done > hosts_total:
        raise ProgressEventError(f"progress hosts_done {hosts_done} exceeds hosts_total {hosts_total}")
    body = {"job_id": job_id, "phase": phase, "hosts_total": hosts_total, "hosts_done": hosts_done}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def status_topic(appliance_id: str) -> str:
    """The retained online/offline topic (PROTOCOL.md): ``vsa/<appliance_id>/status``."""
    return f"vsa/{appliance_id}/status"


def default_topics(appliance_id: str) -> tuple[str, str]:
    """Wake and events topics when only ``mqtt.url`` names a broker: ``vsa/<id>/wake``, ``vsa/<id>/events``."""
    return f"vsa/{appliance_id}/wake", f"vsa/{appliance_id}/events"


@dataclass(frozen=True)
class BrokerSettings:
    """Where to connect and which topics to use, decided from registration and configuration."""

    url: str
    host: str
    port: int
    client_id: str
    wake_topic: str
    events_topic: str
    status_topic: str
    source: Literal["registration", "configuration"]

    @property
    def display(self) -> str:
        """``host:port`` for the console."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def broker_settings(
    appliance_id: str,
    registered: Mapping[str, Any] | None,
    config_url: str | None,
) -> BrokerSettings | None:
    """The broker to use, or None when neither registration nor ``mqtt.url`` gives one.

    Raises :class:`MqttChannelError` naming the source when the URL is unusable
    (not ``mqtts://``, no host, a bad port).
    """
    reg_url = registered.get("url") if registered else None
    url = config_url or (reg_url if isinstance(reg_url, str) and reg_url else None)
    if url is None:
        return None
    source: Literal["registration", "configuration"] = "configuration" if config_url else "registration"
    where = "mqtt.url" if config_url else "the registration's mqtt.url"
    parts = urlsplit(url)
    if parts.scheme == "mqtt":
        raise MqttChannelError(
            f"{where} is {url}: plain MQTT is not used (the appliance authenticates with its certificate "
            "over TLS only) - give an mqtts:// URL"
        )
    if parts.scheme != "mqtts" or not parts.hostname:
        raise MqttChannelError(f"{where} is {url!r}: it must be mqtts://host[:port]")
    try:
        port = parts.port or MQTTS_DEFAULT_PORT
    except ValueError as exc:
        raise MqttChannelError(f"{where} is {url!r}: the port is invalid ({exc})") from None
    wake, events = default_topics(appliance_id)
    if registered:
        wake = _topic(registered.get("wake_topic")) or wake
        events = _topic(registered.get("events_topic")) or events
    return BrokerSettings(
        url=url, host=parts.hostname, port=port, client_id=appliance_id,
        wake_topic=wake, events_topic=events, status_topic=status_topic(appliance_id), source=source,
    )


def _topic(value: Any) -> str | None:
    # A publish topic may not hold wildcards; a bad one falls back to the default.
    if isinstance(value, str) and value and not any(c in value for c in "+#\0"):
        return value
    return None


def describe_failure(exc: BaseException, settings: BrokerSettings, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Why the broker could not be used, in words an operator can act on (pure)."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if "certificate verify failed" in lowered or isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({text}); the broker's certificate must come from the "
                "platform's CA (or platform.ca_file)")
    if "timed out" in lowered or isinstance(exc, TimeoutError):
        return (f"no answer within {timeout_s:g} s (a firewall dropping port {settings.port}, or a broker "
                "that refused this appliance's client certificate)")
    if "refused" in lowered and "errno" in lowered:
        return f"connection refused (is the broker running and listening on port {settings.port}?)"
    if "name or service not known" in lowered or "nodename nor servname" in lowered or "errno -2" in lowered \
            or "errno -3" in lowered:
        return f"the host name {settings.host} cannot be resolved"
    if "not authorized" in lowered or "bad user name" in lowered or "code:5" in lowered or "code:135" in lowered:
        return "the broker refused this appliance (not authorized)"
    if "no route" in lowered or "unreachable" in lowered:
        return f"no route to {settings.host}"
    if isinstance(exc, FileNotFoundError | PermissionError):
        return f"the appliance's certificate or key cannot be read ({text})"
    return text


def reconnect_delay_s(attempt: int, backoff: Backoff, rng: random.Random | None = None) -> float:
    """The wait before connection attempt ``attempt + 1``: full jitter, capped, never below a floor."""
    return max(RECONNECT_FLOOR_S, backoff.delay_s(attempt, rng=rng))


def tls_context(
    settings: BrokerSettings, identity: Identity, platform_ca_file: Path | None
) -> ssl.SSLContext:
    """TLS 1.2+ with the appliance's certificate, verifying the broker (see the module's trust decision)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and host name checks
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    anchors = [path for path in (identity.ca_path, platform_ca_file) if path is not None and path.exists()]
    for path in anchors:
        context.load_verify_locations(cafile=str(path))
    if settings.source == "configuration" or not anchors:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    return context


# --- the channel ---


class _Lost(Exception):
    """The broker connection ended without a stop being asked (internal)."""


class MqttChannel:
    """The daemon's MQTT connection; also the :class:`EventPublisher` the job engine is handed.

    The daemon calls :meth:`use_identity` whenever its registered identity is
    known or changes (None when it is wiped), and :meth:`aclose` when it stops.
    Both only await the channel's own housekeeping, bounded by short timeouts.
    """

    def __init__(
        self,
        *,
        console: Console,
        waker: PollWaker,
        config_url: str | None = None,
        platform_ca_file: Path | None = None,
        status: StatusWriter | None = None,
        reconnect: Backoff | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        keepalive_s: int = KEEPALIVE_S,
        rng: random.Random | None = None,
    ) -> None:
        """Wire the channel; nothing connects until :meth:`use_identity` gives it an identity."""
        self.console = console
        self.waker = waker
        self.config_url = config_url
        self.platform_ca_file = platform_ca_file
        self.status = status
        self.reconnect = reconnect or Backoff(base_s=RECONNECT_BASE_S, cap_s=RECONNECT_CAP_S)
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.rng = rng or random.Random()
        self.settings: BrokerSettings | None = None
        self.dropped = 0  # progress events dropped (no broker, or the queue was full)
        self.rejected = 0  # malformed progress events (logged, never raised)
        self._identity_key: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._queue: asyncio.Queue[bytes] | None = None
        self._said_state: str | None = None  # what the console last said: connected, down, unusable
        self._connected_once = False
        self._session_up = False

    # --- EventPublisher ---

    @property
    def connected(self) -> bool:
        """True while a broker session is up (events are being sent)."""
        return self._queue is not None

    def publish_progress(self, job_id: str, phase: str, hosts_total: int, hosts_done: int) -> None:
        """Queue one progress event for ``events_topic`` (QoS 0); dropped while disconnected."""
        payload = checked_payload(job_id, phase, hosts_total, hosts_done, strict=False)
        if payload is None:
            self.rejected += 1
            return
        loop = self._loop
        if loop is None or self._queue is None or loop.is_closed():
            self.dropped += 1
            return
        if threading.get_ident() == self._loop_thread:
            self._enqueue(payload)
        else:
            try:
                loop.call_soon_threadsafe(self._enqueue, payload)
            except RuntimeError:  # the loop closed between the check and the call
                self.dropped += 1

    def _enqueue(self, payload: bytes) -> None:
        queue = self._queue
        if queue is None:
            self.dropped += 1
            return
        try:
            queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            log.debug("progress event dropped: %d events already wait for the broker", queue.qsize())

    # --- lifecycle (called by the daemon) ---

    async def use_identity(self, identity: Identity | None) -> None:
        """Connect for this registered identity (or stop, for None); no-op when nothing changed."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        settings: BrokerSettings | None = None
        reg = identity.registration if identity is not None else None
        if identity is not None and reg is not None and identity.registered:
            try:
                settings = broker_settings(reg.appliance_id, reg.mqtt, self.config_url)
            except MqttChannelError as exc:
                self._say("unusable", f"MQTT broker not used: {exc}; the appliance polls over HTTPS only")
                settings = None
        key = (settings, identity.directory, identity.cert_path) if settings and identity else None
        if key == self._identity_key and (key is None or (self._task is not None and not self._task.done())):
            return
        await self._stop_task()
        self._identity_key = key
        self.settings = settings
        if settings is None or identity is None:
            self._report("none" if settings is None else "stopped", None)
            return
        self._stop = asyncio.Event()
        self._connected_once = False
        self._said_state = None  # a new identity (or broker) is news for the console again
        self._task = asyncio.create_task(self._run(settings, identity), name="vsa-mqtt")

    async def aclose(self) -> None:
        """Publish ``offline`` (retained) and disconnect; bounded, never raises."""
        await self._stop_task()
        self._identity_key = None

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        if not self._session_up:
            # Not connected: nothing to say to a broker; a connect in progress is abandoned.
            task.cancel()
        try:
            # Connected: the session publishes `offline` and disconnects, each step bounded.
            await asyncio.wait_for(asyncio.shield(task), timeout=2 * OFFLINE_PUBLISH_TIMEOUT_S)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # we were cancelled ourselves
        except Exception as exc:  # the channel must never take the daemon down with it
            log.warning("the MQTT channel ended on an error: %s", exc)
        self._queue = None
        self._session_up = False
        self._report("stopped", None)

    # --- the connection loop ---

    async def _run(self, settings: BrokerSettings, identity: Identity) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await self._session(settings, identity)
                return  # a stop was asked
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is retried: the broker is never a dependency
                if self._stop.is_set():
                    log.info("MQTT broker %s: the session ended on %s while stopping", settings.display, exc)
                    return
                was_up = self._session_up
                self._session_up = False
                self._queue = None
                failures = 1 if was_up else failures + 1
                words = describe_failure(exc, settings, self.connect_timeout_s)
                delay = reconnect_delay_s(failures, self.reconnect, self.rng)
                expected = isinstance(exc, OSError | TimeoutError | _Lost) or type(exc).__module__.startswith(
                    ("aiomqtt", "paho"))
                log.log(logging.INFO if expected else logging.WARNING,
                        "MQTT broker %s: %s (%s); next attempt in %.1f s", settings.display, words,
                        type(exc).__name__, delay, exc_info=not expected)
                if was_up:
                    self._say("down", f"MQTT broker {settings.display}: connection lost ({words}); polling over "
                              "HTTPS goes on, reconnecting in the background")
                else:
                    self._say("down", f"MQTT broker {settings.display} unreachable: {words}; the appliance works "
                              "the same over HTTPS polling and keeps trying the broker in the background")
                self._report("unreachable", words)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except TimeoutError:
                continue

    async def _session(self, settings: BrokerSettings, identity: Identity) -> None:
        import aiomqtt  # late: only a configured broker loads the MQTT library

        self._session_up = False
        context = tls_context(settings, identity, self.platform_ca_file)
        client = aiomqtt.Client(
            settings.host,
            settings.port,
            identifier=settings.client_id,
            tls_context=context,
            will=aiomqtt.Will(settings.status_topic, STATUS_OFFLINE, qos=STATUS_QOS, retain=True),
            clean_session=True,
            timeout=self.connect_timeout_s,
            keepalive=self.keepalive_s,
            logger=logging.getLogger("vsa.mqtt.client"),
        )
        async with client:
            await client.subscribe(settings.wake_topic, qos=WAKE_QOS)
            await client.publish(settings.status_topic, STATUS_ONLINE, qos=STATUS_QOS, retain=True)
            self._session_up = True
            self._queue = asyncio.Queue(maxsize=EVENT_QUEUE_SIZE)
            self._say("connected", f"MQTT broker {settings.display}: connected (wake-ups make the appliance poll at once; "
                      f"status {settings.status_topic} online)")
            self._report("connected", None)
            if self._connected_once:
                # Wake-ups sent while the channel was down are gone (clean session): poll once to catch up.
                self.waker.wake()
            self._connected_once = True
            reader = asyncio.create_task(self._read(client, settings))
            sender = asyncio.create_task(self._send(client, settings, self._queue))
            stopper = asyncio.create_task(self._stop.wait())
            try:
                done, _ = await asyncio.wait({reader, sender, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._queue = None
                for task in (reader, sender, stopper):
                    task.cancel()
                await asyncio.gather(reader, sender, stopper, return_exceptions=True)
            if stopper in done:
                try:
                    await client.publish(settings.status_topic, STATUS_OFFLINE, qos=STATUS_QOS, retain=True,
                                         timeout=OFFLINE_PUBLISH_TIMEOUT_S)
                except aiomqtt.MqttError as exc:
                    log.info("MQTT broker %s: could not publish offline (%s); its last will says it", settings.display, exc)
                self._session_up = False
                return
            for finished in done:
                error = None if finished.cancelled() else finished.exception()
                if error is not None:
                    raise error
            raise _Lost("the broker closed the connection")

    async def _read(self, client: Any, settings: BrokerSettings) -> None:
        async for message in client.messages:
            if message.topic.matches(settings.wake_topic):
                log.info("wake-up over MQTT on %s: polling now", settings.wake_topic)
                self.waker.wake()

    async def _send(self, client: Any, settings: BrokerSettings, queue: asyncio.Queue[bytes]) -> None:
        while True:
            payload = await queue.get()
            await client.publish(settings.events_topic, payload, qos=EVENTS_QOS, retain=False)

    # --- the operator's view ---

    def _say(self, state: str, text: str) -> None:
        # Once per state: a broker that stays down is said once, not on every retry.
        if self._said_state != state:
            self._said_state = state
            self.console.say(text)

    def _report(self, state: str, detail: str | None) -> None:
        if self.status is None:
            return
        settings = self.settings
        try:
            self.status.update(mqtt={
                "state": state, "broker": settings.display if settings else None, "detail": detail,
                "status_topic": settings.status_topic if settings else None,
            })
        except Exception as exc:  # the status file is informational; never let it stop the channel
            log.warning("could not record the MQTT state in the status file: %s", exc)
