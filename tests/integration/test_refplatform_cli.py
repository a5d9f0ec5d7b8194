"""The admin command line and the server as a separate process, sharing one data directory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.lab.platform import Platform, PlatformProcess
from appliance.lab.platform.client import LabAppliance, host_result

CLI_TIMEOUT_S = 60


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "appliance.lab.platform", "--data-dir", str(data_dir), *args],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_drives_a_server_process(tmp_path: Path) -> None:
    data = tmp_path / "platform"
    init = json.loads(cli(data, "init", "--poll-interval", "30", "--server-name", "127.0.0.1",
                          "--server-name", "localhost"))
    assert init["server_names"] == ["127.0.0.1", "localhost"]
    code = cli(data, "create-perscode", "--label", "demo").strip()
    assert len(code) == 14
    record = tmp_path / "rec.json"
    record.write_text(json.dumps({"type": "unix", "id": "rec-1", "username": "scanner",
                                  "password": "Cli-secret-pw", "targets": ["10.77.0.0/24"]}))
    with PlatformProcess(data, host="127.0.0.1", port=0) as server:
        a = LabAppliance(server.url, data / "ca.pem", "i-0123456789abcdef0", workdir=tmp_path)
        assert asyncio.run(a.register(code)).status == 201
        appliances = json.loads(cli(data, "list-appliances"))
        assert appliances[0]["appliance_id"] == a.appliance_id
        job_id = cli(data, "submit-job", "--ips", "10.77.0.10", "--title", "CLI job",
                     "--auth-file", str(record)).strip()
        polled = asyncio.run(a.poll())
        assert polled.body["poll_interval_s"] == 30
        job = polled.body["jobs"][0]
        assert job["job_id"] == job_id and job["title"] == "CLI job"
        assert a.decrypt(job["auth_records"][0])["password"] == "Cli-secret-pw"
        assert asyncio.run(a.accept(job_id)).status == 200
        assert asyncio.run(a.put_host(job_id, host_result("10.77.0.10"))).status == 201
        # A fault set from the command line reaches the running server.
        cli(data, "fault", "fail", "--count", "1", "--retry-after", "3", "--path-re", "/complete$")
        first = asyncio.run(a.complete(job_id, ["10.77.0.10"]))
        assert (first.status, first.headers["Retry-After"]) == (503, "3")
        assert asyncio.run(a.complete(job_id, ["10.77.0.10"])).status == 200
        results = json.loads(cli(data, "results", job_id))
        assert results["state"] == "completed"
        assert results["hosts"]["10.77.0.10"]["status"] == "scanned"
        kb = tmp_path / "kb.jsonl"
        kb.write_text('{"id": "CVE-2024-0001"}\n')
        offer = json.loads(cli(data, "publish-signatures", str(kb), "--version", "2026.12.04.1"))
        assert asyncio.run(a.poll()).body["signatures"]["sha256"] == offer["sha256"]
        assert cli(data, "requests", "--path", f"/vsa/v1/jobs/{job_id}/complete", "--count").strip() == "2"
        cli(data, "forget-appliance", a.appliance_id)
        assert asyncio.run(a.poll()).status == 401
    # The password never reached the CLI's output or the database in clear.
    blob = b"".join(p.read_bytes() for p in data.glob("platform.db*"))
    assert b"Cli-secret-pw" not in blob
    with Platform(data) as platform:
        assert platform.keygen() == init["signatures_public_key"]


def test_cli_reports_errors_in_words(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance.lab.platform", "--data-dir", str(tmp_path / "none"),
         "list-appliances"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 1 and "init" in done.stderr
