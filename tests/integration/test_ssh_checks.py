"""SSH checks against real OpenSSH servers in network namespaces (appliance/lab/sshlab.py).

One lab for the module: target ``main`` (ED25519, RSA and ECDSA host keys, a
trusted user CA, five users that exist only in its namespace) and target
``rekey`` (for the changed-host-key case). The scanner's threads live in the
lab's hub namespace; every packet stays inside namespaces this module built.
The targets' filesystem is this machine's: dpkg on the target lists this
machine's real packages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.authrecords import UnixRecord, parse_auth_record
from appliance.lab import sshlab
from appliance.lab.netns import NetnsLab, lab_available
from appliance.results import HostResult, Target
from appliance.scan import ssh
from appliance.state.hostkeys import HostKeyPins
from tests.conftest import require

pytestmark = [pytest.mark.netns]

TIMEOUTS = ssh.SshTimeouts(connect_s=3, handshake_s=5, auth_s=5, command_s=30, delegation_s=4,
                           imds_s=15)
NOPW, PW, TTY, PLAIN, HANG = "vsa-nopw", "vsa-pw", "vsa-tty", "vsa-plain", "vsa-hang"


@dataclass
class Lab:
    lab: NetnsLab
    main: sshlab.SshServer
    rekey: sshlab.SshServer
    keys: dict[str, sshlab.UserKey]
    user_password: str
    root_password: str
    executor: Any
    workdir: Path


@pytest.fixture(scope="module")
def sshd_lab() -> Iterator[Lab]:
    reason = lab_available() or sshlab.ssh_lab_available()
    require(reason is None, reason or "")
    with NetnsLab() as lab, tempfile.TemporaryDirectory(prefix="vsa-sshlab-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # sshd reads authorized keys as the user
        ca = sshlab.make_ca(workdir / "ca")
        keys = sshlab.make_user_keys(workdir / "keys", ca, NOPW)
        user_password = "pw-" + os.urandom(9).hex()
        root_password = "root-" + os.urandom(9).hex()
        all_keys = tuple(k.public for n, k in keys.items() if "cert" not in n and n not in ("wrong", "dsa"))
        ed = (keys["ed25519-openssh"].public,)
        fakebin = workdir / "fakebin"
        fakebin.mkdir()
        # A sudo that prompts on its own and then waits forever (a PAM module
        # asking for an OTP, a wrapper script...): the scanner must not hang.
        (fakebin / "sudo").write_text("#!/bin/sh\nprintf 'Verification code: ' >&2\nexec sleep 300\n")
        os.chmod(fakebin / "sudo", 0o755)
        users = sshlab.LabUsers(
            users=[
                sshlab.LabUser(NOPW, None, "ALL=(ALL) NOPASSWD: ALL", all_keys),
                sshlab.LabUser(PW, user_password, "ALL=(ALL) ALL", ed),
                sshlab.LabUser(TTY, None, "ALL=(ALL) NOPASSWD: ALL", ed),
                sshlab.LabUser(PLAIN, None, None, ed),
                sshlab.LabUser(HANG, None, None, ed),
            ],
            root_password=root_password,
            extra_sudoers=(f"Defaults:{TTY} requiretty",),
        )
        etc = sshlab.LabEtc.create(workdir / "lab", users)
        main = sshlab.SshServer(
            lab, lab.add_host("main"), workdir / "main", users, etc, ca_pub=Path(str(ca) + ".pub"),
            host_key_types=("ed25519", "ecdsa", "rsa"),
            extra_config=(f"Match User {HANG}", f"  SetEnv PATH={fakebin}:/usr/bin:/bin"),
        )
        rekey = sshlab.SshServer(lab, lab.add_host("rekey"), workdir / "rekey", users, etc)
        for server in (main, rekey):
            server.setup()
            server.start()
        executor = sshlab.hub_executor(lab, 16)
        try:
            yield Lab(lab, main, rekey, keys, user_password, root_password, executor, workdir)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            keep = os.environ.get("VSA_SSHLAB_KEEP_LOGS")
            if keep:  # debugging aid: keep the servers' logs after the lab is gone
                for server in (main, rekey):
                    shutil.copy(server.workdir / "sshd.log", Path(keep) / f"sshd-{server.host.name}.log")


def record(user: str, *keys: sshlab.UserKey, password: str | None = None, method: str = "none",
           delegation_password: str | None = None, port: int = 22,
           strip_certificate: bool = False) -> UnixRecord:
    """A record parsed as the platform's would be (so its secrets are registered)."""
    parsed = parse_auth_record({
        "type": "unix", "id": f"rec-{user}", "title": "lab", "username": user, "password": password,
        "private_keys": [{"pem": k.pem, "passphrase": k.passphrase,
                          "certificate": None if strip_certificate else k.certificate} for k in keys],
        "root_delegation": {"method": method, "password": delegation_password},
        "port": port, "targets": ["10.77.0.0/24"],
    })
    assert isinstance(parsed, UnixRecord)
    return parsed


async def check(lab: Lab, rec: UnixRecord, *, server: sshlab.SshServer | None = None,
                pins: HostKeyPins | None = None, host_key: str | None = None,
                is_ec2: bool = False, timeouts: ssh.SshTimeouts = TIMEOUTS) -> ssh.UnixCheck:
    server = server or lab.main
    pins = pins or HostKeyPins(lab.workdir / "state")
    return await ssh.check_unix(server.ip, rec, pins=pins, host_key=host_key or server.ip,
                                executor=lab.executor, timeouts=timeouts, is_ec2=is_ec2)


def local_dpkg_count() -> int:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Status}\n"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return sum(1 for line in out.splitlines() if line.endswith(" installed"))


# ---- key types and forms -----------------------------------------------------------------

KEY_FORMS = ["rsa-openssh", "rsa-pem", "ecdsa-openssh", "ecdsa-pem", "ed25519-openssh",
             "ed25519-pkcs8", "ed25519-passphrase", "rsa-pem-passphrase", "ecdsa-pkcs8-passphrase"]


async def test_every_key_form_logs_in_and_inventories(sshd_lab: Lab) -> None:
    checks = await asyncio.gather(*(
        check(sshd_lab, record(NOPW, sshd_lab.keys[name], method="sudo")) for name in KEY_FORMS))
    expected_packages = local_dpkg_count()
    for name, c in zip(KEY_FORMS, checks, strict=True):
        assert c.auth.status == "success", (name, c.auth.message, sshd_lab.main.log_tail())
        assert c.auth.privileged is True, (name, c.auth.message, c.errors)
        assert c.host_key_fingerprint and c.host_key_fingerprint.startswith("SHA256:")
        assert c.host_key_type == "ssh-ed25519"
        # The target is this machine's filesystem: its os-release and dpkg database.
        assert c.os is not None and c.os.family == "linux" and c.os.source == "ssh"
        assert c.os.name == "Debian GNU/Linux" and c.os.kernel == os.uname().release
        assert c.packages is not None and c.packages.manager == "dpkg"
        assert c.packages.ecosystem.startswith("Debian:")
        assert len(c.packages.items) == expected_packages
        names = {p.name: p for p in c.packages.items}
        assert names["openssh-server"].source_name == "openssh"
        assert any(s.port == 22 and s.proto == "tcp" for s in c.listening)
        assert c.errors == [], (name, c.errors)


@pytest.mark.parametrize("name", ["cert", "rsa-cert", "ecdsa-cert"])
async def test_certificate_signed_by_trusted_ca(sshd_lab: Lab, name: str) -> None:
    cert = sshd_lab.keys[name]
    c = await check(sshd_lab, record(NOPW, cert, method="sudo"))
    assert c.auth.status == "success" and c.auth.privileged, (c.auth.message, sshd_lab.main.log_tail())
    assert "cert-v01@openssh.com certificate" in (c.auth.message or "")
    # The bare key is in no authorized_keys file: without its certificate it is refused.
    bare = await check(sshd_lab, record(NOPW, cert, strip_certificate=True))
    assert bare.auth.status == "failed"


async def test_wrong_key_is_failed(sshd_lab: Lab) -> None:
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["wrong"]))
    assert c.auth.status == "failed" and "refused" in (c.auth.message or "")
    assert c.packages is None and c.host_key_fingerprint  # the host key was still seen


async def test_a_refused_key_then_a_good_one(sshd_lab: Lab) -> None:
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["wrong"], sshd_lab.keys["ecdsa-openssh"]))
    assert c.auth.status == "success" and "key 2" in (c.auth.message or "")


async def test_dsa_key_is_unsupported(sshd_lab: Lab) -> None:
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["dsa"]))
    assert c.auth.status == "error"
    assert "unsupported" in (c.auth.message or "") and "DSA" in (c.auth.message or "")


async def test_wrong_passphrase_is_an_error(sshd_lab: Lab) -> None:
    k = sshd_lab.keys["ed25519-passphrase"]
    bad = sshlab.UserKey(k.name, k.pem, k.public, "not-the-passphrase")
    c = await check(sshd_lab, record(NOPW, bad))
    assert c.auth.status == "error" and "wrong passphrase" in (c.auth.message or "")
    missing = sshlab.UserKey(k.name, k.pem, k.public, None)
    c = await check(sshd_lab, record(NOPW, missing))
    assert c.auth.status == "error" and "no passphrase" in (c.auth.message or "")


async def test_closed_port_is_an_error(sshd_lab: Lab) -> None:
    started = time.monotonic()
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["ed25519-openssh"], port=2222))
    assert c.auth.status == "error" and "connection refused" in (c.auth.message or "")
    assert c.host_key_fingerprint is None
    assert time.monotonic() - started < 2


# ---- root delegation ---------------------------------------------------------------------

def sudo_k(lab: Lab, user: str) -> None:
    """Forget any cached sudo credential of ``user`` on the target (LAB-NOTES.md)."""
    lab.main.run("runuser", "-u", user, "--", "sudo", "-k")


async def test_password_login_and_password_sudo(sshd_lab: Lab) -> None:
    sudo_k(sshd_lab, PW)
    c = await check(sshd_lab, record(PW, password=sshd_lab.user_password, method="sudo",
                                     delegation_password=sshd_lab.user_password))
    assert c.auth.status == "success" and c.auth.privileged, (c.auth.message, c.errors)
    assert "with a password" in (c.auth.message or "")
    assert c.packages is not None and c.packages.items


async def test_wrong_sudo_password_fails_fast_and_inventory_goes_on(sshd_lab: Lab) -> None:
    sudo_k(sshd_lab, PW)
    started = time.monotonic()
    c = await check(sshd_lab, record(PW, password=sshd_lab.user_password, method="sudo",
                                     delegation_password="not-the-password"))
    assert time.monotonic() - started < 10
    assert c.auth.status == "success" and c.auth.privileged is False
    assert "sudo refused the record's password" in (c.auth.message or "")
    # Unprivileged collectors still ran.
    assert c.packages is not None and c.packages.items


async def test_sudo_asking_for_a_password_the_record_lacks(sshd_lab: Lab) -> None:
    sudo_k(sshd_lab, PW)
    c = await check(sshd_lab, record(PW, password=sshd_lab.user_password, method="sudo"))
    assert c.auth.privileged is False
    assert "sudo asks for a password and the record has none" in (c.auth.message or "")


async def test_su_with_root_password(sshd_lab: Lab) -> None:
    c = await check(sshd_lab, record(PLAIN, sshd_lab.keys["ed25519-openssh"], method="su",
                                     delegation_password=sshd_lab.root_password))
    assert c.auth.status == "success" and c.auth.privileged, (c.auth.message, c.errors)
    assert c.packages is not None and len(c.packages.items) == local_dpkg_count()
    bad = await check(sshd_lab, record(PLAIN, sshd_lab.keys["ed25519-openssh"], method="su",
                                       delegation_password="wrong-root-password"))
    assert bad.auth.status == "success" and bad.auth.privileged is False
    assert "su refused the root password" in (bad.auth.message or ""), bad.auth.message


async def test_requiretty_fails_fast_with_clear_words(sshd_lab: Lab) -> None:
    started = time.monotonic()
    c = await check(sshd_lab, record(TTY, sshd_lab.keys["ed25519-openssh"], method="sudo"))
    assert time.monotonic() - started < 3
    assert c.auth.status == "success" and c.auth.privileged is False
    assert "sudo requires a tty (requiretty)" in (c.auth.message or "")
    assert any("requiretty" in e for e in c.errors)


async def test_sudo_that_prompts_unexpectedly_never_hangs(sshd_lab: Lab) -> None:
    timeouts = ssh.SshTimeouts(connect_s=3, handshake_s=5, auth_s=5, command_s=30, delegation_s=1.5)
    started = time.monotonic()
    c = await check(sshd_lab, record(HANG, sshd_lab.keys["ed25519-openssh"], method="sudo"),
                    timeouts=timeouts)
    assert time.monotonic() - started < 6
    assert c.auth.status == "success" and c.auth.privileged is False
    assert "waiting for input" in (c.auth.message or ""), c.auth.message


async def test_no_delegation_is_unprivileged(sshd_lab: Lab) -> None:
    c = await check(sshd_lab, record(PLAIN, sshd_lab.keys["ed25519-openssh"]))
    assert c.auth.status == "success" and c.auth.privileged is False
    assert c.errors == []


# ---- host keys ---------------------------------------------------------------------------

async def test_changed_host_key_stops_authentication(sshd_lab: Lab, tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path / "state")
    rec = record(NOPW, sshd_lab.keys["ed25519-openssh"], method="sudo")
    first = await check(sshd_lab, rec, server=sshd_lab.rekey, pins=pins, host_key="i-0feedbeef00000001")
    assert first.auth.status == "success"
    pinned = pins.get("i-0feedbeef00000001")
    assert pinned is not None and pinned.fingerprint == first.host_key_fingerprint

    sshd_lab.rekey.replace_host_keys()
    log_before = (sshd_lab.rekey.workdir / "sshd.log").read_text()
    second = await check(sshd_lab, rec, server=sshd_lab.rekey, pins=pins, host_key="i-0feedbeef00000001")
    assert second.auth.status == "error"
    assert "host key changed" in (second.auth.message or "")
    assert "vsa hostkeys forget i-0feedbeef00000001" in (second.auth.message or "")
    assert second.host_key_fingerprint != first.host_key_fingerprint
    assert second.packages is None
    # No credential was offered to the changed host.
    new_log = (sshd_lab.rekey.workdir / "sshd.log").read_text()[len(log_before):]
    assert "publickey" not in new_log and "Accepted" not in new_log

    assert pins.forget("i-0feedbeef00000001")
    third = await check(sshd_lab, rec, server=sshd_lab.rekey, pins=pins, host_key="i-0feedbeef00000001")
    assert third.auth.status == "success"


async def test_rsa_only_pin_is_kept(sshd_lab: Lab, tmp_path: Path) -> None:
    """A host pinned on its RSA key is checked on its RSA key, not on a newer ED25519 one."""
    pins = HostKeyPins(tmp_path / "state")
    rsa_pub = sshd_lab.main.host_key_path("rsa")
    listed = await asyncio.to_thread(
        subprocess.run, ["ssh-keygen", "-l", "-E", "sha256", "-f", str(rsa_pub)], capture_output=True,
        text=True, check=True, timeout=10)
    out = listed.stdout.split()[1]  # OpenSSH's own fingerprint of the RSA host key
    pins.check_or_pin("rsa-host", "ssh-rsa", out)
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["ed25519-openssh"]), pins=pins, host_key="rsa-host")
    assert c.auth.status == "success" and c.host_key_type == "ssh-rsa" and c.host_key_fingerprint == out


# ---- instance metadata, preflight, secrets ----------------------------------------------

async def test_instance_metadata_through_the_session(sshd_lab: Lab) -> None:
    data = {
        "meta-data/ami-id": "ami-0123456789abcdef0", "meta-data/instance-id": "i-0abc1234def567890",
        "meta-data/instance-type": "t3.large", "meta-data/local-ipv4": sshd_lab.main.ip,
        "meta-data/mac": "0e:11:22:33:44:55", "meta-data/security-groups": "web\nssh",
        "meta-data/placement/availability-zone": "us-east-1a",
        "dynamic/instance-identity/document": json.dumps(
            {"instanceId": "i-0abc1234def567890", "region": "us-east-1", "accountId": "111122223333"}),
    }
    sshlab.start_imds_stub(sshd_lab.lab, sshd_lab.main.host, data, tokens="required")
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["ed25519-openssh"]), is_ec2=True)
    md = c.instance_metadata
    assert md is not None, c.errors
    assert md["instance-id"] == "i-0abc1234def567890" and md["imds_version"] == "v2"
    assert md["security-groups"] == ["web", "ssh"] and md["availability-zone"] == "us-east-1a"
    assert md["identity-document"]["region"] == "us-east-1"
    assert "public-ipv4" not in md  # the stub has none: 404
    # An IMDS that refuses tokens is read with IMDSv1.
    sshlab.start_imds_stub(sshd_lab.lab, sshd_lab.rekey.host, data, tokens="v1-only")
    v1 = await check(sshd_lab, record(NOPW, sshd_lab.keys["ed25519-openssh"]), server=sshd_lab.rekey,
                     pins=HostKeyPins(sshd_lab.workdir / "state-imds"), is_ec2=True)
    assert v1.instance_metadata is not None and v1.instance_metadata["imds_version"] == "v1"
    assert v1.instance_metadata["instance-id"] == "i-0abc1234def567890"
    # Not on EC2: nothing is asked.
    plain = await check(sshd_lab, record(NOPW, sshd_lab.keys["ed25519-openssh"]))
    assert plain.instance_metadata is None


async def test_preflight_says_what_works_and_why_not(sshd_lab: Lab, tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path / "state")
    good = await ssh.preflight_unix(sshd_lab.main.ip, record(NOPW, sshd_lab.keys["ed25519-openssh"],
                                                             method="sudo"),
                                    pins=pins, host_key=sshd_lab.main.ip, executor=sshd_lab.executor,
                                    timeouts=TIMEOUTS)
    assert good.ok and good.root.ok and good.collectors.ok
    tty = await ssh.preflight_unix(sshd_lab.main.ip, record(TTY, sshd_lab.keys["ed25519-openssh"],
                                                            method="sudo"),
                                   pins=pins, host_key=sshd_lab.main.ip, executor=sshd_lab.executor,
                                   timeouts=TIMEOUTS)
    assert not tty.ok and tty.authenticate.ok and tty.root.ok is False
    assert "requiretty" in tty.root.detail
    closed = await ssh.preflight_unix(sshd_lab.main.ip, record(NOPW, sshd_lab.keys["ed25519-openssh"],
                                                               port=2222),
                                      pins=pins, host_key="closed", executor=sshd_lab.executor,
                                      timeouts=TIMEOUTS)
    assert not closed.ok and closed.connect.ok is False and "refused" in closed.connect.detail
    assert closed.authenticate.ok is None
    text = "\n".join(good.lines() + tty.lines() + closed.lines())
    assert "FAIL root" in text and "FAIL connect" in text


async def test_no_secret_reaches_logs_or_results(sshd_lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sudo_k(sshd_lab, PW)
    k = sshd_lab.keys["ed25519-passphrase"]
    recs = [
        record(PW, password=sshd_lab.user_password, method="sudo", delegation_password=sshd_lab.user_password),
        record(PW, password=sshd_lab.user_password, method="sudo", delegation_password="bad-sudo-password"),
        record(PLAIN, sshd_lab.keys["ed25519-openssh"], method="su", delegation_password=sshd_lab.root_password),
        record(NOPW, k, method="sudo"),
        record(NOPW, sshlab.UserKey(k.name, k.pem, k.public, "wrong-passphrase-x")),
    ]
    results = [await check(sshd_lab, r) for r in recs]
    wire = []
    for c in results:
        host = HostResult(target=Target(ip=sshd_lab.main.ip), status="scanned")
        c.apply_to(host)
        wire.append(json.dumps(host.to_wire()))
    haystack = caplog.text + "\n".join(wire) + "\n".join(str(c) for c in results)
    secrets_ = [sshd_lab.user_password, sshd_lab.root_password, "bad-sudo-password",
                k.passphrase or "", "wrong-passphrase-x"]
    secrets_ += [line for key in sshd_lab.keys.values() for line in key.pem.splitlines()[1:-1]
                 if len(line) > 16 and ":" not in line]  # base64 lines, not PEM headers
    for secret in secrets_:
        assert secret and secret not in haystack
    assert results[0].auth.privileged and results[2].auth.privileged


# ---- network failures --------------------------------------------------------------------

async def test_silent_address_times_out_with_words(sshd_lab: Lab) -> None:
    timeouts = ssh.SshTimeouts(connect_s=1, handshake_s=1, auth_s=2, command_s=5)
    started = time.monotonic()
    rec = record(NOPW, sshd_lab.keys["ed25519-openssh"])
    c = await ssh.check_unix("10.77.0.250", rec, pins=HostKeyPins(sshd_lab.workdir / "state"),
                             host_key="10.77.0.250", executor=sshd_lab.executor, timeouts=timeouts)
    assert time.monotonic() - started < 5
    assert c.auth.status == "error"
    assert "no answer" in (c.auth.message or "") or "cannot connect" in (c.auth.message or "")


async def test_port_that_does_not_speak_ssh(sshd_lab: Lab) -> None:
    import sys

    server = ("import socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              f"s.bind(('{sshd_lab.main.ip}', 2223)); s.listen(8)\n"
              "conns=[]\nwhile True:\n    c,_=s.accept(); conns.append(c)\n")
    sshd_lab.lab.popen(sshd_lab.main.host.netns, [sys.executable, "-c", server])
    for _ in range(100):
        if sshd_lab.lab.host_run(sshd_lab.main.host, "ss", "-Hltn", "sport = :2223").stdout.strip():
            break
        await asyncio.sleep(0.05)
    timeouts = ssh.SshTimeouts(connect_s=2, handshake_s=1, auth_s=2, command_s=5)
    started = time.monotonic()
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["ed25519-openssh"], port=2223), timeouts=timeouts)
    assert time.monotonic() - started < 5
    assert c.auth.status == "error" and "does not speak SSH" in (c.auth.message or ""), c.auth.message


async def test_at_most_a_few_sessions_per_host(sshd_lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    active = 0
    peak = 0
    original = ssh._Connection.connect

    def counting(self: ssh._Connection, key_types: Any) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return original(self, key_types)
        finally:
            time.sleep(0.05)
            active -= 1

    monkeypatch.setattr(ssh._Connection, "connect", counting)
    rec = record(NOPW, sshd_lab.keys["ed25519-openssh"])
    checks = await asyncio.gather(*(check(sshd_lab, rec) for _ in range(8)))
    assert all(c.auth.status == "success" for c in checks)
    assert peak <= ssh.MAX_SESSIONS_PER_HOST


async def test_a_surprise_is_an_error_value_not_an_exception(sshd_lab: Lab,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: ssh._Connection, *args: Any) -> Any:
        raise RuntimeError("library bug")

    monkeypatch.setattr(ssh._Connection, "authenticate", broken)
    c = await check(sshd_lab, record(NOPW, sshd_lab.keys["ed25519-openssh"]))
    assert c.auth.status == "error" and "internal error" in (c.auth.message or "")
