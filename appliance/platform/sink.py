"""Where the poll loop hands work: the :class:`JobSink` interface the job engine implements.

The daemon's poll loop parses each poll response at the edge and then calls the
sink, in this order, awaiting each call (PROTOCOL.md: a new bundle is installed
before any job of the same response starts):

1. ``set_ec2_api_proxy(proxy or None)``  every successful poll (None clears it)
2. ``cancel(job_ids)``                   when ``cancel_jobs`` is not empty
3. ``offer_signatures(offer)``           when ``signatures`` is not null
4. ``offer_jobs(jobs, invalid)``         when ``jobs`` is not empty (parsed ones and malformed ones)

and before every poll ``snapshot()`` for the request's ``status``,
``running_jobs``, ``spool_pending`` and ``signatures_version``. ``use_platform(client)``
hands it the current :class:`~appliance.platform.client.PlatformClient` for its own
calls (accept, hosts, progress, complete through ``client.call``). The sink may ask
for an early poll through the :class:`PollWaker` the composition root gives it
(after a job ends, or when MQTT says "wake").

Until the job engine exists, :class:`ConsoleJobSink` says on the console what
was offered and accepts nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from appliance.console import Console
from appliance.platform.client import PlatformClient
from appliance.platform.messages import (
    Ec2ApiProxy,
    InvalidJob,
    JobSpec,
    RunningJob,
    SignaturesOffer,
)

log = logging.getLogger("vsa.jobs")


@dataclass(frozen=True)
class WorkSnapshot:
    """What the appliance is doing, for the poll request and ``vsa status``."""

    running_jobs: tuple[RunningJob, ...] = ()
    spool_pending: int = 0
    signatures_version: str | None = None

    @property
    def status(self) -> Literal["idle", "scanning"]:
        """``scanning`` while any job runs, else ``idle``."""
        return "scanning" if self.running_jobs else "idle"


@runtime_checkable
class JobSink(Protocol):
    """What the poll loop needs from the job engine."""

    def snapshot(self) -> WorkSnapshot:
        """The current work, cheap and non-blocking (called before every poll)."""
        ...

    def use_platform(self, client: PlatformClient | None) -> None:
        """The client for authenticated job calls (``client.call``) from now on; None while unregistered.

        Called whenever the daemon's client or its certificate changes (registration,
        a 401 wipe, a new PROXY_URL), so the engine never holds a stale one.
        """
        ...

    async def set_ec2_api_proxy(self, proxy: Ec2ApiProxy | None) -> None:
        """The proxy for STS/EC2 the platform wants used from now on (None: direct)."""
        ...

    async def cancel(self, job_ids: Sequence[str]) -> None:
        """Stop these jobs now and drop their unsent results."""
        ...

    async def offer_signatures(self, offer: SignaturesOffer) -> None:
        """A knowledge-base bundle is offered; return once it is installed or refused."""
        ...

    async def offer_jobs(self, jobs: Sequence[JobSpec], invalid: Sequence[InvalidJob]) -> None:
        """Jobs are offered: accept the ones to run (``invalid`` ones are failed fast)."""
        ...


class PollWaker:
    """Lets anyone ask the poll loop to poll now instead of at the end of its interval."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        """Poll as soon as possible."""
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; True when woken early (the request is consumed)."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            return False
        self._event.clear()
        return True


class ConsoleJobSink:
    """The stand-in until the job engine exists: says what was offered, accepts nothing."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._seen: set[str] = set()
        self._proxy: Ec2ApiProxy | None = None
        self._signatures_seen: str | None = None
        self._client: PlatformClient | None = None

    def snapshot(self) -> WorkSnapshot:
        """Nothing runs: idle, empty spool, no signatures."""
        return WorkSnapshot()

    def use_platform(self, client: PlatformClient | None) -> None:
        """Nothing to call the platform for."""
        self._client = client

    async def set_ec2_api_proxy(self, proxy: Ec2ApiProxy | None) -> None:
        """Remember the proxy; say so when it changes (its password masked)."""
        if proxy != self._proxy:
            self._proxy = proxy
            if proxy is not None:
                self._console.say(f"the platform set the proxy for AWS API calls: {proxy.display()}")

    async def cancel(self, job_ids: Sequence[str]) -> None:
        """Nothing runs, so there is nothing to cancel."""
        for job_id in job_ids:
            log.info("the platform asked to cancel %s, which is not running here", job_id)

    async def offer_signatures(self, offer: SignaturesOffer) -> None:
        """Say once that a bundle is offered and not installed."""
        if offer.version != self._signatures_seen:
            self._signatures_seen = offer.version
            self._console.say(
                f"signatures {offer.version} offered: not installed (the knowledge-base installer is not built yet)"
            )

    async def offer_jobs(self, jobs: Sequence[JobSpec], invalid: Sequence[InvalidJob]) -> None:
        """Say once per job what was offered; accept none."""
        for job in jobs:
            if job.job_id in self._seen:
                continue
            self._seen.add(job.job_id)
            title = f' "{job.title}"' if job.title else ""
            self._console.say(
                f"job offered: {job.job_id} ({job.type}{title}) - not accepted (the job engine is not built yet)"
            )
        for bad in invalid:
            key = bad.job_id or f"?{bad.error.field}"
            if key in self._seen:
                continue
            self._seen.add(key)
            self._console.say(
                f"job offered: {bad.job_id or '(no valid job ID)'} is invalid ({bad.message}) - "
                "not accepted (the job engine is not built yet)"
            )
