"""The job engine: offered job → accepted → scanned → spooled → sent → completed (PROTOCOL.md).

:class:`JobEngine` implements the daemon's :class:`~appliance.platform.sink.JobSink`.
For each job it runs one task through these steps, each durable before the
next (DESIGN.md, "durable before acknowledged"):

1. **Journal, then accept.** The job is written to the journal (state
   ``offered``) before ``POST .../accept``. ``200``: the platform's
   authoritative spec replaces the journaled one, state ``running``.
   ``404``/``409``/``410``: dropped (another appliance has it, or it is gone).
2. **Validate.** A malformed spec (the poll's :class:`InvalidJob`, a field the
   scan options, targets, EC2 selection or an auth record refuse) fails fast:
   *the job is still accepted*, since only the holder of a job may complete it
   and PROTOCOL.md wants it completed ``failed``/``internal_error`` with a
   message naming the field. The daemon keeps running.
3. **Resolve** (phase ``resolving``): ``targets.ips`` minus ``exclude`` and the
   scope (RUNTIME.md: forbidden ranges and the appliance's own addresses unless
   ``scan.allow_targets`` lists them); ``targets.hostnames`` resolved now, every
   address scanned with ``target.hostname`` set; the EC2 selection through
   STS/EC2 with the ``ec2_api_proxy`` of the last poll. A failed resolution
   does not stop the job: the rest is scanned and the job completes ``failed``,
   ``target_resolution_failed``, with the words of the failure.
4. **Scan** in batches of *P* hosts, *P* = the job's ``max_parallel_hosts``
   bounded by the appliance's capacity (``scan.max_parallel_hosts``, else from
   CPUs and memory): the host+port pipeline
   (:func:`appliance.scan.portscan.scan_scoped`), then, for ``vm_scan`` only,
   the authenticated checks (:mod:`appliance.scan.hostchecks`) of each scanned
   host, at most *P* at once, while the next batch's ports are scanned. Each
   batch's port scan and each host's checks are bounded by ``host_timeout_s``.
   The whole job is bounded by a deadline of
   ``2 × host_timeout_s × (batches + 1) + 300 s`` (a safety net: each batch
   costs at most two host timeouts); past it, every host without a result gets
   status ``error`` and the job completes ``failed``/``timeout``.
   **Every targeted host gets exactly one HostResult**, put in the spool
   before anything sends it.
5. **Send** (the :class:`~appliance.scan.sender.ResultSender`, beside
   scanning) and **complete** (phase ``uploading``): once nothing of the job
   is unsent, ``POST .../complete`` with ``host_keys`` = every host of the job
   (all sent by then). ``200``: the job's rows leave the spool.
   ``409 missing_hosts``: those are marked unsent, sent again, and the job
   completes again. Completions are retried without a limit in time.

**Cancel** (``cancel_jobs`` in a poll, or ``410`` on a PUT): the job's task
stops at once, its spooled results are discarded (sent or not) and **no
completion is sent**: the platform already considers the job canceled and
would answer ``410``. A console line says so.

**Restart** at any instant resumes from the journal: ``offered`` jobs are
accepted again (a re-accept is ``200`` for the holder), ``running`` jobs
resolve their targets again and scan only the hosts with no result in the
spool, ``completing`` jobs send what is unsent and complete.

**A full disk** (issue 11): a spool write that fails for want of space
(:class:`SpoolFullError`, wherever it happens: a host's result, the journal,
a state change) pauses the job that met it and puts the engine in a
*disk full* state, said once on the console. While in it, offered jobs are not
accepted (not even journaled; the platform offers them again), and what the
spool already holds stays and is still sent. A watcher looks at the free space
every few seconds; once it is back, the engine says so, accepts work again and
resumes the paused jobs from the journal (scanning only hosts with no result
spooled, as after a restart). Nothing accepted is lost: a host whose result
could not be written is simply scanned again.

Console lines (RUNTIME.md): each job accepted, finished (with counts), failed
(with the reason), canceled or dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import importlib
import ipaddress
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from appliance.authrecords import AuthRecord, AuthRecordError, parse_auth_record
from appliance.config import Config
from appliance.console import Console
from appliance.errors import PlatformError, StateError, VsaError
from appliance.platform.client import PlatformClient
from appliance.platform.http import decode_json
from appliance.platform.messages import (
    Ec2ApiProxy,
    InvalidJob,
    JobSpec,
    MessageError,
    RunningJob,
    SignaturesOffer,
)
from appliance.platform.retry import Backoff, Timings
from appliance.platform.sink import PollWaker, WorkSnapshot
from appliance.results import HostResult, Target
from appliance.scan.sender import ENDS_INTEREST, ResultSender, error_code, error_message
from appliance.state.spool import JournaledJob, Spool, SpoolFullError

log = logging.getLogger("vsa.engine")

PROGRESS_INTERVAL_S = 2.0  # at most one progress POST (and status refresh) per job this often
PROGRESS_TIMEOUT_S = 10.0  # progress is best effort: never waited on for long
RESOLUTION_ALLOWANCE_S = 300.0  # target resolution (STS/EC2, DNS) in the job deadline
DEADLINE_HOST_TIMEOUTS_PER_BATCH = 2  # a batch: one port scan and one round of checks
COMPLETE_POLL_S = 0.25  # how often the completion step looks whether everything is sent
SIGNATURES_RETRY_S = 600.0  # a refused/failed bundle version is tried again after this long
DISK_RECHECK_S = 2.0  # while the state directory's disk is full: how often free space is looked at
DISK_FREE_MIN_BYTES = 1024 * 1024  # free space that counts as "freed" (a job journal and some results)
INTERNAL_ERROR = "internal_error"
ZERO_SUMMARY = {"hosts_targeted": 0, "hosts_alive": 0, "hosts_excluded": 0, "hosts_scanned": 0, "findings": 0}


class JobInvalid(VsaError):
    """The job cannot run as specified; the message names the field (fail fast, internal_error)."""


# --- pure decisions ----------------------------------------------------------------------------


def job_deadline_s(hosts: int, parallel: int, host_timeout_s: float) -> float:
    """The job's deadline in seconds: ``2 × host_timeout_s × (batches + 1) + 300``."""
    batches = math.ceil(max(0, hosts) / max(1, parallel))
    return DEADLINE_HOST_TIMEOUTS_PER_BATCH * host_timeout_s * (batches + 1) + RESOLUTION_ALLOWANCE_S


def effective_parallel(job_max: int | None, capacity: int) -> int:
    """Hosts at once: the job's ``max_parallel_hosts`` bounded by the appliance's capacity."""
    return max(1, min(job_max or capacity, capacity))


def summarize(results: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The completion ``summary`` from the job's HostResult bodies."""
    summary = dict(ZERO_SUMMARY)
    for body in results:
        summary["hosts_targeted"] += 1
        status = body.get("status")
        if status == "scanned":
            summary["hosts_alive"] += 1
            summary["hosts_scanned"] += 1
        elif status == "excluded":
            summary["hosts_excluded"] += 1
        summary["findings"] += len(body.get("findings") or [])
    return summary


def summary_from_counts(by_status: Mapping[str, int], findings: int) -> dict[str, int]:
    """The completion ``summary`` from per-status host counts (what the spool counts for a job)."""
    return {"hosts_targeted": sum(by_status.values()), "hosts_alive": by_status.get("scanned", 0),
            "hosts_excluded": by_status.get("excluded", 0), "hosts_scanned": by_status.get("scanned", 0),
            "findings": findings}


def completion_for(
    summary: Mapping[str, int], *, resolution_failure: str | None = None, timed_out: str | None = None
) -> dict[str, Any]:
    """The completion body (without ``host_keys``): status, reason and a message in words.

    Precedence: a deadline passed (``failed``/``timeout``), then a resolution
    failure (``failed``/``target_resolution_failed``, the rest was scanned), then
    nothing alive (``finished``/``no_hosts_alive``), else ``finished``.
    """
    message = (f"{summary['hosts_targeted']} hosts targeted, {summary['hosts_alive']} alive, "
               f"{summary['hosts_excluded']} excluded")
    if summary.get("findings"):
        message += f", {summary['findings']} findings"
    if timed_out:
        return {"status": "failed", "reason": "timeout", "message": f"{message}; {timed_out}", "summary": dict(summary)}
    if resolution_failure:
        return {"status": "failed", "reason": "target_resolution_failed",
                "message": f"{message}; {resolution_failure}", "summary": dict(summary)}
    if summary["hosts_scanned"] == 0:
        return {"status": "finished", "reason": "no_hosts_alive",
                "message": f"{message}; no host answered, nothing was scanned", "summary": dict(summary)}
    return {"status": "finished", "reason": None, "message": message, "summary": dict(summary)}


def failed_fast(message: str) -> dict[str, Any]:
    """The completion of a job that could not run at all (``failed``/``internal_error``)."""
    return {"status": "failed", "reason": INTERNAL_ERROR, "message": message, "summary": dict(ZERO_SUMMARY)}


def completion_words(job_id: str, completion: Mapping[str, Any]) -> str:
    """The console line of a completed job."""
    status, reason, message = completion["status"], completion.get("reason"), completion.get("message")
    if status == "failed":
        return f"job {job_id} failed ({reason}): {message}"
    return f"job {job_id} {status}{f' ({reason})' if reason else ''}: {message}"


def job_path(job_id: str, action: str) -> str:
    """``/vsa/v1/jobs/{job_id}/{action}``."""
    return f"/vsa/v1/jobs/{quote(job_id, safe='')}/{action}"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def error_result(target: Target, words: str) -> HostResult:
    """A host that could not be finished: status ``error`` with the words why."""
    now = _now()
    return HostResult(target=target, status="error", started_at=now, finished_at=now, errors=[words])


# --- auth records ------------------------------------------------------------------------------


def decrypt_auth_records(tokens: Sequence[str], key_pem: bytes) -> list[AuthRecord]:
    """Decrypt and parse the job's JWE auth records (ECDH-ES + A256GCM to the appliance's key).

    Raises :class:`JobInvalid` naming ``auth_records[i]``; the plaintext never
    leaves memory and its secrets are registered with the console's scrubber by
    :func:`~appliance.authrecords.parse_auth_record`.
    """
    from joserfc import jwe
    from joserfc.errors import JoseError
    from joserfc.jwk import ECKey

    if not tokens:
        return []
    try:
        key = ECKey.import_key(key_pem)
    except (JoseError, ValueError, TypeError) as exc:
        raise JobInvalid(f"auth_records cannot be decrypted: the appliance key cannot be read ({type(exc).__name__})") from None
    records: list[AuthRecord] = []
    for index, token in enumerate(tokens):
        name = f"auth_records[{index}]"
        try:
            plain = jwe.decrypt_compact(token, key, algorithms=["ECDH-ES", "A256GCM"]).plaintext
        except (JoseError, ValueError, TypeError) as exc:
            raise JobInvalid(
                f"{name} cannot be decrypted with this appliance's key ({type(exc).__name__}): "
                "it must be a JWE (ECDH-ES, A256GCM) encrypted to the appliance's certified key"
            ) from None
        try:
            obj = decode_json(plain or b"null")
        except (ValueError, UnicodeDecodeError):
            raise JobInvalid(f"{name} does not decrypt to JSON") from None
        try:
            records.append(parse_auth_record(obj))
        except AuthRecordError as exc:
            raise JobInvalid(f"{name}: {exc}") from None
    return records


async def resolve_hostnames(names: Sequence[str]) -> tuple[list[Target], list[str]]:
    """Resolve host names now: one Target per address (``hostname`` set), and failures in words."""
    loop = asyncio.get_running_loop()
    targets: list[Target] = []
    failures: list[str] = []
    for name in names:
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), 30.0)
        except (OSError, TimeoutError) as exc:
            failures.append(f"the host name {name} cannot be resolved ({getattr(exc, 'strerror', None) or 'no answer in time'})")
            continue
        # info[4][0] is the address text (an IPv6 one may carry a %scope suffix).
        addresses = list(dict.fromkeys(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos))
        if not addresses:
            failures.append(f"the host name {name} resolves to no address")
        targets.extend(Target(ip=address, hostname=name.removesuffix(".")) for address in addresses)
    return targets, failures


# --- the engine --------------------------------------------------------------------------------


@dataclass
class _Job:
    """What the engine tracks of one job in memory."""

    job_id: str
    title: str | None = None
    phase: str = "resolving"
    hosts_total: int = 0
    hosts_done: int = 0
    task: asyncio.Task[None] | None = None
    ended: bool = False  # canceled or dropped: nothing more is done or sent for it
    last_progress_at: float = 0.0
    last_progress_phase: str | None = None
    checks_pending: set[asyncio.Task[None]] = field(default_factory=set)
    phase_s: dict[str, float] = field(default_factory=dict)  # wall time spent in each phase
    phase_since: float = field(default_factory=time.monotonic)

    def enter(self, phase: str) -> None:
        """Move to ``phase``, adding the time spent in the previous one to :attr:`phase_s`."""
        now = time.monotonic()
        self.phase_s[self.phase] = self.phase_s.get(self.phase, 0.0) + now - self.phase_since
        self.phase, self.phase_since = phase, now

    def timings(self) -> str:
        """``resolving 0.1 s, discovery 1.2 s, ...`` (the phase in progress included)."""
        spent = dict(self.phase_s)
        spent[self.phase] = spent.get(self.phase, 0.0) + time.monotonic() - self.phase_since
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in spent.items() if name != "offered")


class JobEngine:
    """The daemon's job sink: runs accepted jobs, spools and sends results, completes them."""

    def __init__(
        self,
        *,
        config: Config,
        console: Console,
        key_pem: Callable[[], bytes],
        waker: PollWaker,
        capacity: int,
        timings: Timings | None = None,
        spool: Spool | None = None,
        rng: random.Random | None = None,
        events: Any = None,
    ) -> None:
        """``key_pem()`` reads the appliance's private key (PEM) for JWE auth records."""
        self.config = config
        self.console = console
        self._key_pem = key_pem
        self.waker = waker
        self.capacity = max(1, capacity)
        self.timings = timings or Timings.from_env(os.environ)
        self.spool = spool or Spool(config.state_dir)
        self.rng = rng or random.Random()
        self.client: PlatformClient | None = None
        self._client_ready = asyncio.Event()
        self.ec2_proxy: Ec2ApiProxy | None = None
        self.jobs: dict[str, _Job] = {}
        self.publish: Callable[[], None] | None = None  # the daemon's status refresher
        # The appliance's own VPC(s), from IMDS: decides which of two instances sharing an address is scanned.
        self.own_vpc_ids: Callable[[], tuple[str, ...]] = tuple
        self.events = events  # MQTT progress events (publish_progress), None without MQTT
        self._last_publish = 0.0
        self._started = False
        self._background: set[asyncio.Task[Any]] = set()
        self._signatures_version = self._read_signatures_version()
        self._signatures_tried: dict[str, float] = {}
        self._kb: Any = None
        self._kb_version: str | None = None
        self._disk_full: str | None = None  # the words of the last SpoolFullError while the disk is full
        self._refused_while_full: set[str] = set()  # jobs already told "not accepted" (no console spam)
        self.sender = ResultSender(
            self.spool,
            backoff=self._backoff(),
            on_interest_ended=self._interest_ended,
            is_live=self._is_live,
            rng=self.rng,
        )

    # --- helpers ---

    def _backoff(self) -> Backoff:
        return self.timings.backoff(self.timings.default_poll_interval_s)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _is_live(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is None or not job.ended  # rows of jobs resumed later are live too

    def _read_signatures_version(self) -> str | None:
        from appliance.kb.bundle import installed_version

        try:
            return installed_version(self.config.state_dir)
        except (OSError, ValueError, VsaError) as exc:
            log.warning("the installed signatures cannot be read: %s", exc)
            return None

    def _refresh_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.publish is not None and (force or now - self._last_publish >= PROGRESS_INTERVAL_S):
            self._last_publish = now
            try:
                self.publish()
            except (OSError, StateError) as exc:
                log.warning("the status file cannot be written: %s", exc)

    # --- JobSink ---

    def snapshot(self) -> WorkSnapshot:
        """Running jobs (accepted, not yet completed), the spool backlog, the signatures version."""
        running = tuple(
            RunningJob(job.job_id, job.hosts_total, min(job.hosts_done, job.hosts_total))
            for job in self.jobs.values() if not job.ended and job.phase != "offered"
        )
        try:
            pending = self.spool.unsent_count()
        except StateError:
            pending = 0
        return WorkSnapshot(running_jobs=running, spool_pending=pending,
                            signatures_version=self._signatures_version)

    def use_platform(self, client: PlatformClient | None) -> None:
        """Use ``client`` for job calls; the first time, start the sender and resume the journal."""
        self.client = client
        self.sender.client = client
        if client is None:
            self._client_ready.clear()
            return
        self._client_ready.set()
        self.sender.wake()
        if not self._started:
            self._started = True
            self._spawn(self.sender.run(), "vsa-sender")
            self._resume()

    async def set_ec2_api_proxy(self, proxy: Ec2ApiProxy | None) -> None:
        """Remember the proxy for STS/EC2 (its password masked when said)."""
        if proxy != self.ec2_proxy:
            self.ec2_proxy = proxy
            if proxy is not None:
                self.console.say(f"the platform set the proxy for AWS API calls: {proxy.display()}")
            else:
                self.console.say("the platform cleared the proxy for AWS API calls: STS and EC2 are called directly")

    async def cancel(self, job_ids: Sequence[str]) -> None:
        """Stop these jobs now and discard their results; no completion is sent (see the module doc)."""
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            journaled = self.spool.job(job_id)
            if job is None and (journaled is None or journaled.state not in ("offered", "running", "completing")):
                log.info("the platform asked to cancel %s, which is not running here", job_id)
                continue
            unsent = self.spool.unsent_count(job_id)
            await self._end_job(job_id)
            self.console.say(f"job {job_id} canceled by the platform: stopped; "
                             f"{unsent} result{'s' if unsent != 1 else ''} not yet sent discarded")

    async def offer_signatures(self, offer: SignaturesOffer) -> None:
        """Install a new knowledge-base bundle before any job of this poll starts; refusals are said."""
        from appliance.kb import bundle
        from appliance.kb.errors import BundleRefused, KbError

        if offer.version == self._signatures_version:
            return
        tried = self._signatures_tried.get(offer.version)
        if tried is not None and time.monotonic() - tried < SIGNATURES_RETRY_S:
            return
        self._signatures_tried[offer.version] = time.monotonic()
        client = self.client
        if client is None:
            return
        if self.config.signatures_public_key is None:
            self.console.say(f"signatures {offer.version} offered: not installed, no signatures.public_key is configured")
            return
        try:
            wire = bundle.SignaturesOffer.from_wire(
                {"version": offer.version, "url": offer.url, "sha256": offer.sha256, "signature": offer.signature})
            # The platform client's mTLS session, through PROXY_URL like every platform request.
            session, request_kwargs = client.authenticated_transport()
            installed = await bundle.download_and_install(
                session, platform_origin=client.origin, offer=wire,
                public_key=self.config.signatures_public_key, state_dir=self.config.state_dir,
                console=self.console, request_kwargs=request_kwargs)
        except BundleRefused as exc:
            log.warning("signatures %s refused: %s", offer.version, exc)  # the console has said it
            return
        except (KbError, PlatformError, OSError) as exc:
            self.console.say(f"signatures {offer.version} not installed: {exc}; "
                             f"still using {self._signatures_version or 'no signatures'}")
            return
        self._signatures_version = installed.version
        self._kb, self._kb_version = installed.knowledge_base, installed.version
        self._signatures_tried.pop(offer.version, None)

    async def offer_jobs(self, jobs: Sequence[JobSpec], invalid: Sequence[InvalidJob]) -> None:
        """Journal, then accept, each new job; malformed ones are accepted and failed fast."""
        for spec in jobs:
            self._take(spec.job_id, dict(spec.raw), title=spec.title, kind=spec.type)
        for bad in invalid:
            if bad.job_id is None:
                self.console.say(f"a job was offered with no usable job ID ({bad.message}): it cannot be "
                                 "accepted or failed; the platform must fix it")
                continue
            self._take(bad.job_id, {"job_id": bad.job_id, "_invalid": bad.message}, title=None, kind=None)

    def _take(self, job_id: str, raw: dict[str, Any], *, title: str | None, kind: str | None) -> None:
        if job_id in self.jobs:
            return
        known = self.spool.job(job_id)
        if known is not None and known.state in ("done", "dropped"):
            log.info("job %s offered again after it ended here (%s): not taken", job_id, known.state)
            return
        if self._disk_full is not None and (known is None or known.state == "offered"):
            # No new work while the disk is full: not journaled, not accepted; offered again later.
            if job_id not in self._refused_while_full:
                self._refused_while_full.add(job_id)
                self.console.say(f"job {job_id} not accepted: the disk of the state directory is full; "
                                 "it is taken when space is freed")
            return
        try:
            self.spool.journal_job(job_id, raw)
        except SpoolFullError as exc:
            self._disk_is_full(exc)
            self._refused_while_full.add(job_id)
            self.console.say(f"job {job_id} not accepted: the disk of the state directory is full; "
                             "it is taken when space is freed")
            return
        except StateError as exc:
            self.console.say(f"job {job_id} not accepted: the job journal cannot be written ({exc})")
            return
        state = known.state if known is not None else "offered"
        self._start(job_id, state, title=title)

    def _start(self, job_id: str, state: str, *, title: str | None = None) -> None:
        job = _Job(job_id, title=title, phase="offered" if state == "offered" else "resolving")
        self.jobs[job_id] = job
        job.task = self._spawn(self._run_job(job, state), f"vsa-job-{job_id}")

    def _resume(self) -> None:
        try:
            active = self.spool.active_jobs()
        except StateError as exc:
            self.console.say(f"the job journal cannot be read: {exc}")
            return
        for journaled in active:
            if journaled.job_id in self.jobs:
                continue
            done = len(self.spool.host_keys(journaled.job_id))
            self.console.say(f"resuming job {journaled.job_id} ({journaled.state}, {done} host results spooled)")
            self._start(journaled.job_id, journaled.state, title=journaled.spec.get("title"))

    # --- one job ---

    async def _run_job(self, job: _Job, state: str) -> None:
        try:
            if state == "offered":
                raw = await self._accept(job)
                if raw is None:
                    return
                state = "running"
            if state == "running":
                journaled = self.spool.job(job.job_id)
                assert journaled is not None
                completion = await self._execute(job, journaled)
                if job.ended:
                    return
                self.spool.set_job_state(job.job_id, "completing", completion=completion)
            await self._complete(job)
        except asyncio.CancelledError:
            raise
        except SpoolFullError as exc:
            self._paused_for_space(job, exc)
        except ExceptionGroup as group:
            # A result spooled from a task of the scan's TaskGroup arrives wrapped in a group.
            full = group.subgroup(SpoolFullError)
            if full is None:
                log.exception("job %s stopped on an internal error", job.job_id)
                self.console.say(f"job {job.job_id} stopped on an internal error ({group!r}); "
                                 "the journal has the details; it resumes when the daemon restarts")
            else:
                self._paused_for_space(job, _first_leaf(full))
        except StateError as exc:
            self.console.say(f"job {job.job_id} paused: the spool cannot be written ({exc}); "
                             "it resumes when the daemon restarts")
        except Exception as exc:  # a bug: said in words, the traceback in the journal; the daemon goes on
            log.exception("job %s stopped on an internal error", job.job_id)
            self.console.say(f"job {job.job_id} stopped on an internal error ({type(exc).__name__}: {exc}); "
                             "the journal has the details; it resumes when the daemon restarts")
        finally:
            if self.jobs.get(job.job_id) is job:
                self.jobs.pop(job.job_id, None)
            self._refresh_status(force=True)

    # --- a full disk ---

    def _paused_for_space(self, job: _Job, exc: BaseException) -> None:
        """The job met a full disk: it stops here, its journal entry and spooled results stay."""
        self._disk_is_full(exc)
        self.console.say(f"job {job.job_id} paused: the disk of the state directory is full; "
                         f"{len(self.spool.host_keys(job.job_id))} host results kept in the spool; "
                         "it resumes when space is freed")

    def _disk_is_full(self, exc: BaseException) -> None:
        """Enter the disk-full state (said once) and watch for free space."""
        if self._disk_full is not None:
            return
        self._disk_full = str(exc)
        self.console.say(f"the disk of the state directory is full ({self.config.state_dir}): no new work is "
                         "accepted until space is freed; results already spooled are kept and sent")
        self._spawn(self._watch_free_space(), "vsa-disk-watch")

    async def _watch_free_space(self) -> None:
        while True:
            await asyncio.sleep(DISK_RECHECK_S)
            try:
                usage = os.statvfs(self.config.state_dir)
            except OSError as exc:
                log.warning("free space of %s cannot be read: %s", self.config.state_dir, exc)
                continue
            free = usage.f_bavail * usage.f_frsize
            if free >= DISK_FREE_MIN_BYTES:
                break
        self._disk_full = None
        self._refused_while_full.clear()
        self.console.say(f"space is free again on the state directory's disk ({free // 1024} KiB): "
                         "accepting work again and resuming paused jobs")
        self._resume()  # the paused jobs are still in the journal (running or completing)
        self.waker.wake()  # poll now: the offers refused meanwhile are taken at once

    async def _platform(self) -> PlatformClient:
        while self.client is None:
            await self._client_ready.wait()
        return self.client

    async def _accept(self, job: _Job) -> dict[str, Any] | None:
        attempt = 0
        while True:
            client = await self._platform()
            try:
                status, body = await client.call("POST", job_path(job.job_id, "accept"), {},
                                                 what=f"accept job {job.job_id}")
            except PlatformError as exc:
                attempt += 1
                await self._wait_retry(exc, attempt, f"accepting job {job.job_id}")
                continue
            if status == 200:
                raw = body.get("job") if isinstance(body, dict) else None
                if not isinstance(raw, dict):
                    journaled = self.spool.job(job.job_id)
                    raw = journaled.spec if journaled else {"job_id": job.job_id}
                self.spool.set_job_spec(job.job_id, raw)
                self.spool.set_job_state(job.job_id, "running")
                title = raw.get("title") if isinstance(raw.get("title"), str) else None
                job.title = title
                job.enter("resolving")
                kind = raw.get("type") if isinstance(raw.get("type"), str) else "?"
                self.console.say(f"job accepted: {job.job_id} ({kind}{f', {title!r}' if title else ''})")
                return raw
            if status in ENDS_INTEREST:
                code = error_code(body)
                why = {"job_taken": "another appliance took it", "job_canceled": "it was canceled",
                       "unknown_job": "the platform does not know it"}.get(code or "", "the platform refused it")
                self.spool.finish_job(job.job_id, "dropped")
                job.ended = True
                self.console.say(f"job {job.job_id} not accepted: {why} ({status} {code or 'no code'})")
                return None
            attempt += 1
            await self._wait_retry(PlatformError(f"accept job {job.job_id}: the platform answered {status} "
                                                 f"{error_message(body) or ''}"), attempt, f"accepting job {job.job_id}")

    async def _wait_retry(self, exc: Exception, attempt: int, what: str) -> None:
        retry_after = getattr(exc, "retry_after_s", None)
        delay = self._backoff().delay_s(attempt, retry_after_s=retry_after, rng=self.rng)
        log.log(logging.WARNING if attempt == 1 else logging.INFO,
                "%s failed (%d in a row): %s; next attempt in %.1f s", what, attempt, exc, delay)
        await asyncio.sleep(delay)

    async def _execute(self, job: _Job, journaled: JournaledJob) -> dict[str, Any]:
        """Validate, resolve, scan; return the completion body (every host has its result spooled)."""
        raw = journaled.spec
        try:
            plan = self._plan(raw)
        except JobInvalid as exc:
            message = str(exc)
            log.warning("job %s is invalid: %s", job.job_id, message)
            return failed_fast(message)
        return await self._scan(job, raw, plan)

    def _plan(self, raw: Mapping[str, Any]) -> _Plan:
        """Everything checked before anything is sent: the spec, options, targets, EC2, auth records."""
        from appliance.aws.ec2 import Ec2Error, parse_ec2_selection
        from appliance.scan.discovery import local_addresses
        from appliance.scan.portscan import PortScanOptions, ScanOptionError
        from appliance.scan.targets import TargetError, expand_targets, make_scope

        if "_invalid" in raw:
            raise JobInvalid(str(raw["_invalid"]))
        try:
            spec = JobSpec.parse(raw, path="")
        except MessageError as exc:
            raise JobInvalid(f"invalid job specification: {exc.field} {exc.problem}") from None
        options_raw = raw.get("options") or {}
        try:
            options = PortScanOptions.from_job(options_raw)
        except ScanOptionError as exc:
            raise JobInvalid(f"invalid job specification: {exc}") from None
        parallel = effective_parallel(spec.options.max_parallel_hosts, self.capacity)
        options = dataclasses.replace(options, max_parallel_hosts=parallel)
        own = sorted(local_addresses())
        try:
            scope = make_scope(spec.exclude, own_addresses=own, allow=self.config.allow_targets)
            ip_targets = expand_targets(list(spec.targets.ips), scope)
        except TargetError as exc:
            raise JobInvalid(f"invalid job specification: {exc}") from None
        try:
            selection = parse_ec2_selection((raw.get("targets") or {}).get("ec2"))
        except Ec2Error as exc:
            raise JobInvalid(f"invalid job specification: {exc}") from None
        records: list[AuthRecord] = []
        if spec.auth_records and spec.type == "vm_scan" and spec.options.authentication:
            try:
                key = self._key_pem()
            except (OSError, VsaError) as exc:
                raise JobInvalid(f"auth_records cannot be decrypted: the appliance key cannot be read ({exc})") from None
            records = decrypt_auth_records(spec.auth_records, key)
        return _Plan(spec=spec, options=options, parallel=parallel, scope=scope, ip_targets=ip_targets,
                     selection=selection, records=records, own_addresses=own)

    async def _scan(self, job: _Job, raw: Mapping[str, Any], plan: _Plan) -> dict[str, Any]:
        from appliance.scan.targets import scope_targets

        job.enter("resolving")
        self._progress(job, force=True)
        failures: list[str] = []
        named, name_failures = await resolve_hostnames(plan.spec.targets.hostnames)
        failures.extend(name_failures)
        not_scanned: list[HostResult] = []
        ec2_targets: list[Target] = []
        if plan.selection is not None:
            resolution = await self._resolve_ec2(job.job_id, plan)
            ec2_targets = list(resolution.targets)
            not_scanned = [n.host_result() for n in resolution.not_scanned]
            if resolution.message:
                failures.append(resolution.message)
        scoped = [*plan.ip_targets, *scope_targets([*named, *ec2_targets], plan.scope)]
        # One result per host key: the first appearance wins (an address listed twice is one target).
        seen: set[str] = set()
        unique = []
        for s in scoped:
            if s.target.host_key not in seen:
                seen.add(s.target.host_key)
                unique.append(s)
        extra = []
        for hr in not_scanned:
            if hr.host_key not in seen:
                seen.add(hr.host_key)
                extra.append(hr)
        done = set(self.spool.host_keys(job.job_id))
        job.hosts_total = len(seen)
        job.hosts_done = len(done & seen)
        for hr in extra:
            if hr.host_key not in done:
                self._spool(job, hr)
        for s in unique:
            if not s.scannable and s.target.host_key not in done:
                self._spool(job, s.excluded_result())
        todo = [s for s in unique if s.scannable and s.target.host_key not in done]
        if done:
            log.info("job %s resumes: %d hosts have results, %d to scan", job.job_id, len(done), len(todo))
        deadline = job_deadline_s(len(todo), plan.parallel, plan.options.host_timeout_s)
        timed_out = None
        try:
            await asyncio.wait_for(self._scan_batches(job, plan, todo), deadline)
        except TimeoutError:
            timed_out = f"the job's deadline ({deadline:.0f} s) passed before every host was scanned"
            missing = set(t.target.host_key for t in todo) - set(self.spool.host_keys(job.job_id))
            for s in todo:
                if s.target.host_key in missing:
                    self._spool(job, error_result(s.target, timed_out))
        summary = summary_from_counts(*self.spool.status_counts(job.job_id))
        job.enter("uploading")
        self._progress(job, force=True)
        return completion_for(summary, resolution_failure="; ".join(failures) or None, timed_out=timed_out)

    async def _resolve_ec2(self, job_id: str, plan: _Plan) -> Any:
        from appliance.aws.ec2 import AwsEndpoints, resolve_ec2_targets, role_session_name_for
        from appliance.aws.ec2 import Ec2ApiProxy as BotoProxy

        proxy = None
        if self.ec2_proxy is not None:
            proxy = BotoProxy(url=self.ec2_proxy.url, username=self.ec2_proxy.username,
                              password=self.ec2_proxy.password)
        assert plan.selection is not None
        return await resolve_ec2_targets(
            plan.selection, endpoints=AwsEndpoints.from_config(self.config), proxy=proxy,
            own_vpc_ids=self.own_vpc_ids(), own_addresses=plan.own_addresses,
            role_session_name=role_session_name_for(job_id))

    async def _scan_batches(self, job: _Job, plan: _Plan, todo: Sequence[Any]) -> None:
        from appliance.scan.portscan import scan_scoped

        checks = self._host_checks(plan)
        ctx = None
        if checks is not None:
            ctx = await self._check_context(checks, plan)
        limit = asyncio.Semaphore(plan.parallel)
        timeout_s = plan.options.host_timeout_s
        loop = asyncio.get_running_loop()

        def on_phase(phase: str, _done: int, _total: int) -> None:
            # The SYN engine reports from its worker thread: hop to the event loop.
            loop.call_soon_threadsafe(self._scan_phase, job, phase)
        try:
            async with asyncio.TaskGroup() as group:
                for start in range(0, len(todo), plan.parallel):
                    batch = todo[start:start + plan.parallel]
                    # Do not run far ahead of the checks: at most two batches wait for them.
                    while len(job.checks_pending) > 2 * plan.parallel:
                        await asyncio.wait(job.checks_pending, return_when=asyncio.FIRST_COMPLETED)
                    job.enter("discovery" if start == 0 else "scanning")
                    self._progress(job)
                    try:
                        run = await asyncio.wait_for(
                            scan_scoped(batch, plan.options, scope=plan.scope,
                                        progress=on_phase),
                            timeout_s + 60.0)  # discovery and the engines' own waits on top of the host timeout
                        results = run.results
                    except TimeoutError:
                        results = [error_result(s.target, f"the port scan did not finish within "
                                                          f"host_timeout_s={timeout_s:g} s") for s in batch]
                    for result in results:
                        if checks is not None and result.status == "scanned":
                            task = group.create_task(self._checked(job, plan, checks, ctx, result, limit))
                            job.checks_pending.add(task)
                            task.add_done_callback(job.checks_pending.discard)
                        else:
                            self._spool(job, result)
        finally:
            if ctx is not None:
                for name in ("ssh_executor", "smb_executor"):
                    executor = getattr(ctx, name, None)
                    if executor is not None:
                        executor.shutdown(wait=False, cancel_futures=True)

    def _scan_phase(self, job: _Job, phase: str) -> None:
        # Discovery is a phase of the first batch only: later batches' discovery is part of scanning.
        if job.phase != "scanning":
            job.enter("discovery" if phase == "discovery" else "scanning")
        self._progress(job)

    def _host_checks(self, plan: _Plan) -> Any:
        """The host-checks module for a vm_scan (None for discovery jobs, or until it is installed)."""
        if plan.spec.type != "vm_scan":
            return None
        try:
            return importlib.import_module("appliance.scan.hostchecks")
        except ImportError as exc:
            log.warning("authenticated host checks are not available (%s): ports only", exc)
            return None

    async def _check_context(self, checks: Any, plan: _Plan) -> Any:
        kb = await self._knowledge_base()
        return checks.make_check_context(self.config.state_dir, kb=kb, max_parallel_hosts=plan.parallel)

    async def _knowledge_base(self) -> Any:
        from appliance.kb.bundle import load_installed
        from appliance.kb.errors import KbError

        version = self._signatures_version
        if version is None:
            return None
        if self._kb is not None and self._kb_version == version:
            return self._kb
        try:
            installed = await asyncio.to_thread(load_installed, self.config.state_dir)
        except KbError as exc:
            self.console.say(f"the knowledge base cannot be used: {exc}; scanning without package matching")
            return None
        if installed is None:
            return None
        self._kb, self._kb_version = installed.knowledge_base, installed.version
        return self._kb

    async def _checked(self, job: _Job, plan: _Plan, checks: Any, ctx: Any, result: HostResult,
                       limit: asyncio.Semaphore) -> None:
        async with limit:
            timeout_s = plan.options.host_timeout_s
            try:
                await asyncio.wait_for(
                    checks.run_host_checks(result, plan.records, ctx, job_type=plan.spec.type,
                                           authentication=plan.spec.options.authentication,
                                           is_ec2=result.target.instance_id is not None,
                                           scanned_tcp_ports=plan.options.tcp_ports),
                    timeout_s)
            except TimeoutError:
                result.errors.append(f"authenticated checks stopped after host_timeout_s={timeout_s:g} s")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one host's bug never aborts the job; its words travel with its result
                log.exception("host checks of %s failed", result.host_key)
                result.errors.append(f"authenticated checks failed on an internal error ({type(exc).__name__})")
            result.finished_at = _now()
            self._spool(job, result)

    def _spool(self, job: _Job, result: HostResult) -> None:
        if job.ended:
            return
        self.spool.put_result(job.job_id, result.host_key, result.to_wire())
        job.hosts_done += 1
        self.sender.wake()
        self._progress(job)

    # --- progress ---

    def _progress(self, job: _Job, force: bool = False) -> None:
        now = time.monotonic()
        if not force and job.phase == job.last_progress_phase and now - job.last_progress_at < PROGRESS_INTERVAL_S:
            return
        job.last_progress_at = now
        job.last_progress_phase = job.phase
        self._refresh_status()
        client = self.client
        if client is None or job.hosts_total == 0 and job.phase != "resolving":
            return
        body = {"phase": job.phase, "hosts_total": job.hosts_total,
                "hosts_done": min(job.hosts_done, job.hosts_total)}
        if self.events is not None:
            try:  # non-blocking by contract; dropped while no broker is connected
                self.events.publish_progress(job.job_id, body["phase"], body["hosts_total"], body["hosts_done"])
            except Exception as exc:  # an accelerator must never break a job
                log.debug("progress event for %s not published: %s", job.job_id, exc)
        self._spawn(self._post_progress(client, job.job_id, body), f"vsa-progress-{job.job_id}")

    async def _post_progress(self, client: PlatformClient, job_id: str, body: dict[str, Any]) -> None:
        try:
            status, _ = await asyncio.wait_for(
                client.call("POST", job_path(job_id, "progress"), body, what=f"progress of job {job_id}"),
                PROGRESS_TIMEOUT_S)
            log.debug("progress of %s: %s -> %s", job_id, body, status)
        except (PlatformError, TimeoutError) as exc:
            log.debug("progress of %s not delivered (best effort): %s", job_id, exc)

    # --- completion and ending ---

    async def _complete(self, job: _Job) -> None:
        if job.phase != "uploading":
            job.enter("uploading")
        attempt = 0
        while True:
            if job.ended:
                return
            if self.spool.unsent_count(job.job_id):
                self.sender.wake()
                await asyncio.sleep(COMPLETE_POLL_S)
                continue
            journaled = self.spool.job(job.job_id)
            if journaled is None or journaled.completion is None:
                return
            body = dict(journaled.completion, host_keys=self.spool.host_keys(job.job_id))
            client = await self._platform()
            try:
                status, answer = await client.call("POST", job_path(job.job_id, "complete"), body,
                                                   what=f"complete job {job.job_id}")
            except PlatformError as exc:
                attempt += 1
                await self._wait_retry(exc, attempt, f"completing job {job.job_id}")
                continue
            if 200 <= status < 300:
                self.spool.finish_job(job.job_id, "done")
                job.ended = True
                log.info("job %s completed; wall time per phase: %s", job.job_id, job.timings())
                self.console.say(completion_words(job.job_id, journaled.completion))
                self.waker.wake()  # poll soon: the platform may have more work
                return
            code = error_code(answer)
            if status == 409 and code == "missing_hosts":
                missing = answer.get("host_keys") if isinstance(answer, dict) else None
                keys = [k for k in missing or [] if isinstance(k, str)]
                found = self.spool.mark_unsent(job.job_id, keys)
                log.warning("job %s: the platform lacks %d host results (%d in the spool): sending them again",
                            job.job_id, len(keys), found)
                if found == 0:
                    attempt += 1
                    await self._wait_retry(PlatformError("missing_hosts names hosts the spool does not hold"),
                                           attempt, f"completing job {job.job_id}")
                self.sender.wake()
                continue
            if status in ENDS_INTEREST:
                await self._interest_ended(job.job_id, status, code, error_message(answer))
                return
            attempt += 1
            await self._wait_retry(PlatformError(f"complete job {job.job_id}: the platform answered {status} "
                                                 f"{code or ''}"), attempt, f"completing job {job.job_id}")

    async def _interest_ended(self, job_id: str, status: int, code: str | None, message: str | None) -> None:
        """404/409/410 on a job call: stop the job, drop what it spooled, say so."""
        job = self.jobs.get(job_id)
        if job is not None and job.ended:
            return
        dropped = self.spool.unsent_count(job_id)
        await self._end_job(job_id)
        why = {"job_canceled": "the job was canceled", "job_not_accepted": "this appliance does not hold it",
               "unknown_job": "the platform does not know it"}.get(code or "", "the platform ended it")
        self.console.say(f"job {job_id} dropped: {why} ({status} {code or 'no code'}); "
                         f"{dropped} unsent result{'s' if dropped != 1 else ''} discarded")

    async def _end_job(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            job.ended = True
            task = job.task
            if task is not None and task is not asyncio.current_task() and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.spool.finish_job(job_id, "dropped")
        self._refresh_status(force=True)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception of a (nested) exception group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@dataclass(frozen=True)
class _Plan:
    """A validated job, ready to resolve and scan."""

    spec: JobSpec
    options: Any  # PortScanOptions
    parallel: int
    scope: Any  # Scope
    ip_targets: list[Any]  # list[ScopedTarget]
    selection: Any  # Ec2Selection | None
    records: list[AuthRecord]
    own_addresses: list[str]


def build_engine(context: Any) -> JobEngine:
    """The sink factory for :func:`appliance.daemon.build_daemon`: the engine with the daemon's context."""
    from appliance.daemon import default_max_parallel_hosts, memory_mb

    config = context.config
    capacity = config.max_parallel_hosts or default_max_parallel_hosts(os.cpu_count() or 1, memory_mb())

    def key_pem() -> bytes:
        identity = context.store.load()
        if identity is None:
            raise StateError("the appliance has no identity (key) yet")
        return Path(identity.key_path).read_bytes()

    return JobEngine(config=config, console=context.console, key_pem=key_pem, waker=context.waker,
                     capacity=capacity, events=getattr(context, "events", None))


__all__ = ["JobEngine", "JobInvalid", "build_engine", "completion_for", "decrypt_auth_records",
           "effective_parallel", "failed_fast", "job_deadline_s", "resolve_hostnames", "summarize",
           "summary_from_counts"]
