"""The result sender: PUTs spooled host results beside scanning (PROTOCOL.md, Retries).

One background task per daemon. It reads unsent results from the durable
spool (:mod:`appliance.state.spool`) and sends each with
``PUT /vsa/v1/jobs/{job_id}/hosts/{host_key}``:

- ``2xx``: the result's *version* is marked sent (a newer copy spooled
  meanwhile stays unsent and goes out again);
- ``404``, ``409`` (``job_not_accepted``) and ``410``: the platform ended the
  appliance's interest in the job: the engine is told (it stops the job and
  drops what it spooled, with a console line);
- ``429``, ``5xx`` and network trouble: backoff with full jitter, honouring
  ``Retry-After``, retried without a limit in time. The results sit in the
  spool meanwhile and scanning goes on: the scan never waits for the sender.
- another refusal of one result (a ``400``: a bug on one side) is logged and
  that result alone is retried later, on a slow schedule of its own, so it
  never holds up the results queued behind it; it stays in the spool.

The sender never decides what to send: the spool does. After a restart it
simply finds the unsent rows again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from appliance.errors import PlatformError, StateError
from appliance.platform.client import PlatformClient, PlatformUnavailable, UnknownAppliance
from appliance.platform.retry import Backoff
from appliance.state.spool import Spool, SpooledResult

log = logging.getLogger("vsa.sender")

SEND_BATCH = 64  # rows read from the spool at a time
SEND_CONCURRENCY = 4  # PUTs in flight at once (the platform is one server; keep it gentle)
IDLE_WAIT_S = 5.0  # re-check the spool this often even without a wake-up
ENDS_INTEREST = (404, 409, 410)
REJECTED_RETRY_FIRST_S = 60.0  # a refused result is tried again after this, doubling each time
REJECTED_RETRY_MAX_S = 3600.0

# (job_id, status, error code, message) -> None: the platform ended interest in the job.
InterestEnded = Callable[[str, int, str | None, str | None], Awaitable[None]]


def host_path(job_id: str, host_key: str) -> str:
    """The PUT path of one host's result (host keys are IPs or instance IDs; IPv6 colons are quoted)."""
    return f"/vsa/v1/jobs/{quote(job_id, safe='')}/hosts/{quote(host_key, safe='')}"


def error_code(body: object) -> str | None:
    """The ``error`` code of a platform error body, if any."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return None


def error_message(body: object) -> str | None:
    """The ``message`` of a platform error body, if any."""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return None


class ResultSender:
    """Sends the spool's unsent results to the platform, beside scanning, until stopped."""

    def __init__(
        self,
        spool: Spool,
        *,
        backoff: Backoff,
        on_interest_ended: InterestEnded,
        is_live: Callable[[str], bool],
        rng: random.Random | None = None,
    ) -> None:
        """``is_live(job_id)`` False means the job was canceled/dropped: its rows are skipped."""
        self.spool = spool
        self.backoff = backoff
        self.on_interest_ended = on_interest_ended
        self.is_live = is_live
        self.rng = rng or random.Random()
        self.client: PlatformClient | None = None
        self._wake = asyncio.Event()
        self._failures = 0
        # (job_id, host_key, version) -> (refusals so far, monotonic time of the next try)
        self._rejected: dict[tuple[str, str, int], tuple[int, float]] = {}
        self.sent = 0
        self.last_error: str | None = None

    def wake(self) -> None:
        """New results are in the spool (or the client changed): look now."""
        self._wake.set()

    async def _idle(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            pass
        self._wake.clear()

    async def run(self) -> None:
        """The sender loop (a task); cancel it to stop."""
        while True:
            client = self.client
            if client is None:
                await self._idle(IDLE_WAIT_S)
                continue
            try:
                now = asyncio.get_running_loop().time()
                # Read past the refused results waiting for their own retry time.
                rows = [r for r in self.spool.unsent(limit=SEND_BATCH + len(self._rejected))
                        if self.is_live(r.job_id) and self._due(r, now)]
            except StateError as exc:
                log.error("the spool cannot be read: %s", exc)
                await self._idle(IDLE_WAIT_S)
                continue
            if not rows:
                await self._idle(IDLE_WAIT_S)
                continue
            try:
                delay = await self._send_batch(client, rows)
            except StateError as exc:
                # Marking a result sent can fail on a full disk (issue 11): the platform holds it,
                # the spool says unsent, so it is sent again later (PUT is idempotent). The sender
                # must outlive this, or nothing would ever be sent again.
                log.error("the spool cannot record what was sent: %s", exc)
                await self._idle(IDLE_WAIT_S)
                continue
            if delay is not None:
                await asyncio.sleep(delay)

    def _due(self, row: SpooledResult, now: float) -> bool:
        refused = self._rejected.get((row.job_id, row.host_key, row.version))
        return refused is None or refused[1] <= now

    async def _send_batch(self, client: PlatformClient, rows: list[SpooledResult]) -> float | None:
        """Send ``rows``; the backoff delay when the platform cannot take them now, else None."""
        limit = asyncio.Semaphore(SEND_CONCURRENCY)
        trouble: list[PlatformError] = []

        async def one(row: SpooledResult) -> None:
            async with limit:
                if trouble or not self.is_live(row.job_id):
                    return  # the platform is struggling: leave the rest for after the backoff
                try:
                    status, body = await client.call(
                        "PUT", host_path(row.job_id, row.host_key), row.body,
                        what=f"host result {row.host_key} of job {row.job_id}",
                    )
                except PlatformError as exc:
                    trouble.append(exc)
                    return
                await self._answered(row, status, body)

        await asyncio.gather(*(one(r) for r in rows))
        if not trouble:
            if self._failures:
                log.info("the platform takes host results again (after %d failed rounds)", self._failures)
            self._failures = 0
            self.last_error = None
            return None
        self._failures += 1
        exc = trouble[0]
        self.last_error = str(exc)
        retry_after = exc.retry_after_s if isinstance(exc, PlatformUnavailable) else None
        delay = self.backoff.delay_s(self._failures, retry_after_s=retry_after, rng=self.rng)
        level = logging.WARNING if self._failures == 1 or isinstance(exc, UnknownAppliance) else logging.INFO
        log.log(level, "sending host results failed (%d in a row): %s; next attempt in %.1f s",
                self._failures, exc, delay)
        return delay

    async def _answered(self, row: SpooledResult, status: int, body: object) -> None:
        key = (row.job_id, row.host_key, row.version)
        if 200 <= status < 300:
            self.spool.mark_sent(row.job_id, row.host_key, row.version)
            self._rejected.pop(key, None)
            self.sent += 1
            return
        if status in ENDS_INTEREST:
            await self.on_interest_ended(row.job_id, status, error_code(body), error_message(body))
            return
        # Another 4xx (a 400 is a bug on one side): this result alone waits, on a slow
        # schedule of its own, so that it never holds up the results queued behind it.
        count = self._rejected.get(key, (0, 0.0))[0] + 1
        wait_s = min(REJECTED_RETRY_MAX_S, REJECTED_RETRY_FIRST_S * 2 ** (count - 1))
        self._rejected[key] = (count, asyncio.get_running_loop().time() + wait_s)
        self.last_error = (
            f"host result {row.host_key} of job {row.job_id}: the platform answered {status} "
            f"{error_code(body) or ''} {error_message(body) or ''}".strip()
        )
        log.error("%s; it stays in the spool and is tried again in %.0f s", self.last_error, wait_s)
