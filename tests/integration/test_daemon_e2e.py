"""End to end: `vsa run` as a real process against the IMDS emulator and the reference platform.

Each test starts the daemon with test timings (polls every 2 s as the platform
sets, refusals retried every 2 s), watches its console and the platform's
request log, and stops it with SIGTERM (exit 0 expected).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import INSTANCE_A, INSTANCE_B, DaemonLab

from appliance.lab.squid import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DaemonLab]:
    with DaemonLab(tmp_path) as daemon_lab:
        yield daemon_lab


def register_ok(lab: DaemonLab, code: str) -> str:
    """Wait for the registration line and return the appliance ID."""
    return lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$").group(1)


def test_registers_and_polls_at_the_platform_interval(lab: DaemonLab) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\nHOSTNAME_HINT=x\n")
    lab.start_daemon()
    appliance_id = register_ok(lab, code)
    lab.wait_until(lambda: len(lab.polls()) >= 4, timeout_s=20, what="4 polls")

    # The console shows the facts RUNTIME.md lists, in this order.
    console = lab.run_console()
    expected = [
        "vsa: vsa 0.1.0 starting",
        "vsa: IMDSv2 in use",
        f"vsa: personalization code found (PERSCODE ending in {code[-4:]})",
        "vsa: no proxy (PROXY_URL not set): connecting to the platform directly",
        "vsa: user-data keys ignored (unknown): HOSTNAME_HINT",
        f"vsa: platform 127.0.0.1:{lab.server.port}: reachable",  # type: ignore[union-attr]
        f"vsa: registered with the platform: appliance ID {appliance_id}",
        "vsa: polling the platform every 2 s",
    ]
    positions = [console.find(line) for line in expected]
    assert all(p >= 0 for p in positions), console
    assert positions == sorted(positions), console
    assert code not in console and code not in lab.journal()
    assert all(line.startswith("vsa: ") for line in console.splitlines())

    # Certificate-authenticated polls at the interval the platform set (2 s ±10 %, plus latency).
    polls = lab.polls()
    assert {p["appliance_id"] for p in polls} == {appliance_id}
    assert {p["user_agent"] for p in polls} == {"vsa/0.1.0"}
    gaps = [b["at_s"] - a["at_s"] for a, b in zip(polls, polls[1:], strict=False)]
    assert all(1.6 <= g <= 3.5 for g in gaps), gaps
    # The first poll follows registration at once.
    register_at = lab.registers(status=201)[0]["at_s"]
    assert polls[0]["at_s"] - register_at < 1.5

    # The platform got the instance facts from IMDS.
    entry = lab.platform.appliance(appliance_id)  # type: ignore[union-attr]
    assert INSTANCE_A in json.dumps(entry)

    # `vsa status` shows the same facts, while the daemon runs.
    status = lab.status()
    assert status["daemon"]["state"] == "running"
    assert status["registration"]["state"] == "registered"
    assert status["registration"]["appliance_id"] == appliance_id
    assert status["registration"]["instance_id"] == INSTANCE_A
    assert status["poll"]["interval_s"] == 2 and status["poll"]["last_result"] == "ok"
    assert status["poll"]["count"] >= 3
    assert status["jobs"] == [] and status["spool_pending"] == 0 and status["signatures_version"] is None
    assert status["imds"] == "v2" and status["perscode"] == f"****{code[-4:]}"
    text = lab.status_text()
    assert f"registered as {appliance_id}" in text and "poll interval:       2 s" in text

    # An out-of-range interval is clamped, and the console says so naming the value.
    lab.platform.set_poll_interval(7200)  # type: ignore[union-attr]
    lab.wait_for(r"the platform asked for a poll interval of 7200 s; using 3600 s \(allowed 30\.\.3600 s\)")

    # State directory: 0700, every file 0600, the key never elsewhere, no secrets.
    assert stat.S_IMODE(lab.state_dir.stat().st_mode) == 0o700
    for path, data in lab.state_files_text():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert code.encode() not in data, path
        if path.name != "key.pem":
            assert b"PRIVATE KEY" not in data, path
    assert lab.stop_daemon() == 0
    assert lab.run_console().rstrip().endswith("vsa: stopped")
    assert lab.status()["daemon"]["state"] == "stopped"


def test_restart_polls_at_once_without_registering_again(lab: DaemonLab) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.platform.set_poll_interval(30)  # type: ignore[union-attr]
    lab.start_daemon()
    appliance_id = register_ok(lab, code)
    lab.wait_until(lambda: len(lab.polls()) >= 1, timeout_s=10, what="the first poll")
    assert lab.stop_daemon(signal.SIGINT) == 0
    started = time.time()
    lab.start_daemon()
    lab.wait_for(rf"^vsa: registered as {appliance_id} \(since ")
    lab.wait_until(lambda: len(lab.polls()) >= 2, timeout_s=10, what="the first poll after the restart")
    assert lab.polls()[1]["at_s"] - started < 8.0
    assert len(lab.registers()) == 1
    assert "polling the platform every 30 s" in lab.run_console()
    assert lab.stop_daemon() == 0


def test_missing_then_bad_then_good_user_data(lab: DaemonLab) -> None:
    lab.set_user_data(None)
    lab.start_daemon()
    lab.wait_for(r"no user-data found: add the line PERSCODE=<your personalization code> to the instance's user-data"
                 r".*; checking again every 2 s")
    lab.set_user_data("PROXY_URL=10.0.0.1:3128\n")
    lab.wait_for(r"user-data has no PERSCODE: add the line PERSCODE=")
    lab.set_user_data("PERSCODE=abc\n")
    lab.wait_for(r"user-data cannot be used: PERSCODE has 3 characters; it must have 8 to 64 .* nothing is guessed")
    assert lab.proc is not None and lab.proc.poll() is None  # never exits for this
    assert lab.status()["daemon"]["phase"] == "user-data"
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    register_ok(lab, code)
    assert lab.registers(status=201)
    assert lab.stop_daemon() == 0


def test_invalid_perscode_is_retried_until_the_operator_creates_it(lab: DaemonLab) -> None:
    code = "LATER-created-0403"
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.start_daemon()
    lab.wait_for(r"registration refused: the platform does not know the personalization code \*\*\*\*0403 "
                 r"\(403 invalid_perscode.*\) - check PERSCODE in user-data or create the code on the platform; "
                 r"trying again every 2 s")
    lab.wait_until(lambda: len(lab.registers(status=403)) >= 2, timeout_s=15, what="a second 403")
    assert lab.run_console().count("403 invalid_perscode") == 1  # said once, not at every retry
    assert lab.status()["registration"]["state"] == "refused"
    lab.platform.create_perscode(code)  # type: ignore[union-attr]
    register_ok(lab, code)
    assert code not in lab.console() and code not in lab.journal()
    assert lab.stop_daemon() == 0


def test_clone_sets_the_old_identity_aside_and_perscode_in_use_is_explained(lab: DaemonLab) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.start_daemon()
    first_id = register_ok(lab, code)
    assert lab.stop_daemon() == 0
    polls_before = len(lab.polls())

    # The disk now boots on another instance, with the same user-data (a launched copy).
    lab.set_instance(INSTANCE_B)
    lab.start_daemon()
    lab.wait_for(
        rf"^vsa: this disk was registered as {INSTANCE_A} but runs on {INSTANCE_B} \(a clone, a snapshot restored "
        r"elsewhere or a moved disk\): setting the old identity aside and registering afresh$"
    )
    lab.wait_for(r"registration refused: the personalization code \*\*\*\*\w{4} is bound to another instance "
                 r"\(409 perscode_in_use: .+\) - give this instance a code of its own")
    lab.wait_until(lambda: len(lab.registers(status=409)) >= 2, timeout_s=15, what="a second 409")
    # The old identity was never used again: no poll since the restart.
    assert len(lab.polls(status=None)) == polls_before
    aside = [p for p in lab.state_dir.iterdir() if p.name.startswith("identity.old-")]
    assert len(aside) == 1 and (aside[0] / "certificate.pem").exists()
    assert stat.S_IMODE(aside[0].stat().st_mode) == 0o700

    # The operator gives this instance its own code: it registers as a new appliance.
    new_code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={new_code}\n")
    second_id = register_ok(lab, new_code)
    assert second_id != first_id
    assert lab.status()["registration"]["instance_id"] == INSTANCE_B
    assert lab.stop_daemon() == 0


def test_forgotten_appliance_reregisters_and_keeps_spool_and_journal(lab: DaemonLab) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.start_daemon()
    appliance_id = register_ok(lab, code)
    lab.wait_until(lambda: len(lab.polls()) >= 1, timeout_s=10, what="a poll")
    # Stand-ins for the job engine's durable state: they must survive the wipe.
    (lab.state_dir / "spool.db").write_bytes(b"spool")
    (lab.state_dir / "journal").mkdir(exist_ok=True)
    (lab.state_dir / "journal" / "j-1.json").write_text("{}")
    old_cert = (lab.state_dir / "identity" / "certificate.pem").read_bytes()

    lab.platform.forget_appliance(appliance_id)  # type: ignore[union-attr]
    lab.wait_for(r"the platform does not know this appliance any more \(401 unknown_appliance.*\): wiping the "
                 r"identity \(not the spool or job journal\) and registering again with the code from user-data")
    again = lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$", count=2).group(1)
    polls_after = len(lab.polls())
    lab.wait_until(lambda: len(lab.polls()) > polls_after, timeout_s=10, what="polls after re-registration")
    assert lab.polls()[-1]["appliance_id"] == again
    assert (lab.state_dir / "identity" / "certificate.pem").read_bytes() != old_cert
    assert (lab.state_dir / "spool.db").read_bytes() == b"spool"
    assert (lab.state_dir / "journal" / "j-1.json").exists()
    assert lab.stop_daemon() == 0


def test_503_with_retry_after_for_a_while(lab: DaemonLab) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    # Registration meets the outage first...
    lab.platform.fail_next(2, status=503, retry_after_s=1, path_re="^/vsa/v1/register$")  # type: ignore[union-attr]
    lab.start_daemon()
    lab.wait_for(r"registration failed: register: the platform answered 503 unavailable")
    register_ok(lab, code)
    lab.wait_until(lambda: len(lab.polls()) >= 1, timeout_s=10, what="a poll")
    # ...then polls do, for 6 seconds, each answered with Retry-After: 1.
    lab.platform.fail_next(duration_s=6, status=503, retry_after_s=1, path_re="^/vsa/v1/poll$")  # type: ignore[union-attr]
    lab.wait_for(r"poll failed: poll: the platform answered 503 unavailable")
    lab.wait_for(r"the platform answers again \(after \d+ failed polls?\)", timeout_s=20)
    failed = lab.polls(status=503)
    assert len(failed) >= 3
    gaps = [b["at_s"] - a["at_s"] for a, b in zip(failed, failed[1:], strict=False)]
    assert all(g >= 0.9 for g in gaps), gaps  # Retry-After: 1 honoured
    assert lab.run_console().count("poll failed") == 1  # said once per outage
    lab.wait_until(lambda: lab.status()["poll"]["last_result"] == "ok", timeout_s=10, what="a good poll")
    assert lab.proc is not None and lab.proc.poll() is None
    assert lab.stop_daemon() == 0


def test_unreachable_platform_is_said_and_the_daemon_keeps_trying(lab: DaemonLab) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    port = free_port()
    lab.write_config()
    config = lab.config_path.read_text().replace(lab.server.url, f"https://127.0.0.1:{port}")  # type: ignore[union-attr]
    lab.config_path.write_text(config)
    lab.start_daemon()
    lab.wait_for(rf"^vsa: platform: unable to connect to 127.0.0.1:{port} - please fix: the connection was refused; "
                 rf"check that the platform listens on port {port}")
    time.sleep(3)
    assert lab.proc is not None and lab.proc.poll() is None
    status = lab.status()
    assert status["platform"]["reachable"] is False and status["daemon"]["phase"] == "connectivity"
    assert lab.stop_daemon() == 0


def test_imds_disabled_with_a_user_data_file(lab: DaemonLab, tmp_path: Path) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    user_data = tmp_path / "user-data.txt"
    user_data.write_text(f"PERSCODE={code}\n")
    lab.start_daemon("--user-data", str(user_data), env=lab.env(AWS_EC2_METADATA_DISABLED="true"))
    lab.wait_for(rf"IMDS is disabled \(imds.disabled\): no instance facts; user-data comes from {user_data}")
    register_ok(lab, code)
    assert lab.imds is not None and lab.imds.count() == 0  # IMDS never asked
    assert lab.stop_daemon() == 0


def test_no_platform_url_is_a_configuration_error(tmp_path: Path) -> None:
    import subprocess

    from daemon_harness import vsa_command

    config = tmp_path / "c.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "s"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VSA_", "AWS_"))}
    result = subprocess.run([*vsa_command(), "run", "--config", str(config)], capture_output=True, text=True, env=env,
                            timeout=30)
    assert result.returncode == 1
    assert "vsa: cannot start: no platform URL is configured: set platform.url" in result.stdout


def test_vsa_reset_while_running_registers_afresh(lab: DaemonLab) -> None:
    import subprocess

    from daemon_harness import vsa_command

    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.start_daemon()
    register_ok(lab, code)
    old_cert = (lab.state_dir / "identity" / "certificate.pem").read_bytes()
    (lab.state_dir / "spool.db").write_bytes(b"spool")
    reset = subprocess.run([*vsa_command(), "reset", "--yes", "--config", str(lab.config_path)],
                           capture_output=True, text=True, env=lab.env(), timeout=30)
    assert reset.returncode == 0, reset.stderr
    assert "vsa: reset: wiped the identity" in reset.stdout and "spool and job journal are kept" in reset.stdout
    lab.wait_for(r"^vsa: the identity was wiped \(vsa reset\): registering afresh", timeout_s=15)
    lab.wait_for(r"^vsa: registered with the platform: appliance ID \S+$", count=2)
    assert (lab.state_dir / "identity" / "certificate.pem").read_bytes() != old_cert
    assert (lab.state_dir / "spool.db").read_bytes() == b"spool"
    assert len(lab.registers(status=201)) == 2  # same instance, same code: allowed (supersedes)
    assert lab.stop_daemon() == 0
