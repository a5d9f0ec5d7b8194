"""The daemon's pure pieces and one poll round trip with fakes: capacity, machine identity,
the order in which a poll response reaches the job sink, clamping said once, and `vsa status`."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.config import Config
from appliance.console import Console
from appliance.daemon import (
    Daemon,
    Notifier,
    default_max_parallel_hosts,
    local_instance_id,
    memory_mb,
    probe_raw_sockets,
)
from appliance.platform.messages import (
    Capabilities,
    Ec2ApiProxy,
    InvalidJob,
    JobSpec,
    PollResponse,
    SignaturesOffer,
)
from appliance.platform.retry import Timings
from appliance.platform.sink import PollWaker, WorkSnapshot
from appliance.state.identity import IdentityStore
from appliance.state.runtime import StatusFile
from appliance.status import collect, render


def issue(csr_pem: str) -> str:
    """A client certificate for the CSR's key from a throw-away CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(csr.subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(csr.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


JOB = {"job_id": "j-1", "type": "discovery", "targets": {"ips": ["10.0.0.1"]}}


def test_capacity_from_cpus_and_memory() -> None:
    assert default_max_parallel_hosts(2, 7900) == 16  # PROTOCOL.md's example machine
    assert default_max_parallel_hosts(8, 512) == 4  # memory-bound
    assert default_max_parallel_hosts(128, 1_000_000) == 256  # capped
    assert default_max_parallel_hosts(0, 0) == 1
    assert memory_mb("MemTotal:        8089392 kB\nMemFree: 1 kB\n") == 7899
    # /proc/meminfo hidden (systemd's ProcSubset=pid): the physical page count still tells.
    expected = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    assert memory_mb("") == expected > 0
    assert isinstance(probe_raw_sockets(), bool)


def test_local_instance_id_is_a_stable_hash(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    first = local_instance_id((str(machine_id),))
    assert first is not None and first.startswith("local-") and len(first) == 23
    assert "0123456789abcdef" not in first
    assert local_instance_id((str(machine_id),)) == first
    assert local_instance_id((str(tmp_path / "none"),)) is None


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def snapshot(self) -> WorkSnapshot:
        return WorkSnapshot(signatures_version="2026.12.01.1")

    async def set_ec2_api_proxy(self, proxy: Ec2ApiProxy | None) -> None:
        self.calls.append(("proxy", proxy))

    async def cancel(self, job_ids: Sequence[str]) -> None:
        self.calls.append(("cancel", tuple(job_ids)))

    async def offer_signatures(self, offer: SignaturesOffer) -> None:
        self.calls.append(("signatures", offer.version))

    async def offer_jobs(self, jobs: Sequence[JobSpec], invalid: Sequence[InvalidJob]) -> None:
        self.calls.append(("jobs", ([j.job_id for j in jobs], [i.job_id for i in invalid])))


class FakeClient:
    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers
        self.requests: list[dict[str, Any]] = []

    async def poll(self, request: Any) -> PollResponse:
        self.requests.append(request.to_json())
        return PollResponse.parse(self.answers.pop(0), origin="https://p")


def make_daemon(tmp_path: Path, out: io.StringIO, sink: RecordingSink) -> Daemon:
    store = IdentityStore(tmp_path)
    ident = store.create("i-0abc")
    store.save_registration(ident, appliance_id="vsa-1", certificate_pem=issue(ident.csr_pem()), ca_pem=None,
                            platform_url="https://p", poll_interval_s=180, mqtt=None)
    daemon = Daemon(
        config=Config(state_dir=tmp_path), console=Console(out), store=store, status=StatusFile(tmp_path),
        sink=sink, waker=PollWaker(), notifier=Notifier({}), timings=Timings(), imds_factory=None,
        user_data_file=None, client_factory=lambda proxy: None,  # type: ignore[arg-type,return-value]
        capabilities=Capabilities(True, 2, 7900, "x86_64", 16),
    )
    daemon.identity = store.load()
    return daemon


async def test_poll_once_hands_work_to_the_sink_in_protocol_order(tmp_path: Path) -> None:
    out, sink = io.StringIO(), RecordingSink()
    daemon = make_daemon(tmp_path, out, sink)
    bad = {"job_id": "j-2", "type": "bogus", "targets": {"ips": ["10.0.0.1"]}}
    client = FakeClient([
        {"poll_interval_s": 5, "jobs": [JOB, bad], "cancel_jobs": ["j-0"],
         "ec2_api_proxy": {"url": "http://10.9.9.9:3128", "username": None, "password": None},
         "signatures": {"version": "2026.12.04.1", "url": "/vsa/v1/signatures/2026.12.04.1",
                        "sha256": "0" * 64, "signature": "c2ln"}},
        {"poll_interval_s": 5},
        {"poll_interval_s": 60},
    ])
    await daemon.poll_once(client)  # type: ignore[arg-type]
    assert [name for name, _ in sink.calls] == ["proxy", "cancel", "signatures", "jobs"]
    assert sink.calls[3][1] == (["j-1"], ["j-2"])
    request = client.requests[0]
    assert request["appliance_id"] == "vsa-1" and request["instance_id"] == "i-0abc"
    assert request["signatures_version"] == "2026.12.01.1" and request["status"] == "idle"
    await daemon.poll_once(client)  # type: ignore[arg-type]
    await daemon.poll_once(client)  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    clamp = "vsa: the platform asked for a poll interval of 5 s; using 30 s (allowed 30..3600 s)"
    assert lines.count(clamp) == 1  # said when the value changes, not at every poll
    assert lines.count("vsa: polling the platform every 30 s") == 1
    assert "vsa: polling the platform every 60 s" in lines
    assert daemon.poll_interval_s == 60
    assert daemon.store.load().registration.poll_interval_s == 60  # type: ignore[union-attr]


def test_status_never_ran(tmp_path: Path) -> None:
    status = collect(tmp_path)
    assert status["daemon"]["state"] == "never ran"
    assert status["registration"]["state"] == "unregistered"
    out = io.StringIO()
    render(status, out)
    assert "daemon:              never ran" in out.getvalue()
    assert "signatures:          none installed" in out.getvalue()


def test_status_of_a_daemon_that_died(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    ident = store.create("i-0abc")
    store.save_registration(ident, appliance_id="vsa-9", certificate_pem=issue(ident.csr_pem()), ca_pem=None,
                            platform_url="https://p", poll_interval_s=120, mqtt=None)
    status_file = StatusFile(tmp_path)
    status_file.update(pid=2**22 + 12345, poll={"interval_s": 120, "last_at": "2026-12-04T10:00:00Z",
                                                "last_result": "ok"})
    status = collect(tmp_path)
    assert status["daemon"]["state"] == "not running (it stopped without saying so)"
    assert status["registration"] == {"state": "registered", "appliance_id": "vsa-9", "instance_id": "i-0abc",
                                      "registered_at": status["registration"]["registered_at"], "refusal": None}
    assert status["poll"]["next_at"] is None and status["poll"]["interval_s"] == 120
    json.dumps(status)
