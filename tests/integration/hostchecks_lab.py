"""A small lab for the host-checks and ``vsa scan`` tests: one sshd, one Samba, one bare host.

- ``linux``: a real ``sshd -D`` (appliance.lab.sshlab) with three users that
  exist only in its namespace: ``vsa-hcs`` (NOPASSWD sudo; an ED25519 key and a
  passphrase-protected one), ``vsa-hcp`` (sudo with a password) and ``vsa-hcu``
  (no sudo; for ``su`` with the lab's root password). Its filesystem is this
  machine's, so dpkg lists this machine's packages.
- ``win``: a standalone smbd (appliance.lab.smblab) with one local account
  (a machine-wide Linux user made for the run and removed after).
- ``bare``: a namespace with nothing listening.

Also: a knowledge-base bundle writer whose advisory matches this machine's
installed ``openssl`` source version. Everything stays inside the lab's
namespaces; secrets are random per run and go to servers through stdin/files.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.lab import sshlab
from appliance.lab.netns import NetnsLab, lab_available
from appliance.lab.smblab import SambaServer, SambaSettings, linux_user, samba_available

SUDO_USER, PWSUDO_USER, PLAIN_USER = "vsa-hcs", "vsa-hcp", "vsa-hcu"


@dataclass(frozen=True)
class Key:
    """A private key file for ``--ssh-key`` and its text for records."""

    path: Path
    pem: str
    public: str
    passphrase: str | None = None


@dataclass
class HcLab:
    """The running lab and everything a test needs to talk to it."""

    lab: NetnsLab
    ssh: sshlab.SshServer
    smb: SambaServer
    bare_ip: str
    workdir: Path
    key: Key
    key_pass: Key
    wrong_key: Key
    user_password: str  # vsa-hcp's login and sudo password
    root_password: str  # the target's root password (su)
    smb_user: str
    smb_password: str

    @property
    def linux_ip(self) -> str:
        """The SSH target's address."""
        return self.ssh.ip

    @property
    def win_ip(self) -> str:
        """The Samba target's address."""
        return self.smb.ip


def prerequisites() -> str | None:
    """None when the lab can be built here, else what is missing."""
    return lab_available() or sshlab.ssh_lab_available() or samba_available()


def _key(path: Path, passphrase: str | None = None) -> Key:
    key = ed25519.Ed25519PrivateKey.generate()
    enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
           else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, enc).decode()
    path.write_text(pem)
    os.chmod(path, 0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return Key(path, pem, public + " vsa-hc", passphrase)


@contextlib.contextmanager
def build() -> Iterator[HcLab]:
    """Build the lab (about 3-5 s), yield it, tear every part of it down."""
    with NetnsLab() as lab, tempfile.TemporaryDirectory(prefix="vsa-hclab-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # sshd reads authorized keys as the user; samba workers too
        keys_dir = workdir / "keys"
        keys_dir.mkdir()
        key = _key(keys_dir / "id_ed25519")
        key_pass = _key(keys_dir / "id_ed25519_pass", "pp-" + secrets.token_hex(8))
        wrong = _key(keys_dir / "id_wrong")
        user_password = "pw-" + secrets.token_hex(9)
        root_password = "root-" + secrets.token_hex(9)
        users = sshlab.LabUsers(
            users=[
                sshlab.LabUser(SUDO_USER, None, "ALL=(ALL) NOPASSWD: ALL", (key.public, key_pass.public)),
                sshlab.LabUser(PWSUDO_USER, user_password, "ALL=(ALL) ALL", (key.public,)),
                sshlab.LabUser(PLAIN_USER, None, None, (key.public,)),
            ],
            root_password=root_password,
        )
        etc = sshlab.LabEtc.create(workdir / "etc-copy", users)
        ssh = sshlab.SshServer(lab, lab.add_host("linux"), workdir / "sshd", users, etc)
        ssh.setup()
        ssh.start()
        smb_user = f"vsahc{secrets.token_hex(3)}"
        smb_password = f"Pw-{secrets.token_urlsafe(12)}"
        bare = lab.add_host("bare")
        with linux_user(smb_user):
            smb_dir = workdir / "smb"
            smb_dir.mkdir()
            smb = SambaServer(lab, lab.add_host("win"), smb_dir, SambaSettings())
            smb.prepare()
            smb.add_user(smb_user, smb_password)
            smb.start()
            try:
                yield HcLab(lab, ssh, smb, bare.ip, workdir, key, key_pass, wrong, user_password,
                            root_password, smb_user, smb_password)
            finally:
                smb.stop()
                ssh.stop()
                shutil.rmtree(workdir / "smb", ignore_errors=True)


# ---- a knowledge base that matches this machine ---------------------------------------------


def installed_source(package: str) -> tuple[str, str]:
    """(source name, source version) of an installed binary package, from dpkg."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${source:Package} ${source:Version}", package],
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    return out[0], out[1]


def debian_ecosystem() -> str:
    """This machine's OSV ecosystem (``Debian:12``), from os-release."""
    values = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    return f"Debian:{values['VERSION_ID'].strip(chr(34))}"


def osv_record(advisory: str, source: str, fixed: str, severity: int, *, ecosystem: str,
               withdrawn: bool = False) -> dict[str, Any]:
    """An OSV record of the upstream shape keyed by a Debian source package."""
    record: dict[str, Any] = {
        "schema_version": "1.6.0", "id": advisory, "modified": "2026-12-01T00:00:00Z",
        "summary": f"{source}: test advisory {advisory}",
        "database_specific": {"severity": severity},
        "affected": [{"package": {"ecosystem": ecosystem, "name": source},
                      "ranges": [{"type": "ECOSYSTEM",
                                  "events": [{"introduced": "0"}, {"fixed": fixed}]}]}],
    }
    if withdrawn:
        record["withdrawn"] = "2026-12-02T00:00:00Z"
    return record


@dataclass(frozen=True)
class LabKb:
    """The bundle file and what a match against this machine must find."""

    path: Path
    advisory: str
    source: str
    installed: str
    fixed: str
    severity: int


def write_kb(path: Path, severity: int = 4) -> LabKb:
    """A gzip JSON Lines bundle: one advisory matching the installed openssl, and decoys."""
    source, version = installed_source("libssl3")
    ecosystem = debian_ecosystem()
    fixed = version + "+vsatest1"  # sorts right after the installed version (dpkg: '+' > end)
    records = [
        osv_record("VSA-HC-OPENSSL", source, fixed, severity, ecosystem=ecosystem),
        # Decoys: already fixed, withdrawn, another ecosystem. None may match.
        osv_record("VSA-HC-FIXED", source, "0.9", 5, ecosystem=ecosystem),
        osv_record("VSA-HC-WITHDRAWN", source, fixed, 5, ecosystem=ecosystem, withdrawn=True),
        osv_record("VSA-HC-ALPINE", source, "99", 5, ecosystem="Alpine:v3.20"),
    ]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return LabKb(path, "VSA-HC-OPENSSL", source, version, fixed, severity)
