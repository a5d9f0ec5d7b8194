"""The job engine's pure decisions, JWE auth records, and its protocol flow against a scripted platform.

The flow tests run the real :class:`JobEngine` with a fake ``client.call`` and
only targets the scope excludes (127.0.0.1, out of scope), so no probe is ever
sent: they pin the order accept → PUT → complete, the reconciliation of
``409 missing_hosts``, the backoff on ``503``, drops on ``409``/``410`` and
resuming from the journal.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.config import Config
from appliance.console import Console
from appliance.errors import PlatformError
from appliance.lab.platform.secrets import encrypt_auth_record
from appliance.platform.client import PlatformUnavailable, PlatformUnreachable
from appliance.platform.messages import JobSpec, PollResponse
from appliance.platform.retry import Timings
from appliance.platform.sink import PollWaker
from appliance.scan.engine import (
    JobEngine,
    JobInvalid,
    completion_for,
    decrypt_auth_records,
    effective_parallel,
    failed_fast,
    job_deadline_s,
    resolve_hostnames,
    summarize,
    summary_from_counts,
)
from appliance.state.spool import Spool

# --- pure decisions ------------------------------------------------------------------------------


def test_summary_counts_statuses_and_findings() -> None:
    bodies = [{"status": "scanned", "findings": [{}, {}]}, {"status": "down", "findings": []},
              {"status": "excluded"}, {"status": "scanned", "findings": None}, {"status": "error"}]
    assert summarize(bodies) == {"hosts_targeted": 5, "hosts_alive": 2, "hosts_excluded": 1,
                                 "hosts_scanned": 2, "findings": 2}


def test_spool_counts_agree_with_the_summary(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.journal_job("j-1", {})
    bodies = [{"status": "scanned", "findings": [{"id": "a"}, {"id": "b"}]}, {"status": "down", "findings": []},
              {"status": "excluded", "findings": []}, {"status": "scanned", "findings": [{"id": "c"}]}]
    for index, body in enumerate(bodies):
        spool.put_result("j-1", f"10.0.0.{index}", body)
    assert summary_from_counts(*spool.status_counts("j-1")) == summarize(bodies)
    assert summary_from_counts(*spool.status_counts("j-2")) == summarize([])


def test_completion_status_and_reason() -> None:
    s = {"hosts_targeted": 120, "hosts_alive": 97, "hosts_excluded": 3, "hosts_scanned": 97, "findings": 0}
    done = completion_for(s)
    assert (done["status"], done["reason"], done["message"]) == ("finished", None, "120 hosts targeted, 97 alive, 3 excluded")
    failed = completion_for(s, resolution_failure="EC2 targets could not be resolved: ec2 down")
    assert (failed["status"], failed["reason"]) == ("failed", "target_resolution_failed")
    assert failed["message"].endswith("EC2 targets could not be resolved: ec2 down")
    timed = completion_for(s, resolution_failure="x", timed_out="the job's deadline passed")
    assert (timed["status"], timed["reason"]) == ("failed", "timeout")
    none = completion_for(dict(s, hosts_alive=0, hosts_scanned=0))
    assert (none["status"], none["reason"]) == ("finished", "no_hosts_alive")
    bad = failed_fast("invalid job specification: options.rate_pps is -5")
    assert (bad["status"], bad["reason"], bad["summary"]["hosts_targeted"]) == ("failed", "internal_error", 0)


def test_parallel_and_deadline() -> None:
    assert effective_parallel(None, 16) == 16
    assert effective_parallel(4, 16) == 4
    assert effective_parallel(64, 16) == 16
    assert job_deadline_s(10, 2, 60) == 2 * 60 * (5 + 1) + 300
    assert job_deadline_s(0, 4, 900) == 2 * 900 + 300


# --- auth records --------------------------------------------------------------------------------


def _key_pair() -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


UNIX = {"type": "unix", "id": "rec-1", "title": "t", "username": "scanner", "password": "pw-secret-42",
        "private_keys": [], "root_delegation": {"method": "none", "password": None}, "port": 22,
        "targets": ["10.77.0.0/24"]}


def test_auth_records_decrypt_with_the_appliance_key() -> None:
    private, public = _key_pair()
    records = decrypt_auth_records([encrypt_auth_record(UNIX, public)], private)
    assert records[0].id == "rec-1" and records[0].type == "unix"


def test_auth_record_for_another_key_names_the_record() -> None:
    private, _ = _key_pair()
    _, other_public = _key_pair()
    with pytest.raises(JobInvalid, match=r"auth_records\[0\] cannot be decrypted"):
        decrypt_auth_records([encrypt_auth_record(UNIX, other_public)], private)


def test_malformed_auth_record_names_the_record_and_field() -> None:
    private, public = _key_pair()
    good = encrypt_auth_record(UNIX, public)
    bad = encrypt_auth_record(dict(UNIX, port="twenty-two"), public)
    with pytest.raises(JobInvalid, match=r"auth_records\[1\]") as caught:
        decrypt_auth_records([good, bad], private)
    assert "pw-secret-42" not in str(caught.value)


def test_hostnames_resolve_to_every_address_with_the_name() -> None:
    targets, failures = asyncio.run(resolve_hostnames(["localhost", "no-such-host.invalid"]))
    assert targets and all(t.hostname == "localhost" for t in targets)
    assert "127.0.0.1" in {t.ip for t in targets}
    assert len(failures) == 1 and "no-such-host.invalid" in failures[0]


# --- the flow against a scripted platform ------------------------------------------------------

Answer = tuple[int, Any] | Exception


class FakeClient:
    """``client.call`` with scripted answers per (method, path prefix); records every call."""

    origin = "https://platform.test"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.scripts: dict[tuple[str, str], list[Answer]] = {}
        self.default: Callable[[str, str, Any], tuple[int, Any]] = self._default

    def script(self, method: str, suffix: str, *answers: Answer) -> None:
        self.scripts.setdefault((method, suffix), []).extend(answers)

    @staticmethod
    def _default(method: str, path: str, body: Any) -> tuple[int, Any]:
        if path.endswith("/accept"):
            return 200, {"job": None}
        if path.endswith("/progress"):
            return 204, None
        return (201 if method == "PUT" else 200), {}

    async def call(self, method: str, path: str, body: Any = None, *, what: str | None = None) -> tuple[int, Any]:
        self.calls.append((method, path, json.loads(json.dumps(body))))
        for (m, suffix), answers in self.scripts.items():
            if m == method and path.endswith(suffix) and answers:
                answer = answers.pop(0)
                if isinstance(answer, Exception):
                    raise answer
                return answer
        return self.default(method, path, body)

    def of(self, method: str, suffix: str = "") -> list[tuple[str, str, Any]]:
        return [c for c in self.calls if c[0] == method and c[1].endswith(suffix)]


def job(job_id: str = "j-1", ips: list[str] | None = None, **extra: Any) -> JobSpec:
    return JobSpec.parse({"job_id": job_id, "type": "discovery", "title": "t",
                          "targets": {"ips": ips or ["127.0.0.1", "127.0.0.2"]},
                          "options": {"tcp_ports": "light"}, **extra})


def make_engine(tmp_path: Path, lines: list[str]) -> JobEngine:
    class ListConsole(Console):
        def say(self, message: str) -> None:
            lines.append(message)

    return JobEngine(config=Config(state_dir=tmp_path / "state"), console=ListConsole(),
                     key_pem=lambda: b"", waker=PollWaker(), capacity=4,
                     timings=Timings(backoff_base_s=0.01, default_poll_interval_s=0.05),
                     rng=random.Random(1))


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def completed(client: FakeClient, status: int = 200) -> Callable[[], bool]:
    return lambda: any(c[1].endswith("/complete") for c in client.calls) and not any(
        t.get_name().startswith("vsa-job-") for t in asyncio.all_tasks())


def test_flow_accept_put_complete(tmp_path: Path) -> None:
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        spec = job()
        client.script("POST", "/accept", (200, {"job": dict(spec.raw)}))
        engine.use_platform(client)  # type: ignore[arg-type]
        await engine.offer_jobs([spec], [])
        await until(completed(client))
        return client

    client = asyncio.run(main())
    order = [(m, p.rsplit("/", 1)[1]) for m, p, _ in client.calls if not p.endswith("/progress")]
    assert order[0] == ("POST", "accept") and order[-1] == ("POST", "complete")
    puts = client.of("PUT")
    assert sorted(p.rsplit("/", 1)[1] for _, p, _ in puts) == ["127.0.0.1", "127.0.0.2"]
    assert all(b["status"] == "excluded" and b["reason"] == "out_of_scope" for _, _, b in puts)
    complete = client.of("POST", "/complete")[0][2]
    assert sorted(complete["host_keys"]) == ["127.0.0.1", "127.0.0.2"]
    assert complete["status"] == "finished" and complete["reason"] == "no_hosts_alive"
    assert complete["summary"]["hosts_excluded"] == 2
    assert "job accepted: j-1 (discovery, 't')" in lines
    assert any(line.startswith("job j-1 finished (no_hosts_alive): 2 hosts targeted") for line in lines)
    spool = Spool(tmp_path / "state")
    assert spool.job("j-1").state == "done" and spool.host_keys("j-1") == []  # type: ignore[union-attr]


def test_flow_job_taken_is_dropped_without_any_put(tmp_path: Path) -> None:
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        client.script("POST", "/accept", (409, {"error": "job_taken", "message": "taken"}))
        engine.use_platform(client)  # type: ignore[arg-type]
        await engine.offer_jobs([job()], [])
        await until(lambda: any("not accepted" in line for line in lines))
        await engine.offer_jobs([job()], [])  # offered again: ended here, not taken again
        await asyncio.sleep(0.1)
        return client

    client = asyncio.run(main())
    assert len(client.of("POST", "/accept")) == 1 and not client.of("PUT")
    assert "job j-1 not accepted: another appliance took it (409 job_taken)" in lines


def test_flow_missing_hosts_and_503_are_retried(tmp_path: Path) -> None:
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        spec = job()
        client.script("POST", "/accept", PlatformUnreachable("p", 443, "refused", "fix it"),
                      (200, {"job": dict(spec.raw)}))
        client.script("PUT", "/127.0.0.2", PlatformUnavailable(503, "unavailable", None, "put", 0.05))
        client.script("POST", "/complete", (409, {"error": "missing_hosts", "host_keys": ["127.0.0.1"]}))
        engine.use_platform(client)  # type: ignore[arg-type]
        await engine.offer_jobs([spec], [])
        await until(lambda: len(client.of("POST", "/complete")) == 2 and any("finished" in x for x in lines))
        return client

    client = asyncio.run(main())
    assert len(client.of("POST", "/accept")) == 2
    put_keys = [p.rsplit("/", 1)[1] for _, p, _ in client.of("PUT")]
    assert put_keys.count("127.0.0.1") == 2  # sent again after missing_hosts
    assert put_keys.count("127.0.0.2") >= 2  # once refused (503), then accepted
    first, second = client.of("POST", "/complete")
    assert first[2]["host_keys"] == second[2]["host_keys"]


def test_flow_invalid_job_is_accepted_and_failed_naming_the_field(tmp_path: Path) -> None:
    lines: list[str] = []
    raw = {"job_id": "j-bad", "type": "discovery", "targets": {"ips": ["127.0.0.1"]},
           "options": {"rate_pps": 0}}
    poll = PollResponse.parse({"poll_interval_s": 60, "jobs": [raw]})
    assert poll.invalid_jobs

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        client.script("POST", "/accept", (200, {"job": raw}))
        engine.use_platform(client)  # type: ignore[arg-type]
        await engine.offer_jobs(poll.jobs, poll.invalid_jobs)
        await until(lambda: any("failed" in x for x in lines))
        return client

    client = asyncio.run(main())
    body = client.of("POST", "/complete")[0][2]
    assert (body["status"], body["reason"], body["host_keys"]) == ("failed", "internal_error", [])
    assert "options.rate_pps" in body["message"]
    assert not client.of("PUT")


def test_put_410_ends_interest_and_drops_the_spool(tmp_path: Path) -> None:
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        spec = job()
        client.script("POST", "/accept", (200, {"job": dict(spec.raw)}))
        client.default = lambda m, p, b: (410, {"error": "job_canceled"}) if m == "PUT" else FakeClient._default(m, p, b)
        engine.use_platform(client)  # type: ignore[arg-type]
        await engine.offer_jobs([spec], [])
        await until(lambda: any("dropped" in x for x in lines))
        await asyncio.sleep(0.2)
        return client

    client = asyncio.run(main())
    assert not client.of("POST", "/complete")
    assert any(x.startswith("job j-1 dropped: the job was canceled (410 job_canceled)") for x in lines)
    assert Spool(tmp_path / "state").job("j-1").state == "dropped"  # type: ignore[union-attr]


def test_restart_resumes_a_completing_job_from_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    spool.journal_job("j-9", {"job_id": "j-9"})
    spool.set_job_state("j-9", "running")
    version = spool.put_result("j-9", "10.0.0.1", {"host_key": "10.0.0.1", "status": "down"})
    spool.mark_sent("j-9", "10.0.0.1", version)
    spool.put_result("j-9", "10.0.0.2", {"host_key": "10.0.0.2", "status": "down"})
    spool.set_job_state("j-9", "completing", completion=completion_for(summarize(spool.results("j-9"))))
    spool.close()
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        engine.use_platform(client)  # type: ignore[arg-type]
        await until(lambda: any("finished" in x for x in lines))
        return client

    client = asyncio.run(main())
    assert [p.rsplit("/", 1)[1] for _, p, _ in client.of("PUT")] == ["10.0.0.2"]  # only the unsent one
    assert client.of("POST", "/complete")[0][2]["host_keys"] == ["10.0.0.1", "10.0.0.2"]
    assert not client.of("POST", "/accept")
    assert any(x.startswith("resuming job j-9 (completing, 2 host results spooled)") for x in lines)


def test_platform_errors_are_platform_errors() -> None:
    # The flow tests script these; the engine catches the family, not each one.
    assert issubclass(PlatformUnavailable, PlatformError) and issubclass(PlatformUnreachable, PlatformError)


# --- scanning paths with a stand-in for the port pipeline (no probe leaves) -----------------------


class FakeScan:
    """Replaces :func:`appliance.scan.portscan.scan_scoped`: records batches, answers 'down' or hangs."""

    def __init__(self, hang: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.hang = hang

    async def __call__(self, scoped: Any, options: Any, *, scope: Any = None, progress: Any = None) -> Any:
        from appliance.results import HostResult
        from appliance.scan.portscan import PortScanRun

        self.batches.append([s.target.ip for s in scoped])
        if self.hang:
            await asyncio.sleep(3600)
        return PortScanRun(results=[HostResult(target=s.target, status="down") for s in scoped], engine="connect")


@pytest.fixture(autouse=True)
def _no_own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine running the tests may hold any address; the appliance's own are out of scope.
    monkeypatch.setattr("appliance.scan.discovery.local_addresses", lambda: {"127.0.0.1"})


def scannable_job(job_id: str, count: int, **options: Any) -> JobSpec:
    # 192.0.2.0/24 (TEST-NET-1): in scope, and the stand-in never probes it anyway.
    return JobSpec.parse({"job_id": job_id, "type": "discovery", "targets": {"ips": [f"192.0.2.1-192.0.2.{count}"]},
                          "options": {"tcp_ports": "light", "max_parallel_hosts": 2, **options}})


def test_resumed_running_job_scans_only_hosts_without_a_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeScan()
    monkeypatch.setattr("appliance.scan.portscan.scan_scoped", fake)
    spec = scannable_job("j-r", 5)
    spool = Spool(tmp_path / "state")
    spool.journal_job("j-r", dict(spec.raw))
    spool.set_job_state("j-r", "running")
    for ip in ("192.0.2.1", "192.0.2.3"):
        spool.put_result("j-r", ip, {"host_key": ip, "status": "down", "findings": []})
    spool.close()
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        engine.use_platform(client)  # type: ignore[arg-type]
        await until(lambda: any("finished" in x for x in lines))
        return client

    client = asyncio.run(main())
    assert sorted(ip for batch in fake.batches for ip in batch) == ["192.0.2.2", "192.0.2.4", "192.0.2.5"]
    assert all(len(batch) <= 2 for batch in fake.batches)  # max_parallel_hosts
    body = client.of("POST", "/complete")[0][2]
    assert sorted(body["host_keys"]) == [f"192.0.2.{i}" for i in range(1, 6)]
    assert body["summary"]["hosts_targeted"] == 5


def test_deadline_gives_every_unfinished_host_an_error_and_fails_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.scan.portscan.scan_scoped", FakeScan(hang=True))
    monkeypatch.setattr("appliance.scan.engine.job_deadline_s", lambda hosts, parallel, timeout: 0.3)
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        spec = scannable_job("j-t", 3)
        client.script("POST", "/accept", (200, {"job": dict(spec.raw)}))
        engine.use_platform(client)  # type: ignore[arg-type]
        await engine.offer_jobs([spec], [])
        await until(lambda: any("failed" in x for x in lines))
        return client

    client = asyncio.run(main())
    puts = client.of("PUT")
    assert sorted(p.rsplit("/", 1)[1] for _, p, _ in puts) == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert all(b["status"] == "error" and "deadline" in b["errors"][0] for _, _, b in puts)
    body = client.of("POST", "/complete")[0][2]
    assert (body["status"], body["reason"]) == ("failed", "timeout")


def test_cancel_stops_the_job_discards_results_and_sends_no_completion(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeScan(hang=True)
    monkeypatch.setattr("appliance.scan.portscan.scan_scoped", fake)
    lines: list[str] = []

    async def main() -> tuple[FakeClient, JobEngine]:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        spec = scannable_job("j-c", 4)
        client.script("POST", "/accept", (200, {"job": dict(spec.raw)}))
        engine.use_platform(client)  # type: ignore[arg-type]
        await engine.offer_jobs([spec], [])
        await until(lambda: bool(fake.batches))
        assert [j.job_id for j in engine.snapshot().running_jobs] == ["j-c"]
        await engine.cancel(["j-c"])
        await asyncio.sleep(0.2)
        return client, engine

    client, engine = asyncio.run(main())
    assert not client.of("POST", "/complete") and not client.of("PUT")
    assert engine.snapshot().running_jobs == ()
    assert "job j-c canceled by the platform: stopped; 0 results not yet sent discarded" in lines
    assert Spool(tmp_path / "state").job("j-c").state == "dropped"  # type: ignore[union-attr]


def test_restart_accepts_again_a_job_journaled_before_its_accept(tmp_path: Path) -> None:
    spec = job("j-o")
    spool = Spool(tmp_path / "state")
    spool.journal_job("j-o", dict(spec.raw))  # killed right after the journal, before (or during) the accept
    spool.close()
    lines: list[str] = []

    async def main() -> FakeClient:
        engine, client = make_engine(tmp_path, lines), FakeClient()
        client.script("POST", "/accept", (200, {"job": dict(spec.raw)}))  # the holder's re-accept is 200
        engine.use_platform(client)  # type: ignore[arg-type]
        await until(lambda: any("finished" in x for x in lines))
        return client

    client = asyncio.run(main())
    assert len(client.of("POST", "/accept")) == 1
    assert sorted(client.of("POST", "/complete")[0][2]["host_keys"]) == ["127.0.0.1", "127.0.0.2"]
    assert any(x.startswith("resuming job j-o (offered") for x in lines)


def test_the_engine_learns_the_appliance_vpc_from_the_daemon(tmp_path: Path) -> None:
    # Of two instances sharing an address, the one in the appliance's own VPC is scanned
    # (PROTOCOL.md): the engine must know that VPC, which only the daemon learns from IMDS.
    from appliance.config import load_config
    from appliance.daemon import InstanceInfo, build_daemon

    config = load_config(environ={"VSA_PLATFORM_URL": "https://platform.example", "VSA_STATE_DIR": str(tmp_path)})
    daemon = build_daemon(config, user_data_file=None, environ={})
    engine = daemon.sink
    assert engine.own_vpc_ids() == ()  # type: ignore[attr-defined]
    daemon.instance = InstanceInfo("i-1", {"vpc_id": "vpc-0abc"}, None, None)
    assert engine.own_vpc_ids() == ("vpc-0abc",)  # type: ignore[attr-defined]


def test_auth_record_nesting_absurdly_deep_is_a_clear_job_error() -> None:
    # A hostile platform can encrypt anything to our key: 20,000 nested arrays must not
    # escape as RecursionError (found by bench/fuzz's review of the decrypt path).
    from joserfc import jwe
    from joserfc.jwk import ECKey

    private, public = _key_pair()
    token = jwe.encrypt_compact({"alg": "ECDH-ES", "enc": "A256GCM"}, b"[" * 20_000 + b"]" * 20_000,
                                ECKey.import_key(public))
    with pytest.raises(JobInvalid, match=r"auth_records\[0\] does not decrypt to JSON"):
        decrypt_auth_records([token], private)
