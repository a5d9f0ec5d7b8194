"""Issue 11: a hostile platform. `vsa run` as a real process against appliance.lab.hostile.

The hostile server registers the appliance properly, then answers polls with an
oversized body, a slow drip, invalid JSON, wrong types, a signatures offer on
another origin, a bundle signed by another key, and a certificate for the wrong
host name. For each: the console says why, the daemon stays up and polls again
once the fault is removed, and nothing is installed (no bundle under the state
directory's signatures/, `vsa status` signatures_version still null).

Already covered elsewhere (not repeated here): the client's limits and typed
errors in-process (tests/unit/test_platform_client.py), bundle refusals at the
function level (tests/integration/test_kb_bundle.py), a bad signature refused
while jobs go on (test_engine_jobs.py::test_malformed_job_fails_fast_...).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonLab

from appliance.lab.hostile import BAD_VERSION, FOREIGN_VERSION, HostilePlatform

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 60.0  # PlatformClient's total request timeout


@pytest.fixture
def hostile_lab(tmp_path: Path) -> Iterator[tuple[DaemonLab, HostilePlatform]]:
    hostile = HostilePlatform(tmp_path / "hostile")
    with hostile.serve_in_thread(), DaemonLab(tmp_path) as lab:
        lab.set_user_data("PERSCODE=HOSTILE-0001\n")
        lab.config_path.write_text("\n".join([
            "[platform]", f'url = "{hostile.url}"', f'ca_file = "{hostile.ca_file}"',
            "[state]", f'dir = "{lab.state_dir}"',
            "[imds]", f'endpoint = "{lab.imds_url}"',
            "[signatures]", f'public_key = "{hostile.public_key_b64()}"',
        ]) + "\n")
        yield lab, hostile


def installed_files(lab: DaemonLab) -> set[str]:
    """Bundle files under signatures/ (a refusal note is allowed: it is not an installed bundle)."""
    directory = lab.state_dir / "signatures"
    if not directory.exists():
        return set()
    return {p.name for p in directory.iterdir() if "refus" not in p.name}


def recover(lab: DaemonLab, hostile: HostilePlatform) -> None:
    """Remove the fault: the daemon must poll successfully again, still the same process."""
    before = hostile.count("/vsa/v1/poll ok")
    hostile.mode = "ok"
    hostile.wrong_name = False
    lab.wait_until(lambda: hostile.count("/vsa/v1/poll ok") >= before + 2, timeout_s=30,
                   what="good polls after the fault was removed")
    assert lab.proc is not None and lab.proc.poll() is None


def test_each_hostile_answer_is_refused_in_words_and_nothing_is_installed(
        hostile_lab: tuple[DaemonLab, HostilePlatform]) -> None:
    lab, hostile = hostile_lab
    lab.start_daemon()
    lab.wait_for(r"^vsa: registered with the platform: appliance ID vsa-hostile$")
    lab.wait_until(lambda: hostile.count("/vsa/v1/poll ok") >= 2, timeout_s=20, what="good polls")
    pid = lab.proc.pid  # type: ignore[union-attr]

    cases = [
        ("oversized", r"poll failed: poll: the response exceeds the limit of 4194304 bytes"),
        ("invalid_json", r"poll failed: poll: the answer is not JSON"),
        ("wrong_types", r"poll failed: poll: .*poll_interval_s"),
        ("foreign_signatures", rf"(poll failed: poll: .*signatures\.url|signatures {FOREIGN_VERSION} refused).*"
                               r"(origin|another)"),
        ("bad_signature", rf"signatures {BAD_VERSION} refused: .*signature"),
    ]
    for mode, words in cases:
        offset = len(lab.run_console())
        hostile.mode = mode
        lab.wait_until(lambda m=mode: hostile.count(f"/vsa/v1/poll {m}") >= 1, timeout_s=20, what=f"a {mode} poll")
        lab.wait_for(words, timeout_s=30)
        recover(lab, hostile)
        assert len(lab.run_console()) > offset
    # The foreign origin was never asked for anything; the bad bundle was fetched and refused.
    assert hostile.count(f"foreign /vsa/v1/signatures/{FOREIGN_VERSION}") == 0
    assert hostile.count(f"own /vsa/v1/signatures/{BAD_VERSION}") >= 1

    # A certificate for another name: the verdict names verification; polling resumes with the right one.
    hostile.wrong_name = True
    lab.wait_for(r"poll failed: unable to connect to 127\.0\.0\.1:\d+ - please fix: the platform's TLS "
                 r"certificate is not valid for the name 127\.0\.0\.1 \(.*mismatch.*\); check that platform\.url "
                 r"names the host the certificate was issued for", timeout_s=30)
    recover(lab, hostile)

    # A body dripped one byte a second: the client gives up within its timeout, and says so.
    hostile.mode = "drip"
    dripped_at = time.monotonic()
    lab.wait_for(r"poll failed: poll: the platform answered 200 but the body did not arrive in full within "
                 r"the 60 s request timeout", timeout_s=CLIENT_TIMEOUT_S + 30)
    assert time.monotonic() - dripped_at < CLIENT_TIMEOUT_S + 20
    recover(lab, hostile)

    assert lab.proc is not None and lab.proc.pid == pid and lab.proc.poll() is None
    assert installed_files(lab) == set(), installed_files(lab)
    status = lab.status()
    assert status["signatures_version"] is None and status["daemon"]["state"] == "running"
    assert "Traceback" not in lab.console()
    assert all(line.startswith("vsa: ") for line in lab.console().splitlines())
    assert lab.stop_daemon() == 0
    print(lab.console())  # the refusals in the operator's words, for the record (pytest -s)
