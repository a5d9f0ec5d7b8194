"""When to talk to the platform again: the backoff policy and the poll timing, as values.

PROTOCOL.md, Retries: a request that failed for the network, TLS, ``429``,
``503`` or another ``5xx`` is retried with exponential backoff and full jitter,
capped at the poll interval, honouring ``Retry-After``. After
amazon-ssm-agent's ``backoffconfig``: the policy is a value whose worst case can
be computed, and nothing here sleeps or does I/O (the daemon does).

The poll interval the platform sets is clamped to 30..3600 s (saying so, naming
the value) and each wait gets ±10 % jitter so that a fleet does not poll in step.

Test-only knobs (documented in docs and the tests' README; never set in production):

- ``VSA_POLL_INTERVAL_FLOOR_S``: lowers the clamp floor (30 s) so that tests
  can poll every second or two. Honoured only when set.
- ``VSA_WAIT_CAP_S``: caps every fixed wait (user-data recheck 5 min, 403 retry
  5 min, 409 retry 15 min, the backoff cap before the first poll interval is
  known) so that the refusal cases can be shown in seconds. Honoured only when set.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

POLL_INTERVAL_MIN_S = 30
POLL_INTERVAL_MAX_S = 3600
DEFAULT_POLL_INTERVAL_S = 180  # before the platform has said anything (PROTOCOL.md's example)
POLL_JITTER_FRACTION = 0.10
BACKOFF_BASE_S = 1.0
BACKOFF_MULTIPLIER = 2.0
# A Retry-After beyond an hour is not a plan, it is a malfunction: wait an hour.
RETRY_AFTER_MAX_S = 3600.0
USERDATA_RECHECK_S = 300  # RUNTIME.md: no PERSCODE → keep checking every 5 minutes
INVALID_PERSCODE_RETRY_S = 300  # PROTOCOL.md: 403 invalid_perscode → every 5 minutes
PERSCODE_IN_USE_RETRY_S = 900  # PROTOCOL.md: 409 perscode_in_use → every 15 minutes

FLOOR_ENV = "VSA_POLL_INTERVAL_FLOOR_S"
WAIT_CAP_ENV = "VSA_WAIT_CAP_S"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base·mult^(n-1)))."""

    base_s: float = BACKOFF_BASE_S
    cap_s: float = DEFAULT_POLL_INTERVAL_S
    multiplier: float = BACKOFF_MULTIPLIER
    retry_after_max_s: float = RETRY_AFTER_MAX_S

    def ceiling_s(self, attempt: int) -> float:
        """The upper bound of the wait after failed attempt ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        # Stop growing before the float overflows; the cap has long been reached.
        if exponent > 60:
            return self.cap_s
        return min(self.cap_s, self.base_s * self.multiplier**exponent)

    def delay_s(
        self,
        attempt: int,
        *,
        retry_after_s: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """The wait after failed attempt ``attempt``.

        ``Retry-After`` from the platform wins when given (bounded by
        ``retry_after_max_s``): the platform knows when it will be ready.
        Otherwise full jitter, uniform in [0, ceiling].
        """
        if retry_after_s is not None:
            return max(0.0, min(retry_after_s, self.retry_after_max_s))
        return (rng or random).uniform(0.0, self.ceiling_s(attempt))

    def worst_case_total_s(self, attempts: int) -> float:
        """The longest ``attempts`` consecutive waits can take without Retry-After."""
        return sum(self.ceiling_s(n) for n in range(1, attempts + 1))

    def with_cap(self, cap_s: float) -> Backoff:
        """The same policy capped at ``cap_s`` (the current poll interval)."""
        return Backoff(self.base_s, max(self.base_s, cap_s), self.multiplier, self.retry_after_max_s)


@dataclass(frozen=True)
class ClampResult:
    """A poll interval after clamping, and what to tell the operator when it was changed."""

    interval_s: float
    asked_s: float
    clamped: bool

    def message(self) -> str | None:
        """The console line when the platform's value was out of range, else None."""
        if not self.clamped:
            return None
        return (
            f"the platform asked for a poll interval of {_seconds(self.asked_s)} s; "
            f"using {_seconds(self.interval_s)} s (allowed {POLL_INTERVAL_MIN_S}..{POLL_INTERVAL_MAX_S} s)"
        )


@dataclass(frozen=True)
class Timings:
    """Every interval the daemon waits, in one value (tests shorten it through two env knobs)."""

    poll_floor_s: float = POLL_INTERVAL_MIN_S
    poll_ceiling_s: float = POLL_INTERVAL_MAX_S
    userdata_recheck_s: float = USERDATA_RECHECK_S
    invalid_perscode_retry_s: float = INVALID_PERSCODE_RETRY_S
    perscode_in_use_retry_s: float = PERSCODE_IN_USE_RETRY_S
    default_poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    backoff_base_s: float = BACKOFF_BASE_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Timings:
        """Production timings, shortened by the test-only knobs when they are set."""
        timings = cls()
        floor = _positive_float(environ.get(FLOOR_ENV))
        cap = _positive_float(environ.get(WAIT_CAP_ENV))
        values = timings.__dict__.copy()
        if floor is not None:
            values["poll_floor_s"] = min(floor, POLL_INTERVAL_MIN_S)
        if cap is not None:
            for name in ("userdata_recheck_s", "invalid_perscode_retry_s", "perscode_in_use_retry_s", "default_poll_interval_s"):
                values[name] = min(values[name], cap)
            values["backoff_base_s"] = min(values["backoff_base_s"], cap)
        return cls(**values)

    @property
    def shortened(self) -> bool:
        """True when a test knob changed anything (the daemon says so at start)."""
        return self != Timings()

    def clamp_poll_interval(self, asked_s: float) -> ClampResult:
        """Clamp the platform's ``poll_interval_s`` to 30..3600 s (the floor lower under the test knob)."""
        value = min(max(float(asked_s), self.poll_floor_s), self.poll_ceiling_s)
        return ClampResult(interval_s=value, asked_s=float(asked_s), clamped=value != asked_s)

    def backoff(self, cap_s: float) -> Backoff:
        """The backoff policy capped at ``cap_s`` (the poll interval in force)."""
        return Backoff(base_s=self.backoff_base_s).with_cap(cap_s)


def poll_wait_s(interval_s: float, rng: random.Random | None = None) -> float:
    """The wait before the next poll: ``interval_s`` ±10 % (uniform)."""
    spread = interval_s * POLL_JITTER_FRACTION
    return (rng or random).uniform(interval_s - spread, interval_s + spread)


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _positive_float(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 else None


__all__ = [
    "Backoff",
    "ClampResult",
    "Timings",
    "parse_retry_after",
    "poll_wait_s",
]
