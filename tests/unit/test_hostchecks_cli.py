"""vsa scan's authentication, knowledge-base and gate options (no network), and the report's new facts."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest

from appliance.authrecords import UnixRecord, WindowsRecord
from appliance.console import redact
from appliance.results import AuthOutcome, Finding, HostResult, OsInfo, Package, Packages, Target
from appliance.scan import command, report
from appliance.scan.ssh import PreflightReport, Stage


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def key(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = tmp_path / "id"
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    return path


@pytest.mark.parametrize("argv, words", [
    (["--ssh-user", "u"], "--ssh-user needs --ssh-key FILE or --ssh-password-env VAR"),
    (["--sudo"], "need --ssh-user"),
    (["--ssh-user", "u", "--ssh-password-env", "VSA_T_UNSET"], "VSA_T_UNSET: the variable is not set"),
    (["--ssh-user", "u", "--ssh-password-env", "VSA_T_PW", "--su"], "--su needs --sudo-password-env"),
    (["--ssh-user", "u", "--ssh-password-env", "VSA_T_PW", "--sudo-password-env", "VSA_T_PW"],
     "--sudo-password-env needs --sudo or --su"),
    (["--ssh-user", "u", "--ssh-password-env", "VSA_T_PW", "--ssh-port", "0"], "--ssh-port"),
    (["--smb-user", "u", "--smb-password-env", "VSA_T_UNSET"], "the variable is not set"),
    (["--smb-user", "u", "--smb-password-env", "VSA_T_EMPTY"], "the variable is empty"),
    (["--fail-on-severity", "4"], "--fail-on-severity needs --kb FILE"),
    (["--fail-on-severity", "0"], "between 1 and 5"),
    (["--check-auth"], "--check-auth needs --ssh-user or --smb-user"),
    (["--kb", "/nonexistent/kb.gz"], "no such file"),
])
def test_bad_options_exit_2_with_words_before_any_probe(argv: list[str], words: str,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSA_T_PW", "pw-cli-unit-1")
    monkeypatch.setenv("VSA_T_EMPTY", "")
    monkeypatch.delenv("VSA_T_UNSET", raising=False)
    monkeypatch.setenv("VSA_CONFIG", "")
    # 192.0.2.1 (TEST-NET) is never probed: every case fails at the options.
    assert command.run(parse("192.0.2.1", *argv)) == command.EXIT_USAGE
    err = capsys.readouterr().err
    assert words in err and err.startswith("vsa scan: error: ")


@pytest.mark.parametrize("content, words", [
    (b"not gzip at all", "not a complete gzip file"),
    (gzip.compress(b"{\"id\": 1}\nnot json\n"), "line 2 of the bundle is not JSON"),
    (gzip.compress(b""), "holds no OSV record"),
])
def test_a_bad_kb_file_exits_2_with_words(tmp_path: Path, content: bytes, words: str,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSA_CONFIG", "")
    bad = tmp_path / "kb.jsonl.gz"
    bad.write_bytes(content)
    assert command.run(parse("192.0.2.1", "--kb", str(bad), "--fail-on-severity", "3")) == command.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--kb {bad}: " in err and words in err


def test_records_from_options_read_secrets_from_the_environment(key: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSA_T_SUDO", "sudo-secret-123")
    monkeypatch.setenv("VSA_T_SMB", "smb-secret-456")
    args = parse("192.0.2.1", "--ssh-user", "scanner", "--ssh-key", str(key), "--sudo",
                 "--sudo-password-env", "VSA_T_SUDO", "--ssh-port", "2222",
                 "--smb-user", "admin", "--smb-domain", "CORP", "--smb-password-env", "VSA_T_SMB")
    command.validate(args)
    unix, windows = command.records_from(args)
    assert isinstance(unix, UnixRecord) and isinstance(windows, WindowsRecord)
    assert (unix.username, unix.port, unix.root_delegation.method, unix.root_delegation.password) == (
        "scanner", 2222, "sudo", "sudo-secret-123")
    assert unix.applies_to("10.1.2.3") and unix.applies_to("2001:db8::1")
    assert (windows.id, windows.username, windows.domain, windows.password) == (
        "cli-windows", "admin", "CORP", "smb-secret-456")
    assert windows.protocols == ("ntlmv2",)
    # Registered with the scrubber the moment they were read.
    assert redact("x sudo-secret-123 smb-secret-456") == "x *** ***"


def test_there_is_no_option_taking_a_password() -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    options = {o for a in parser._actions for o in a.option_strings}
    assert not any("password" in o and not o.endswith("-env") for o in options)
    assert not any("passphrase" in o and not o.endswith("-env") for o in options)


# ---- the report ------------------------------------------------------------------------


def checked_host() -> HostResult:
    r = HostResult(target=Target(ip="10.0.0.2"), status="scanned")
    r.os = OsInfo("linux", "Debian GNU/Linux", "12", "6.1.0-27-amd64", "x86_64", "ssh")
    r.auth = [AuthOutcome("cli", "unix", "success", True, "key 1 accepted"),
              AuthOutcome(None, "windows", "not_applicable", False, "no windows record applies")]
    r.packages = Packages("dpkg", "Debian:12", (Package("libssl3", "3.0.1-1", source_name="openssl"),
                                                Package("bash", "5.2-1")))
    r.findings = [Finding("CVE-1", "osv", 3, "medium one", "libssl3", "openssl", "3.0.1-1", "3.0.2-1"),
                  Finding("CVE-2", "osv", 5, "<b>bad</b> one", "libssl3", "openssl", "3.0.1-1", None)]
    return r


def test_table_shows_auth_os_packages_and_findings_by_severity() -> None:
    table = report.render([checked_host()], "table")
    lines = table.splitlines()
    assert "    os: Debian GNU/Linux 12 (linux, kernel 6.1.0-27-amd64, x86_64; via ssh)" in lines
    assert "    auth: unix cli: success (root) - key 1 accepted" in lines
    assert "    auth: windows (no record): not_applicable" in lines
    assert "    packages: 2 dpkg packages (Debian:12)" in lines
    assert "    findings: 2 findings: 1 of severity 5, 1 of severity 3" in lines
    worst = next(i for i, line in enumerate(lines) if "CVE-2" in line)
    assert worst < next(i for i, line in enumerate(lines) if "CVE-1" in line)  # most severe first
    assert lines[worst] == "    [5] CVE-2 <b>bad</b> one - libssl3 3.0.1-1 (source openssl), no fix yet"


def test_html_shows_the_same_facts_escaped() -> None:
    page = report.render([checked_host()], "html")
    assert "<th>auth</th><td>unix cli: success (root) - key 1 accepted</td>" in page
    assert "<th>packages</th><td>2 dpkg packages (Debian:12)</td>" in page
    assert "2 findings: 1 of severity 5, 1 of severity 3" in page
    assert "&lt;b&gt;bad&lt;/b&gt;" in page and "<b>bad</b>" not in page
    assert '<tr class="sev5">' in page


def test_json_is_still_exactly_the_wire_form() -> None:
    host = checked_host()
    assert json.loads(report.render([host], "json")) == [host.to_wire()]


# ---- --check-auth text and verdict -----------------------------------------------------------


def test_preflight_text_passes_only_when_every_target_passed() -> None:
    ok = PreflightReport("10.0.0.2", "10.0.0.2", "cli", Stage("connect", True, "port 22 answers SSH"),
                         Stage("authenticate", True, "key 1 accepted"), Stage("root", True, "root reached through sudo"),
                         Stage("collectors", True, "812 dpkg packages"), "SHA256:x")
    bad = PreflightReport("10.0.0.3", "10.0.0.3", "cli", Stage("connect", True, "port 22 answers SSH"),
                          Stage("authenticate", False, "refused"), Stage("root", None, "not reached"),
                          Stage("collectors", None, "not reached"), None)
    results = [HostResult(Target("10.0.0.2"), "scanned"), HostResult(Target("10.0.0.3"), "scanned"),
               HostResult(Target("10.0.0.4"), "down")]
    lines, passed = command.preflight_text(results[:1], {"10.0.0.2": [ok]})
    assert passed and lines[-1] == "1 of 1 host passed the authentication checks"
    lines, passed = command.preflight_text(results, {"10.0.0.2": [ok], "10.0.0.3": [bad]})
    assert not passed
    assert "  FAIL authenticate: refused" in lines
    assert "10.0.0.4: down: no answer to discovery (try --no-discovery); not checked" in lines
    assert "10.0.0.3: no record passed every step" in lines
    assert lines[-1] == "1 of 3 hosts passed the authentication checks"
    # One passing record per host is enough (a Linux and a Windows record on a mixed list).
    lines, passed = command.preflight_text(results[:1], {"10.0.0.2": [bad, ok]})
    assert passed and lines[-1] == "1 of 1 host passed the authentication checks"


def test_blind_spots_name_hosts_whose_packages_the_gate_could_not_see() -> None:
    from appliance.authrecords import parse_auth_record

    rec = parse_auth_record({"type": "unix", "id": "cli", "username": "u", "password": "pw-blind-1",
                             "targets": ["0.0.0.0/0"]})
    seen = checked_host()
    blind = HostResult(Target("10.0.0.3"), "scanned",
                       auth=[AuthOutcome("cli", "unix", "failed", False, "key 1 refused")])
    assert command.blind_spots([seen, blind], [rec]) == [
        "10.0.0.3: no packages collected (failed: key 1 refused); the gate could not judge its packages"]
    assert command.blind_spots([blind], []) == []
    windows_host = HostResult(Target("10.0.0.4"), "scanned", auth=[
        AuthOutcome("cli", "unix", "error", False, "port 22/tcp was not open"),
        AuthOutcome("cli-windows", "windows", "success", False, "NTLMv2 login accepted")])
    assert command.blind_spots([windows_host], [rec]) == []


def test_an_unusable_state_dir_is_said_before_any_login(tmp_path: Path, key: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VSA_CONFIG", "")
    monkeypatch.setenv("VSA_STATE_DIR", str(blocker / "state"))
    args = parse("192.0.2.1", "--ssh-user", "u", "--ssh-key", str(key))
    assert command.run(args) == command.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"state.dir {blocker / 'state'} cannot be created" in err and "VSA_STATE_DIR" in err
