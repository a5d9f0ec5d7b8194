"""The job journal and result spool: durable, versioned, resumable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from appliance.state.spool import Spool, SpoolFullError


def result(key: str, status: str = "scanned") -> dict[str, object]:
    return {"host_key": key, "status": status}


def test_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    spool = Spool(state)
    spool.journal_job("j-1", {"job_id": "j-1"})
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_result_lifecycle(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.journal_job("j-1", {"job_id": "j-1"})
    spool.set_job_state("j-1", "running")
    v1 = spool.put_result("j-1", "10.0.0.1", result("10.0.0.1"))
    spool.put_result("j-1", "10.0.0.2", result("10.0.0.2"))
    assert [r.host_key for r in spool.unsent()] == ["10.0.0.1", "10.0.0.2"]
    spool.mark_sent("j-1", "10.0.0.1", v1)
    assert [r.host_key for r in spool.unsent()] == ["10.0.0.2"]
    assert spool.unsent_count() == 1
    # Both stay in the spool until the completion is accepted.
    assert spool.host_keys("j-1") == ["10.0.0.1", "10.0.0.2"]
    # 409 missing_hosts: send 10.0.0.1 again.
    assert spool.mark_unsent("j-1", ["10.0.0.1", "10.9.9.9"]) == 1
    assert {r.host_key for r in spool.unsent()} == {"10.0.0.1", "10.0.0.2"}
    assert spool.finish_job("j-1", "done") == 2
    assert spool.unsent() == [] and spool.host_keys("j-1") == []
    assert spool.active_jobs() == []


def test_ack_of_an_older_version_does_not_hide_a_newer_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.journal_job("j-1", {})
    spool.set_job_state("j-1", "running")
    old = spool.put_result("j-1", "h", result("h", "down"))
    new = spool.put_result("j-1", "h", result("h", "scanned"))
    assert new == old + 1
    spool.mark_sent("j-1", "h", old)  # the 2xx of the first PUT arrives late
    pending = spool.unsent()
    assert (
        len(pending) == 1 and pending[0].version == new and pending[0].body["status"] == "scanned"
    )


def test_offered_jobs_are_not_sent_until_running(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.journal_job("j-1", {"job_id": "j-1", "title": "first"})
    spool.journal_job("j-1", {"job_id": "j-1", "title": "re-offered"})  # idempotent
    assert spool.job("j-1").spec["title"] == "first"  # type: ignore[union-attr]
    spool.put_result("j-1", "h", result("h"))
    assert spool.unsent() == []
    spool.set_job_state("j-1", "running")
    assert len(spool.unsent()) == 1


def test_survives_sigkill_right_after_commit(tmp_path: Path) -> None:
    # A child process spools a result and dies by SIGKILL: the result is there afterwards.
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from appliance.state.spool import Spool\n"
        "s = Spool(Path(sys.argv[1]))\n"
        "s.journal_job('j-9', {'job_id': 'j-9'})\n"
        "s.set_job_state('j-9', 'running')\n"
        "s.put_result('j-9', '10.1.1.1', {'host_key': '10.1.1.1'})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60)
    assert proc.returncode == -9
    spool = Spool(tmp_path)
    assert [j.job_id for j in spool.active_jobs()] == ["j-9"]
    assert [r.host_key for r in spool.unsent()] == ["10.1.1.1"]


def test_full_disk_is_a_clear_error_and_keeps_what_was_spooled(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        spool = Spool(mount)
        spool.journal_job("j-1", {})
        spool.set_job_state("j-1", "running")
        spool.put_result("j-1", "first", result("first"))
        with pytest.raises(SpoolFullError, match="disk is full"):
            for i in range(10_000):
                spool.put_result("j-1", f"h{i}", {"host_key": f"h{i}", "pad": "x" * 4000})
        assert "first" in spool.host_keys("j-1")
        spool.close()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
