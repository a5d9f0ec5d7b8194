"""``vsa scan`` with authentication, a knowledge base and the gate, as a real process in the lab's hub.

Each test runs ``ip netns exec <hub> .venv/bin/vsa scan ...`` against the lab of
hostchecks_lab.py (a real sshd, a real Samba, a bare host): secrets travel only
in environment variables, and the test checks they appear nowhere in what the
command writes. Host-key pins go to a state directory of the test's own
(``--config``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostchecks_lab import (
    PLAIN_USER,
    PWSUDO_USER,
    SUDO_USER,
    HcLab,
    LabKb,
    build,
    prerequisites,
    write_kb,
)

from tests.conftest import require

pytestmark = [pytest.mark.netns]

VSA = str(Path(sys.executable).parent / "vsa")
RUN_TIMEOUT_S = 120


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    output: str  # the --output file's text, when there is one


@pytest.fixture(scope="module")
def hc() -> Iterator[HcLab]:
    reason = prerequisites()
    require(reason is None, reason or "")
    with build() as lab:
        yield lab


@pytest.fixture(scope="module")
def kb(hc: HcLab) -> LabKb:
    return write_kb(hc.workdir / "kb.jsonl.gz")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    return path


def secrets_env(hc: HcLab) -> dict[str, str]:
    return {"VSA_T_PASS": hc.key_pass.passphrase or "", "VSA_T_SMB": hc.smb_password,
            "VSA_T_PW": hc.user_password, "VSA_T_ROOT": hc.root_password}


def vsa(hc: HcLab, config: Path, *argv: str, output: Path | None = None) -> Ran:
    """Run ``vsa`` in the hub namespace with the secrets in its environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSA_")}
    env.update(secrets_env(hc))
    args = list(argv)
    if argv and argv[0] == "scan":
        args += ["--config", str(config)]
        if output is not None:
            args += ["--output", str(output)]
    else:
        args += ["--config", str(config)]
    done = subprocess.run(hc.lab.hub_argv([VSA, *args]), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=env)
    text = output.read_text() if output is not None and output.exists() else ""
    ran = Ran(done.returncode, done.stdout, done.stderr, text)
    for secret in secrets_env(hc).values():
        for stream in (ran.stdout, ran.stderr, ran.output):
            assert secret not in stream, "a secret reached the output"
    return ran


def scan_argv(hc: HcLab, *extra: str) -> list[str]:
    return ["scan", hc.linux_ip, hc.win_ip, hc.bare_ip, "--ports", "22,445", "--engine", "connect",
            "--no-discovery", *extra]


def by_ip(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["target"]["ip"]: r for r in results}


def auth_rows(result: dict[str, Any]) -> list[tuple[Any, str, str]]:
    return [(a["record_id"], a["type"], a["status"]) for a in result["auth"]]


# ---- a full scan -----------------------------------------------------------------------


def test_json_scan_with_ssh_smb_and_kb(hc: HcLab, kb: LabKb, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    ran = vsa(hc, config, *scan_argv(
        hc, "--ssh-user", SUDO_USER, "--ssh-key", str(hc.key_pass.path),
        "--ssh-key-passphrase-env", "VSA_T_PASS", "--sudo",
        "--smb-user", hc.smb_user, "--smb-password-env", "VSA_T_SMB",
        "--kb", str(kb.path), "--format", "json"), output=out)
    assert ran.code == 0, ran.stderr
    results = json.loads(ran.output)
    assert [r["target"]["ip"] for r in results] == [hc.linux_ip, hc.win_ip, hc.bare_ip]
    hosts = by_ip(results)
    linux, win, bare = hosts[hc.linux_ip], hosts[hc.win_ip], hosts[hc.bare_ip]
    assert all(r["status"] == "scanned" for r in results)

    # The command-line records apply to every target: each host has one entry per record.
    assert auth_rows(linux) == [("cli", "unix", "success"), ("cli-windows", "windows", "error")]
    assert linux["auth"][0]["privileged"] is True
    assert "445/tcp was not open" in linux["auth"][1]["message"]
    assert linux["os"]["family"] == "linux" and linux["os"]["source"] == "ssh"
    assert linux["packages"]["manager"] == "dpkg"
    assert linux["packages"]["ecosystem"].startswith("Debian:")
    assert [p["port"] for p in linux["ports"]] == [22]
    findings = [f for f in linux["findings"] if f["id"] == kb.advisory]
    assert findings and {f["id"] for f in linux["findings"]} == {kb.advisory}
    libssl = next(f for f in findings if f["package"] == "libssl3")
    assert (libssl["installed"], libssl["fixed"], libssl["source_package"], libssl["severity"]) == (
        kb.installed, kb.fixed, kb.source, kb.severity)
    assert linux["started_at"] <= linux["finished_at"]

    assert auth_rows(win) == [("cli", "unix", "error"), ("cli-windows", "windows", "success")]
    assert "22/tcp was not open" in win["auth"][0]["message"]
    assert win["os"]["source"] == "smb" and win["packages"] is None
    assert win["findings"] and all(f["detection"] == "network" for f in win["findings"])

    assert auth_rows(bare) == [("cli", "unix", "error"), ("cli-windows", "windows", "error")]
    assert bare["packages"] is None and bare["findings"] == []

    # The host key was pinned in --config's state.dir: vsa hostkeys sees it.
    listed = vsa(hc, config, "hostkeys", "list")
    assert listed.code == 0 and listed.stdout.startswith(f"{hc.linux_ip}\tssh-ed25519\tSHA256:")


def test_table_and_html_show_auth_os_packages_and_findings(hc: HcLab, kb: LabKb, config: Path,
                                                           tmp_path: Path) -> None:
    common = ["scan", hc.linux_ip, "--ports", "22", "--engine", "connect", "--no-discovery",
              "--ssh-user", SUDO_USER, "--ssh-key", str(hc.key.path), "--sudo", "--kb", str(kb.path)]
    table = vsa(hc, config, *common)
    assert table.code == 0, table.stderr
    assert "    auth: unix cli: success (root)" in table.stdout
    assert "    os: Debian GNU/Linux" in table.stdout
    assert " dpkg packages (Debian:" in table.stdout
    assert f"of severity {kb.severity}" in table.stdout and f"[{kb.severity}] {kb.advisory}" in table.stdout
    page = vsa(hc, config, *common, "--format", "html", output=tmp_path / "r.html")
    assert page.code == 0 and "<th>auth</th><td>unix cli: success (root)" in page.output
    assert kb.advisory in page.output and kb.fixed in page.output


def test_password_login_and_password_sudo_never_show_the_password(hc: HcLab, config: Path,
                                                                  tmp_path: Path) -> None:
    ran = vsa(hc, config, "scan", hc.linux_ip, "--ports", "22", "--engine", "connect", "--no-discovery",
              "--ssh-user", PWSUDO_USER, "--ssh-password-env", "VSA_T_PW", "--sudo",
              "--sudo-password-env", "VSA_T_PW", "--format", "json", output=tmp_path / "r.json")
    assert ran.code == 0, ran.stderr
    (linux,) = json.loads(ran.output)
    assert auth_rows(linux) == [("cli", "unix", "success")] and linux["auth"][0]["privileged"] is True
    # No --kb: the host says its packages were not matched.
    assert any("no --kb given" in e for e in linux["errors"])


# ---- the gate ------------------------------------------------------------------------------


def test_gate_exits_3_naming_host_and_advisory_and_0_below(hc: HcLab, kb: LabKb, config: Path,
                                                           tmp_path: Path) -> None:
    argv = scan_argv(hc, "--ssh-user", SUDO_USER, "--ssh-key", str(hc.key.path), "--sudo",
                     "--smb-user", hc.smb_user, "--smb-password-env", "VSA_T_SMB",
                     "--kb", str(kb.path), "--format", "json")
    tripped = vsa(hc, config, *argv, "--fail-on-severity", str(kb.severity), output=tmp_path / "a.json")
    assert tripped.code == 3, tripped.stderr
    assert f"{hc.linux_ip}: {kb.advisory} (severity {kb.severity}) libssl3 {kb.installed}, fixed in {kb.fixed}" \
        in tripped.stderr
    assert f"(--fail-on-severity {kb.severity})" in tripped.stderr
    assert json.loads(tripped.output)  # the report is written before the verdict
    below = vsa(hc, config, *argv, "--fail-on-severity", str(kb.severity + 1), output=tmp_path / "b.json")
    assert below.code == 0, below.stderr
    assert f"no finding of severity {kb.severity + 1} or more" in below.stderr


def test_gate_warns_when_a_host_could_not_be_judged(hc: HcLab, kb: LabKb, config: Path) -> None:
    ran = vsa(hc, config, "scan", hc.linux_ip, "--ports", "22", "--engine", "connect", "--no-discovery",
              "--ssh-user", SUDO_USER, "--ssh-key", str(hc.wrong_key.path), "--kb", str(kb.path),
              "--fail-on-severity", "1")
    assert ran.code == 0, ran.stderr
    assert f"vsa scan: warning: {hc.linux_ip}: no packages collected (failed: " in ran.stderr
    assert "the gate could not judge its packages" in ran.stderr


def test_bad_kb_exits_2_with_words(hc: HcLab, config: Path, tmp_path: Path) -> None:
    bad = tmp_path / "kb.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    ran = vsa(hc, config, "scan", hc.linux_ip, "--kb", str(bad), "--fail-on-severity", "4")
    assert ran.code == 2
    assert ran.stderr.startswith(f"vsa scan: error: --kb {bad}: not a usable OSV bundle: ")


# ---- --check-auth --------------------------------------------------------------------------


def test_check_auth_all_pass(hc: HcLab, config: Path) -> None:
    ssh = vsa(hc, config, "scan", hc.linux_ip, "--check-auth", "--no-discovery", "--engine", "connect",
              "--ssh-user", SUDO_USER, "--ssh-key", str(hc.key.path), "--sudo")
    assert ssh.code == 0, ssh.stdout + ssh.stderr
    lines = ssh.stdout.splitlines()
    assert lines[0].startswith(f"{hc.linux_ip} ({hc.linux_ip}) record cli, host key SHA256:")
    assert lines[1] == "  ok   connect: port 22 answers SSH"
    assert lines[2].startswith("  ok   authenticate: ")
    assert lines[3] == "  ok   root: root reached through sudo"
    assert lines[4].startswith("  ok   collectors: ") and " dpkg packages" in lines[4]
    assert lines[-1] == "1 of 1 host passed the authentication checks"
    # A mixed list with both records: each host passes with the record that fits it.
    both = vsa(hc, config, "scan", hc.linux_ip, hc.win_ip, "--check-auth", "--no-discovery",
               "--engine", "connect", "--ssh-user", SUDO_USER, "--ssh-key", str(hc.key.path), "--sudo",
               "--smb-user", hc.smb_user, "--smb-password-env", "VSA_T_SMB")
    assert both.code == 0, both.stdout + both.stderr
    assert "  ok   authenticate: NTLMv2 login as" in both.stdout
    assert f"{hc.win_ip} ({hc.win_ip}) record cli\n  FAIL connect: connection refused on port 22" in both.stdout
    assert both.stdout.splitlines()[-1] == "2 of 2 hosts passed the authentication checks"


def test_check_auth_says_exactly_why_and_exits_1(hc: HcLab, config: Path) -> None:
    # su with root's password works; the same with a wrong root password fails at root only.
    good = vsa(hc, config, "scan", hc.linux_ip, "--check-auth", "--no-discovery", "--engine", "connect",
               "--ssh-user", PLAIN_USER, "--ssh-key", str(hc.key.path), "--su",
               "--sudo-password-env", "VSA_T_ROOT")
    assert good.code == 0, good.stdout + good.stderr
    assert "  ok   root: root reached through su" in good.stdout
    bad = vsa(hc, config, "scan", hc.linux_ip, hc.bare_ip, "--check-auth", "--no-discovery",
              "--engine", "connect", "--ssh-user", PLAIN_USER, "--ssh-key", str(hc.key.path), "--su",
              "--sudo-password-env", "VSA_T_SMB")
    assert bad.code == 1, bad.stdout + bad.stderr
    out = bad.stdout
    assert "  FAIL root: " in out and "  ok   authenticate: " in out
    assert f"{hc.bare_ip} ({hc.bare_ip}) record cli" in out
    assert "  FAIL connect: connection refused on port 22" in out
    assert f"{hc.bare_ip}: no record passed every step" in out
    assert out.splitlines()[-1] == "0 of 2 hosts passed the authentication checks"
    smb = vsa(hc, config, "scan", hc.win_ip, "--check-auth", "--no-discovery", "--engine", "connect",
              "--smb-user", hc.smb_user, "--smb-password-env", "VSA_T_PW")
    assert smb.code == 1 and "  FAIL authenticate: " in smb.stdout


# ---- host-key pins: changed, refused, forgotten ---------------------------------------------


def test_changed_host_key_then_forget(hc: HcLab, config: Path, tmp_path: Path) -> None:
    argv = ["scan", hc.linux_ip, "--ports", "22", "--engine", "connect", "--no-discovery",
            "--ssh-user", SUDO_USER, "--ssh-key", str(hc.key.path), "--format", "json"]
    first = vsa(hc, config, *argv, output=tmp_path / "1.json")
    assert auth_rows(json.loads(first.output)[0]) == [("cli", "unix", "success")]
    hc.ssh.replace_host_keys()
    second = vsa(hc, config, *argv, output=tmp_path / "2.json")
    (linux,) = json.loads(second.output)
    assert auth_rows(linux) == [("cli", "unix", "error")]
    assert "host key changed" in linux["auth"][0]["message"]
    assert f"vsa hostkeys forget {hc.linux_ip}" in linux["auth"][0]["message"]
    forgot = vsa(hc, config, "hostkeys", "forget", hc.linux_ip)
    assert forgot.code == 0, forgot.stderr
    third = vsa(hc, config, *argv, output=tmp_path / "3.json")
    assert auth_rows(json.loads(third.output)[0]) == [("cli", "unix", "success")]
