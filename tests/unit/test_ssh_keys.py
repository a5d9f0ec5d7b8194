"""SSH pure parts: key loading in every form, delegation words, command lines, preflight text."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.authrecords import PrivateKeySpec
from appliance.console import redact
from appliance.lab import sshlab
from appliance.scan import ssh


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, sshlab.UserKey]:
    work = tmp_path_factory.mktemp("keys")
    ca = sshlab.make_ca(work / "ca") if sshlab._which("ssh-keygen") else None
    return sshlab.make_user_keys(work / "k", ca, "someone")


def spec(k: sshlab.UserKey, **kw: object) -> PrivateKeySpec:
    fields = {"pem": k.pem, "passphrase": k.passphrase, "certificate": k.certificate}
    fields.update(kw)
    return PrivateKeySpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "algo"), [
    ("rsa-openssh", "ssh-rsa"), ("rsa-pem", "ssh-rsa"), ("ecdsa-openssh", "ecdsa-sha2-nistp256"),
    ("ecdsa-pem", "ecdsa-sha2-nistp256"), ("ed25519-openssh", "ssh-ed25519"),
    ("ed25519-pkcs8", "ssh-ed25519"), ("ed25519-passphrase", "ssh-ed25519"),
    ("rsa-pem-passphrase", "ssh-rsa"), ("ecdsa-pkcs8-passphrase", "ecdsa-sha2-nistp384"),
])
def test_every_form_loads(keys: dict[str, sshlab.UserKey], name: str, algo: str) -> None:
    loaded = ssh.load_key(spec(keys[name]))
    assert loaded.problem is None and loaded.pkey is not None
    assert loaded.pkey.get_name() == algo
    # The label names the key by its public fingerprint, never by anything secret.
    assert loaded.pkey.fingerprint in loaded.label
    assert "PRIVATE" not in loaded.label


def test_problems_are_words(keys: dict[str, sshlab.UserKey]) -> None:
    k = keys["ed25519-passphrase"]
    assert "wrong passphrase" in (ssh.load_key(spec(k, passphrase="nope")).problem or "")
    assert "no passphrase" in (ssh.load_key(spec(k, passphrase=None)).problem or "")
    assert "unsupported" in (ssh.load_key(spec(keys["dsa"])).problem or "")
    assert ssh.load_key(PrivateKeySpec(pem="not a key")).problem
    # A passphrase given for a key that has none is harmless.
    assert ssh.load_key(spec(keys["ed25519-openssh"], passphrase="extra")).problem is None


def test_certificate(keys: dict[str, sshlab.UserKey]) -> None:
    if "cert" not in keys:
        pytest.skip("ssh-keygen missing")
    loaded = ssh.load_key(spec(keys["cert"]))
    assert loaded.problem is None and "ssh-ed25519-cert-v01@openssh.com certificate" in loaded.label
    other = ssh.load_key(spec(keys["rsa-openssh"], certificate=keys["cert"].certificate))
    assert other.problem and "certificate" in other.problem
    junk = ssh.load_key(spec(keys["ed25519-openssh"], certificate="ssh-ed25519 AAAA"))
    assert junk.problem


def test_key_cache_is_per_spec(keys: dict[str, sshlab.UserKey]) -> None:
    s = spec(keys["ed25519-passphrase"])
    assert ssh.load_key(s) is ssh.load_key(s)


def test_sudo_command_never_carries_the_password() -> None:
    cmd = ssh.sudo_command("echo hi", with_password=True)
    assert cmd.startswith("sudo -S -p '' -- sh -c ")
    assert ssh.sudo_command("echo hi", with_password=False).startswith("sudo -n -- sh -c ")


@pytest.mark.parametrize(("method", "stderr", "words"), [
    ("sudo", b"sudo: sorry, you must have a tty to run sudo\n", "sudo requires a tty (requiretty)"),
    ("sudo", b"sudo: a password is required\n", "sudo asks for a password and the record has none"),
    ("sudo", b"Sorry, try again.\nsudo: 1 incorrect password attempt\n", "sudo refused the record's password"),
    ("sudo", b"bob is not in the sudoers file.\n", "bob may not run sudo"),
    ("sudo", b"sh: 1: sudo: not found\n", "sudo is not installed"),
    ("su", b"su: Authentication failure\n", "su refused the root password"),
])
def test_delegation_words(method: str, stderr: bytes, words: str) -> None:
    result = ssh._Exec(stderr=stderr, status=1, answered=True)
    assert words in ssh.explain_delegation_failure(method, "bob", result)


def test_delegation_that_waits_for_input() -> None:
    result = ssh._Exec(error="no answer within 4 s (waiting for input?)", answered=False)
    assert "waiting for input" in ssh.explain_delegation_failure("sudo", "bob", result)


def test_cli_record(tmp_path: Path, keys: dict[str, sshlab.UserKey]) -> None:
    path = tmp_path / "id_ed25519"
    path.write_text(keys["ed25519-passphrase"].pem)
    rec = ssh.cli_unix_record(username="scanner", key_paths=(str(path),),
                              key_passphrase=keys["ed25519-passphrase"].passphrase, delegation="sudo")
    assert rec.username == "scanner" and rec.root_delegation.method == "sudo"
    assert rec.applies_to("10.1.2.3")
    # Its secrets are registered: they can never be printed.
    assert keys["ed25519-passphrase"].passphrase not in redact(f"x {keys['ed25519-passphrase'].passphrase} y")


def test_preflight_lines() -> None:
    ok = ssh.Stage("connect", True, "port 22 answers SSH")
    report = ssh.PreflightReport(
        ip="10.0.0.5", host_key="10.0.0.5", record_id="rec-1", connect=ok,
        authenticate=ssh.Stage("authenticate", True, "logged in"),
        root=ssh.Stage("root", False, "sudo requires a tty (requiretty)"),
        collectors=ssh.Stage("collectors", True, "800 dpkg packages"), host_key_fingerprint="SHA256:x")
    assert not report.ok
    text = "\n".join(report.lines())
    assert "FAIL root: sudo requires a tty" in text and "ok   connect" in text
