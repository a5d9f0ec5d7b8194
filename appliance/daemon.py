"""``vsa run``: the daemon's lifecycle and its composition root.

Boot (RUNTIME.md, DESIGN.md): configuration → ``vsa <version> starting`` →
IMDS (v2 or v1) → user-data (PERSCODE, PROXY_URL) → the platform's
connectivity verdict → identity (clone check) → register → the poll loop.
Nothing on that path makes the daemon exit: a missing PERSCODE, an
unreachable platform, a refusal or a down IMDS is said once on the console in
words an operator can act on, and retried. SIGTERM and SIGINT stop it
gracefully with exit status 0.

:func:`main` is the composition root: it builds every client (IMDS, platform,
identity store, status file, job sink, systemd notifier) and hands them to
:class:`Daemon`, which only orchestrates. :meth:`Daemon.poll_once` is one
testable round trip, after amazon-ssm-agent's scheduler.

systemd (``Type=notify``): ``READY=1`` as soon as the daemon's loop runs (an
appliance that waits hours for its PERSCODE must not be killed by the start
timeout), ``STATUS=`` with the phase in words, and ``WATCHDOG=1`` from the event
loop every half ``WatchdogSec`` (so a blocked loop gets the service restarted).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import platform as platform_module
import random
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import Config, load_config
from appliance.console import Console, mask_perscode, register_secret, setup_logging
from appliance.errors import ImdsError, PlatformError, StateError, UserDataError, VsaError
from appliance.mqtt import EventPublisher, MqttChannel, NullPublisher
from appliance.platform.client import (
    InvalidPerscode,
    PerscodeInUse,
    PlatformClient,
    PlatformProtocolError,
    PlatformRejected,
    PlatformUnavailable,
    PlatformUnreachable,
    UnknownAppliance,
)
from appliance.platform.http import ProxySettings
from appliance.platform.messages import Capabilities, PollRequest, PollResponse, RegisterRequest
from appliance.platform.retry import Backoff, Timings, poll_wait_s
from appliance.platform.sink import JobSink, PollWaker
from appliance.state.identity import Identity, IdentityStore, binding_verdict, clone_message
from appliance.state.runtime import StatusFile, later_iso, now_iso
from appliance.userdata import ProxySpec, UserData, parse_user_data

log = logging.getLogger("vsa.daemon")

IMDS_RETRY_CAP_S = 60.0
MEMORY_PER_HOST_MB = 128  # a host pipeline's working set, generously
HOSTS_PER_CPU = 8
MAX_PARALLEL_HOSTS = 256
MQTT_RECONNECT_CAP_S = 60.0  # a broker that is back is used again within a minute


class _Stopping(Exception):
    """Raised inside the daemon when SIGTERM/SIGINT asked it to stop (internal)."""


@dataclass(frozen=True)
class InstanceInfo:
    """What IMDS told the daemon (all None when IMDS is disabled)."""

    instance_id: str | None
    facts: dict[str, str | None]
    identity_document: str | None
    identity_pkcs7: str | None


EMPTY_FACTS: dict[str, str | None] = dict.fromkeys(
    ("instance_id", "region", "account_id", "availability_zone", "image_id", "instance_type",
     "private_ip", "mac", "vpc_id", "subnet_id")
)


# --- capabilities (pure where possible) ---


def local_instance_id(paths: tuple[str, ...] = ("/etc/machine-id", "/var/lib/dbus/machine-id")) -> str | None:
    """A stable stand-in for the instance ID where there is no IMDS: ``local-`` + a hash of the machine ID.

    The registration must be bound to something (PROTOCOL.md, Identity) and the
    platform binds codes to it; hashing keeps the raw machine ID private.
    """
    for path in paths:
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            return "local-" + hashlib.sha256(text.encode()).hexdigest()[:17]
    return None


def probe_raw_sockets() -> bool:
    """True when this process may open a raw socket (CAP_NET_RAW), by trying."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    except OSError:
        return False
    sock.close()
    return True


def memory_mb(meminfo: str | None = None) -> int:
    """Total memory in MiB, from /proc/meminfo, else from sysconf.

    A sandbox may hide /proc/meminfo (systemd's ProcSubset=pid does): the
    physical page count still tells the size, so capacity is never 0.
    """
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text(encoding="ascii")
        except OSError:
            meminfo = ""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024))
    except (ValueError, OSError):
        return 0


def default_max_parallel_hosts(cpus: int, mem_mb: int) -> int:
    """Hosts scanned at once: 8 per CPU, bounded by memory (128 MiB each) and by 256."""
    by_cpu = max(1, cpus) * HOSTS_PER_CPU
    by_memory = max(1, mem_mb // MEMORY_PER_HOST_MB)
    return max(1, min(by_cpu, by_memory, MAX_PARALLEL_HOSTS))


def capabilities(config: Config) -> Capabilities:
    """The register request's ``capabilities`` for this machine."""
    cpus = os.cpu_count() or 1
    mem = memory_mb()
    return Capabilities(
        raw_sockets=probe_raw_sockets(),
        cpus=cpus,
        memory_mb=mem,
        arch=platform_module.machine(),
        max_parallel_hosts=config.max_parallel_hosts or default_max_parallel_hosts(cpus, mem),
    )


# --- systemd ---


class Notifier:
    """sd_notify messages; a no-op without ``NOTIFY_SOCKET`` (sdnotify checks it)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier: Any = None
        if self.enabled:
            import sdnotify  # late: only under systemd

            self._notifier = sdnotify.SystemdNotifier()
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    def notify(self, message: str) -> None:
        """Send one notification (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1)."""
        if self._notifier is not None:
            self._notifier.notify(message)

    def status(self, text: str) -> None:
        """``STATUS=`` in words (one line)."""
        self.notify("STATUS=" + text.replace("\n", " ")[:200])


# --- the status file, written without ever stopping the daemon ---


class TolerantStatus:
    """The status file (``vsa status``) whose write failures never stop the daemon.

    A full disk (issue 11) made every ``status.update`` raise :class:`StateError`
    out of the poll loop, and the daemon exited. The status file is a window for
    the operator, not state the appliance depends on: a failed write is said
    once on the console and logged, the facts stay in memory, and the next write
    that succeeds brings the file up to date.
    """

    def __init__(self, status: StatusFile, console: Console) -> None:
        """Wrap ``status``; ``console`` hears about the first failure of a run of them."""
        self._status = status
        self._console = console
        self._failing = False

    @property
    def data(self) -> dict[str, Any]:
        """The status as last merged (in memory, whether or not it reached the disk)."""
        return self._status.data

    def update(self, **changes: Any) -> None:
        """Merge and write; a failed write is said once (until a write succeeds again)."""
        try:
            self._status.update(**changes)
        except StateError as exc:
            log.warning("the status file cannot be written: %s", exc)
            if not self._failing:
                self._failing = True
                self._console.say(f"the status file cannot be written ({exc}); `vsa status` shows old facts "
                                  "until it can; the daemon goes on")
            return
        if self._failing:
            self._failing = False
            self._console.say("the status file is written again")


# --- the daemon ---


class Daemon:
    """The appliance's lifecycle; every collaborator is handed in by :func:`main`."""

    def __init__(
        self,
        *,
        config: Config,
        console: Console,
        store: IdentityStore,
        status: StatusFile | TolerantStatus,
        sink: JobSink,
        waker: PollWaker,
        notifier: Notifier,
        timings: Timings,
        imds_factory: Callable[[], Any] | None,
        user_data_file: Path | None,
        client_factory: Callable[[ProxySpec | None], PlatformClient],
        capabilities: Capabilities,
        rng: random.Random | None = None,
        mqtt: MqttChannel | None = None,
    ) -> None:
        """Wire the daemon; nothing runs until :meth:`run`."""
        self.mqtt = mqtt  # the optional wake-up/event channel: started once registered, never waited for
        self.config = config
        self.console = console
        self.store = store
        self.status = status if isinstance(status, TolerantStatus) else TolerantStatus(status, console)
        self.sink = sink
        self.waker = waker
        self.notifier = notifier
        self.timings = timings
        self._imds_factory = imds_factory
        self._imds: Any = None
        self.user_data_file = user_data_file
        self._client_factory = client_factory
        self.client: PlatformClient | None = None
        self._client_proxy: ProxySpec | None = None
        self.capabilities = capabilities
        self.rng = rng or random.Random()
        self.stop_event = asyncio.Event()
        self.instance = InstanceInfo(None, dict(EMPTY_FACTS), None, None)
        self.identity: Identity | None = None
        self.user_data: UserData | None = None
        self.poll_interval_s: float = timings.default_poll_interval_s
        self._last_asked: float | None = None
        self._said: dict[str, str] = {}
        self._proxy_checked_at = 0.0

    # --- small helpers ---

    def say_once(self, topic: str, text: str) -> None:
        """Say ``text`` unless it is what was last said on ``topic`` (no console spam on retries)."""
        if self._said.get(topic) != text:
            self._said[topic] = text
            self.console.say(text)

    def forget_said(self, topic: str) -> None:
        """Let the next line on ``topic`` be said even if it repeats."""
        self._said.pop(topic, None)

    def phase(self, phase: str, detail: str | None = None) -> None:
        """Record the phase in the status file and in systemd's STATUS=."""
        self.status.update(phase=phase, detail=detail)
        self.notifier.status(f"{phase}: {detail}" if detail else phase)

    async def sleep(self, seconds: float) -> None:
        """Wait, or raise :class:`_Stopping` as soon as a stop is asked."""
        try:
            await asyncio.wait_for(self.stop_event.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            return
        raise _Stopping

    def check_stop(self) -> None:
        """Raise :class:`_Stopping` if a stop was asked."""
        if self.stop_event.is_set():
            raise _Stopping

    # --- lifecycle ---

    async def run(self) -> int:
        """Boot, register, poll until stopped; return the exit status (0 after a graceful stop)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        watchdog = asyncio.create_task(self._watchdog()) if self.notifier.watchdog_interval_s else None
        self.status.update(platform={"url": self.config.platform_url})
        self.console.say(f"vsa {__version__} starting")
        if self.timings.shortened:
            self.console.say(
                "test timings in force (VSA_POLL_INTERVAL_FLOOR_S / VSA_WAIT_CAP_S): not for production"
            )
        self.notifier.notify("READY=1")
        main = asyncio.create_task(self._main())
        stopper = asyncio.create_task(self.stop_event.wait())
        try:
            await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if main.done() and not main.cancelled():
                exc = main.exception()
                if exc is not None and not isinstance(exc, _Stopping):
                    raise exc
        finally:
            self.notifier.notify("STOPPING=1")
            for task in (main, stopper, watchdog):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(main, stopper, *([watchdog] if watchdog else []), return_exceptions=True)
            await self._close()
            self.status.update(daemon="stopped", phase="stopped", detail=None, poll={"next_at": None})
            self.console.say("stopped")
        return 0

    def _on_signal(self, signum: int) -> None:
        if not self.stop_event.is_set():
            self.console.say(f"{signal.Signals(signum).name} received: stopping")
            self.stop_event.set()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s or 1.0
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _close(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.aclose()  # retained `offline` first, while the loop still runs
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self._imds is not None:
            await self._imds.aclose()
            self._imds = None

    async def _main(self) -> None:
        await self.discover_instance()
        reachable = False
        connect_failures = 0
        while True:
            self.check_stop()
            # User-data is read again on every round: the operator may fix PERSCODE or PROXY_URL.
            user_data = await self.await_user_data()
            client = await self._client_for(user_data.proxy)
            if not reachable:
                if not await self.check_reachable(client, user_data):
                    connect_failures += 1
                    backoff = self.timings.backoff(self.timings.default_poll_interval_s)
                    await self.sleep(backoff.delay_s(connect_failures, rng=self.rng))
                    continue
                reachable = True
            identity = self.prepare_identity()
            if not identity.registered:
                wait_s = await self.register_once(client, identity, user_data)
                if wait_s is not None:
                    await self.sleep(wait_s)
                    continue
            else:
                client.use_certificate(identity.cert_path, identity.key_path)
                self.sink.use_platform(client)
            await self.poll_loop(client)
            if self.mqtt is not None and self.identity is None:
                await self.mqtt.use_identity(None)  # wiped: the old certificate is done with
            # After a 401 (identity wiped: register afresh) or a new PROXY_URL: start over from user-data.

    # --- IMDS ---

    async def discover_instance(self) -> None:
        """Probe IMDS (v2, else v1) and read the instance facts; retried until it answers."""
        self.phase("imds")
        if self._imds_factory is None:
            where = f"from {self.user_data_file}" if self.user_data_file else "nowhere (give --user-data FILE)"
            self.console.say(f"IMDS is disabled (imds.disabled): no instance facts; user-data comes {where}")
            local_id = local_instance_id()
            if local_id:
                facts = dict(EMPTY_FACTS, instance_id=local_id)
                self.instance = InstanceInfo(local_id, facts, None, None)
                self.console.say(f"no EC2 instance ID without IMDS: this machine is identified as {local_id}")
            self.status.update(imds="disabled", registration={"instance_id": local_id})
            return
        self._imds = self._imds_factory()
        backoff = Backoff(base_s=self.timings.backoff_base_s,
                          cap_s=min(IMDS_RETRY_CAP_S, self.timings.default_poll_interval_s))
        attempt = 0
        while True:
            self.check_stop()
            try:
                version = await self._imds.probe()
                raw_doc, _ = await self._imds.identity_document()
                pkcs7 = await self._imds.identity_pkcs7()
                facts = (await self._imds.instance_facts()).to_json()
                break
            except ImdsError as exc:
                attempt += 1
                self.status.update(imds="unavailable", detail=str(exc))
                self.say_once("imds", f"{exc} (the appliance keeps trying)")
                await self.sleep(backoff.delay_s(attempt, rng=self.rng))
        reason = (getattr(self._imds, "version_reason", None) or "").removeprefix("IMDSv1: ") or None
        if version == "v2":
            self.console.say("IMDSv2 in use (session tokens)")
        else:
            self.console.say(f"IMDSv1 in use{f' ({reason})' if reason else ' (this metadata service offers no IMDSv2 tokens)'}")
        self.instance = InstanceInfo(facts.get("instance_id"), facts, raw_doc, pkcs7)
        self.status.update(imds=version, registration={"instance_id": self.instance.instance_id})
        if self.user_data_file is not None:
            self.console.say(f"user-data comes from {self.user_data_file} (--user-data), not from IMDS")
        if self.instance.instance_id:
            self.console.say(f"running on instance {self.instance.instance_id}")

    # --- user-data ---

    async def read_user_data(self) -> bytes | None:
        """The raw user-data: from ``--user-data FILE`` or IMDS (None when there is none)."""
        if self.user_data_file is not None:
            try:
                return self.user_data_file.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise UserDataError(f"the user-data file {self.user_data_file} cannot be read: {exc.strerror}") from exc
        if self._imds is None:
            return None
        return await self._imds.user_data()

    async def await_user_data(self) -> UserData:
        """User-data with a valid PERSCODE; says what to add and rechecks every 5 minutes until then."""
        self.phase("user-data")
        source = f"file:{self.user_data_file}" if self.user_data_file else ("imds" if self._imds else None)
        self.status.update(user_data_source=source)
        while True:
            self.check_stop()
            problem: str | None = None
            try:
                raw = await self.read_user_data()
                if raw is None or not raw.strip():
                    where = str(self.user_data_file) if self.user_data_file else "the instance's user-data"
                    problem = (f"no user-data found: add the line PERSCODE=<your personalization code> to {where} "
                               "(EC2 console: Actions > Instance settings > Edit user data)")
                else:
                    user_data = parse_user_data(raw)
                    if user_data.perscode is None:
                        problem = ("user-data has no PERSCODE: add the line PERSCODE=<your personalization code> "
                                   "(from the platform) to the instance's user-data")
                    else:
                        self._accept_user_data(user_data)
                        return user_data
            except UserDataError as exc:
                problem = f"user-data cannot be used: {exc} - fix it; nothing is guessed"
            except ImdsError as exc:
                problem = f"user-data cannot be read from IMDS: {exc}"
            recheck = self.timings.userdata_recheck_s
            self.status.update(detail=problem, perscode=None)
            self.say_once("user-data", f"{problem}; checking again every {_human_s(recheck)}")
            await self.sleep(recheck)

    def _accept_user_data(self, user_data: UserData) -> None:
        register_secret(user_data.perscode)
        if user_data.proxy is not None:
            register_secret(user_data.proxy.password)
        previous = self.user_data
        self.user_data = user_data
        if previous is not None and previous.perscode == user_data.perscode and previous.proxy == user_data.proxy:
            return
        self.forget_said("user-data")
        masked = mask_perscode(user_data.perscode)
        code = user_data.perscode or ""
        ending = f"ending in {code[-4:]}" if len(code) > 8 else "shown as ****"
        self.console.say(f"personalization code found (PERSCODE {ending})")
        if user_data.proxy is not None:
            self.console.say(f"proxy for the platform: {user_data.proxy.display()}")
        else:
            self.console.say("no proxy (PROXY_URL not set): connecting to the platform directly")
        if user_data.unknown_keys:
            self.console.say(f"user-data keys ignored (unknown): {', '.join(user_data.unknown_keys)}")
        self.status.update(
            perscode=masked, proxy=user_data.proxy.display() if user_data.proxy else None
        )

    async def _client_for(self, proxy: ProxySpec | None) -> PlatformClient:
        if self.client is not None and proxy == self._client_proxy:
            return self.client
        if self.client is not None:
            await self.client.aclose()
        self.client = self._client_factory(proxy)
        self._client_proxy = proxy
        if self.identity is not None and self.identity.registered:
            self.client.use_certificate(self.identity.cert_path, self.identity.key_path)
        return self.client

    # --- connectivity ---

    async def check_reachable(self, client: PlatformClient, user_data: UserData) -> bool:
        """One connectivity check; the console's verdict ``reachable`` or ``unable to connect to HOST:PORT - please fix: ...``."""
        self.phase("connectivity")
        via = f" through the proxy {user_data.proxy.display()}" if user_data.proxy else ""
        try:
            await client.probe()
        except PlatformUnreachable as exc:
            self.status.update(platform={"reachable": False, "verdict": str(exc)}, detail=str(exc))
            self.say_once("connectivity", f"platform: {exc} (the appliance keeps trying)")
            return False
        except PlatformError as exc:  # an answer of any kind means the path works
            log.info("connectivity check answered oddly: %s", exc)
        verdict = f"reachable{via}"
        self.status.update(platform={"reachable": True, "verdict": verdict}, detail=None)
        self.forget_said("connectivity")
        self.console.say(f"platform {client.host}:{client.port}: {verdict}")
        return True

    # --- identity ---

    def prepare_identity(self) -> Identity:
        """The identity to use: never one bound to another instance; a fresh key when there is none."""
        self.phase("identity")
        current = self.instance.instance_id
        identity = self.store.load()
        if identity is not None:
            verdict = binding_verdict(identity.instance_id, current)
            if verdict == "moved":
                assert current is not None
                self.console.say(clone_message(identity.instance_id, current, registered=identity.registration is not None))
                aside = self.store.set_aside()
                log.info("old identity moved to %s", aside)
                identity = None
            elif verdict == "unchecked":
                self.say_once("binding", f"the instance ID is unknown (no IMDS): the identity bound to {identity.instance_id} cannot be checked")
        if identity is None:
            identity = self.store.create(current)
            self.console.say("a new appliance key was generated (P-256); it never leaves the state directory")
        self.identity = identity
        reg = identity.registration
        self.status.update(registration={
            "state": "registered" if identity.registered else "unregistered",
            "appliance_id": reg.appliance_id if reg else None,
            "instance_id": identity.instance_id,
            "registered_at": reg.registered_at if reg else None,
        })
        if identity.registered and reg is not None:
            self.console.say(f"registered as {reg.appliance_id} (since {reg.registered_at})")
            if reg.poll_interval_s is not None:
                self.poll_interval_s = self.timings.clamp_poll_interval(reg.poll_interval_s).interval_s
        return identity

    # --- register ---

    def register_request(self, identity: Identity, user_data: UserData) -> RegisterRequest:
        """The register body (PROTOCOL.md): perscode, CSR, instance facts, identity document, capabilities."""
        assert user_data.perscode is not None
        return RegisterRequest(
            perscode=user_data.perscode,
            csr_pem=identity.csr_pem(),
            instance=self.instance.facts,
            identity_document=self.instance.identity_document,
            identity_pkcs7=self.instance.identity_pkcs7,
            software_version=__version__,
            capabilities=self.capabilities,
        )

    async def register_once(self, client: PlatformClient, identity: Identity, user_data: UserData) -> float | None:
        """One registration attempt: None when registered, else how long to wait before the next."""
        self.phase("registering")
        self.status.update(registration={"state": "registering"})
        masked = mask_perscode(user_data.perscode)
        attempt = 0
        while True:
            self.check_stop()
            try:
                response = await client.register(self.register_request(identity, user_data))
            except InvalidPerscode as exc:
                wait = self.timings.invalid_perscode_retry_s
                words = (f"registration refused: the platform does not know the personalization code {masked} "
                         f"(403 invalid_perscode{': ' + exc.detail if exc.detail else ''}) - check PERSCODE in "
                         f"user-data or create the code on the platform; trying again every {_human_s(wait)}")
                return self._refused(words, wait)
            except PerscodeInUse as exc:
                wait = self.timings.perscode_in_use_retry_s
                words = (f"registration refused: the personalization code {masked} is bound to another instance "
                         f"(409 perscode_in_use: {exc.detail or 'no details given'}) - give this instance a code "
                         f"of its own in user-data, or free the code on the platform; trying again every {_human_s(wait)}")
                return self._refused(words, wait)
            except (PlatformUnavailable, PlatformUnreachable, PlatformProtocolError, PlatformRejected, UnknownAppliance) as exc:
                attempt += 1
                retry_after = exc.retry_after_s if isinstance(exc, PlatformUnavailable) else None
                delay = self.timings.backoff(self.poll_interval_s).delay_s(attempt, retry_after_s=retry_after, rng=self.rng)
                self.status.update(detail=str(exc))
                log.warning("registration failed (%d in a row): %s; next attempt in %.1f s", attempt, exc, delay)
                self.say_once("register", f"registration failed: {exc}; trying again with backoff")
                await self.sleep(delay)
                continue
            break
        try:
            identity = self.store.save_registration(
                identity,
                appliance_id=response.appliance_id,
                certificate_pem=response.certificate_pem,
                ca_pem=response.ca_pem,
                platform_url=client.base_url,
                poll_interval_s=response.poll_interval_s,
                mqtt=response.mqtt.to_json() if response.mqtt else None,
            )
        except StateError as exc:
            self.say_once("register", f"registration answer unusable: {exc}; registering again with a new key")
            self.store.wipe()
            return self.timings.backoff(self.poll_interval_s).delay_s(1, rng=self.rng)
        self.identity = identity
        client.use_certificate(identity.cert_path, identity.key_path)
        self.sink.use_platform(client)
        self.forget_said("register")
        reg = identity.registration
        assert reg is not None
        self.console.say(f"registered with the platform: appliance ID {reg.appliance_id}")
        self.status.update(registration={
            "state": "registered", "appliance_id": reg.appliance_id, "instance_id": identity.instance_id,
            "registered_at": reg.registered_at, "refusal": None,
        }, detail=None)
        return None

    def _refused(self, words: str, wait_s: float) -> float:
        self.status.update(registration={"state": "refused", "refusal": words}, detail=words)
        self.say_once("register", words)
        return wait_s

    # --- poll ---

    def poll_request(self) -> PollRequest:
        """The poll body from the identity, the instance and the job sink's snapshot."""
        identity = self.identity
        assert identity is not None and identity.registration is not None
        work = self.sink.snapshot()
        return PollRequest(
            appliance_id=identity.registration.appliance_id,
            instance_id=self.instance.instance_id or identity.instance_id,
            software_version=__version__,
            signatures_version=work.signatures_version,
            lan_ip=self.instance.facts.get("private_ip"),
            status=work.status,
            running_jobs=work.running_jobs,
            spool_pending=work.spool_pending,
        )

    async def poll_once(self, client: PlatformClient) -> PollResponse:
        """One poll: send the request, apply the interval, hand the work to the sink."""
        response = await client.poll(self.poll_request())
        clamp = self.timings.clamp_poll_interval(response.poll_interval_s)
        if response.poll_interval_s != self._last_asked:
            self._last_asked = response.poll_interval_s
            message = clamp.message()
            if message:
                self.console.say(message)
        if clamp.interval_s != self.poll_interval_s or "interval" not in self._said:
            self.poll_interval_s = clamp.interval_s
            self.say_once("interval", f"polling the platform every {_human_s(clamp.interval_s)}")
        if self.identity is not None:
            try:
                self.identity = self.store.update_poll_interval(self.identity, response.poll_interval_s)
            except StateError as exc:
                # Only a hint for the next start; a full disk here made the daemon exit (issue 11).
                log.warning("the new poll interval cannot be remembered: %s", exc)
        await self.sink.set_ec2_api_proxy(response.ec2_api_proxy)
        if response.cancel_jobs:
            await self.sink.cancel(response.cancel_jobs)
        if response.signatures_refused is not None:
            # Said once per offer; the jobs of this poll still run (with the installed bundle).
            refusal = response.signatures_refused.message
            self.say_once(f"signatures-refused:{refusal}", refusal)
        if response.signatures is not None:
            await self.sink.offer_signatures(response.signatures)
        if response.jobs or response.invalid_jobs:
            await self.sink.offer_jobs(response.jobs, response.invalid_jobs)
        return response

    async def poll_loop(self, client: PlatformClient) -> None:
        """Poll at once, then every interval (±10 %).

        Returns only when the platform forgot this appliance (401: the identity
        is wiped) or, while the platform is unreachable, when PROXY_URL changed
        in user-data; the caller then starts over from user-data.
        """
        self.phase("polling", None)
        if self.mqtt is not None:
            await self.mqtt.use_identity(self.identity)  # connects in the background (no-op if unchanged)
        failures = 0
        count = int(self.status.data["poll"]["count"])
        while True:
            self.check_stop()
            if self.identity is not None and not self.identity.key_path.exists():
                # `vsa reset` ran while the daemon was up: personalize afresh now.
                self.console.say("the identity was wiped (vsa reset): registering afresh with the code from user-data")
                self.identity = None
                client.use_certificate(None, None)
                self.sink.use_platform(None)
                self.status.update(registration={"state": "unregistered", "appliance_id": None, "registered_at": None})
                self.forget_said("interval")
                return
            attempt_at = now_iso()
            try:
                response = await self.poll_once(client)
            except UnknownAppliance as exc:
                self.console.say(
                    f"the platform does not know this appliance any more ({exc.status} {exc.code or 'unknown_appliance'}"
                    f"{': ' + exc.detail if exc.detail else ''}): wiping the identity (not the spool or job journal) "
                    "and registering again with the code from user-data"
                )
                self.store.wipe()
                self.identity = None
                client.use_certificate(None, None)
                self.sink.use_platform(None)
                self.status.update(
                    registration={"state": "unregistered", "appliance_id": None, "registered_at": None},
                    poll={"last_at": attempt_at, "last_result": str(exc)},
                )
                self.forget_said("interval")
                return
            except (PlatformUnavailable, PlatformUnreachable, PlatformProtocolError, PlatformRejected, PlatformError) as exc:
                failures += 1
                retry_after = exc.retry_after_s if isinstance(exc, PlatformUnavailable) else None
                delay = self.timings.backoff(self.poll_interval_s).delay_s(failures, retry_after_s=retry_after, rng=self.rng)
                log.warning("poll failed (%d in a row): %s; next attempt in %.1f s", failures, exc, delay)
                if failures == 1:
                    self.console.say(f"poll failed: {exc}; retrying with backoff (next in {_human_s(delay)})")
                self.status.update(poll={
                    "last_at": attempt_at, "last_result": str(exc), "consecutive_failures": failures,
                    "next_at": later_iso(delay),
                })
                self.notifier.status(f"polling: last poll failed ({failures} in a row)")
                await self._wait_next_poll(delay)
                if isinstance(exc, PlatformUnreachable) and await self._proxy_changed():
                    self.console.say("PROXY_URL changed in user-data: connecting through the new setting")
                    return
                continue
            count += 1
            if failures:
                self.console.say(f"the platform answers again (after {failures} failed poll{'s' if failures > 1 else ''})")
            failures = 0
            wait = poll_wait_s(self.poll_interval_s, self.rng)
            self.status.update(
                poll={
                    "interval_s": self.poll_interval_s, "asked_s": response.poll_interval_s, "count": count,
                    "last_at": attempt_at, "last_result": "ok", "last_ok_at": attempt_at,
                    "next_at": later_iso(wait), "consecutive_failures": 0,
                },
                detail=None,
            )
            self.publish_work()
            self.notifier.status(f"polling every {_human_s(self.poll_interval_s)}; last poll ok")
            await self._wait_next_poll(wait)

    async def _proxy_changed(self) -> bool:
        """While the platform is unreachable: has the operator changed PROXY_URL? (checked every 5 minutes)."""
        now = asyncio.get_running_loop().time()
        if now - self._proxy_checked_at < self.timings.userdata_recheck_s:
            return False
        self._proxy_checked_at = now
        try:
            raw = await self.read_user_data()
            fresh = parse_user_data(raw) if raw else None
        except (UserDataError, ImdsError) as exc:
            log.info("user-data re-check failed: %s", exc)
            return False
        return fresh is not None and fresh.perscode is not None and fresh.proxy != self._client_proxy

    def publish_work(self) -> None:
        """Write the sink's snapshot (running jobs, spool backlog, signatures) to the status file.

        Called after every poll; the job engine may call it too when progress
        changes between polls, so that ``vsa status`` stays current.
        """
        work = self.sink.snapshot()
        self.status.update(
            jobs=[job.to_json() for job in work.running_jobs],
            spool_pending=work.spool_pending,
            signatures_version=work.signatures_version,
        )

    async def _wait_next_poll(self, seconds: float) -> None:
        stop = asyncio.create_task(self.stop_event.wait())
        wake = asyncio.create_task(self.waker.wait(seconds))
        try:
            await asyncio.wait({stop, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, wake):
                task.cancel()
            await asyncio.gather(stop, wake, return_exceptions=True)
        self.check_stop()


def _human_s(seconds: float) -> str:
    if seconds >= 120 and seconds % 60 == 0:
        return f"{int(seconds // 60)} minutes"
    if seconds >= 10 or seconds == int(seconds):
        return f"{round(seconds)} s"
    return f"{seconds:.1f} s"


# --- composition root ---


@dataclass(frozen=True)
class SinkContext:
    """What the composition root hands a job sink factory (the job engine) when it builds it."""

    config: Config
    console: Console
    store: IdentityStore  # the appliance key for JWE auth records: store.load().key_path
    waker: PollWaker  # waker.wake() asks for a poll now (a job ended, MQTT said so)
    # Progress events for MQTT (events.publish_progress(job_id, phase, hosts_total, hosts_done)):
    # non-blocking, dropped while no broker is connected.
    events: EventPublisher = field(default_factory=NullPublisher)


def build_daemon(
    config: Config,
    *,
    user_data_file: Path | None,
    environ: Mapping[str, str],
    console: Console | None = None,
    sink_factory: Callable[[SinkContext], JobSink] | None = None,
) -> Daemon:
    """Build every collaborator and hand them to a :class:`Daemon` (the composition root).

    ``sink_factory`` builds the job sink; without it the job engine
    (:func:`appliance.scan.engine.build_engine`) runs the jobs. The console
    stand-in :class:`ConsoleJobSink` remains for tests that want no engine.
    """
    from appliance.aws.imds import ImdsClient  # late: keeps `vsa status` light

    console = console or Console()
    if config.platform_url is None:
        raise VsaError(
            "no platform URL is configured: set platform.url in /etc/vsa/appliance.toml (or --config FILE) "
            "or the environment variable VSA_PLATFORM_URL"
        )
    platform_url = config.platform_url

    def client_factory(proxy: ProxySpec | None) -> PlatformClient:
        return PlatformClient(
            platform_url,
            ca_file=config.platform_ca_file,
            proxy=ProxySettings.from_spec(proxy),
            proxy_display=proxy.display() if proxy else None,
        )

    imds_factory = None if config.imds_disabled else (lambda: ImdsClient.from_config(config))
    status = TolerantStatus(StatusFile(config.state_dir), console)  # MQTT writes it too
    store = IdentityStore(config.state_dir)
    waker = PollWaker()
    timings = Timings.from_env(environ)
    mqtt = MqttChannel(console=console, waker=waker, config_url=config.mqtt_url,
                       platform_ca_file=config.platform_ca_file, status=status,
                       reconnect=timings.backoff(min(MQTT_RECONNECT_CAP_S, timings.default_poll_interval_s)))
    context = SinkContext(config=config, console=console, store=store, waker=waker, events=mqtt)
    if sink_factory is None:
        from appliance.scan.engine import build_engine  # late: keeps `vsa status` light

        sink_factory = build_engine
    sink = sink_factory(context)
    daemon = Daemon(
        config=config,
        console=console,
        store=store,
        status=status,
        sink=sink,
        waker=waker,
        notifier=Notifier(environ),
        timings=timings,
        imds_factory=imds_factory,
        user_data_file=user_data_file,
        client_factory=client_factory,
        capabilities=capabilities(config),
        mqtt=mqtt,
    )
    if hasattr(sink, "publish"):
        sink.publish = daemon.publish_work  # the engine refreshes `vsa status` between polls
    if hasattr(sink, "own_vpc_ids"):
        # Overlapping addresses (PROTOCOL.md): the instance in the appliance's own VPC is the one scanned.
        sink.own_vpc_ids = lambda: tuple(v for v in (daemon.instance.facts.get("vpc_id"),) if v)
    return daemon


def main(args: argparse.Namespace) -> int:
    """``vsa run [--config FILE] [--user-data FILE]``: the daemon in the foreground."""
    setup_logging()
    console = Console()
    try:
        config = load_config(getattr(args, "config", None))
        user_data_file = Path(args.user_data) if getattr(args, "user_data", None) else None
        from appliance.state.files import ensure_private_dir

        ensure_private_dir(config.state_dir)
        daemon = build_daemon(config, user_data_file=user_data_file, environ=os.environ, console=console)
    except VsaError as exc:
        console.say(f"cannot start: {exc}")
        return 1
    try:
        return asyncio.run(daemon.run())
    except KeyboardInterrupt:
        return 0
    except VsaError as exc:
        console.say(f"stopped on an error: {exc}")
        log.exception("the daemon stopped on an error")
        return 1
    except Exception as exc:  # a bug: say it in words, keep the (scrubbed) traceback in the journal
        console.say(f"stopped on an internal error ({type(exc).__name__}); the journal has the details")
        log.exception("the daemon stopped on an internal error")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(argparse.Namespace(config=None, user_data=None)))
