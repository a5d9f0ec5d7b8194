"""Real OpenSSH servers in lab namespaces, for the SSH tests and the benchmark.

Every target runs its own ``sshd -D`` in its namespace with a config of
absolute paths (LAB-NOTES.md: a relative ``-f`` fails silently), its own host
keys and a user CA, all generated at set-up under a temporary directory and
never committed. Keys for the test users are generated the same way.

Users, their passwords and sudoers never touch the machine: the lab makes a
copy of ``/etc`` (:class:`LabEtc`) with its users added to passwd, shadow and
group, its own sudoers and, for ``su``, a root password that exists only in
the copy; each sshd runs with that copy bind-mounted over ``/etc`` in its own
mount namespace (so do sudo, su and PAM under it). A whole directory is
mounted, not single files: a file bind-mounted from ``/etc/netns/NS/`` is
detached by the kernel as soon as anything on the machine replaces
``/etc/passwd`` by rename (``useradd`` in another test does), and the lab's
users would vanish mid-run.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from appliance.lab.netns import Host, LabError, NetnsLab, netns_executor

SSH_PORT = 22
START_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
FIRST_LAB_UID = 64100  # above Debian's dynamic range (1000-59999) and 60000-64999 is unused here
SSH_TOOLS = ("sshd", "ssh-keygen", "openssl", "sudo", "su")


def ssh_lab_available() -> str | None:
    """None when sshd, ssh-keygen, openssl, sudo and su are installed, else what is missing."""
    missing = [t for t in SSH_TOOLS if _which(t) is None]
    return f"not installed: {', '.join(missing)} (Debian packages openssh-server, openssl, sudo)" if missing else None


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/bin/{name}") if os.path.exists(p)), None)


def _run(argv: Sequence[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S)
    if result.returncode != 0:
        # argv never holds a secret: passwords and passphrases go through stdin or files.
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


# ---- threads inside a namespace ------------------------------------------------------------


def hub_executor(lab: NetnsLab, max_workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A bounded pool whose threads (and the threads they start) live in the lab's hub."""
    return netns_executor(lab.hub, max_workers)


# ---- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserKey:
    """A private key for a record, its public line, and optional passphrase and certificate."""

    name: str
    pem: str
    public: str  # "ssh-ed25519 AAAA... comment"
    passphrase: str | None = None
    certificate: str | None = None


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def make_user_keys(workdir: Path, ca_key: Path | None = None, principal: str = "") -> dict[str, UserKey]:
    """Generate the test users' keys in every form the scanner must read.

    Names: rsa-openssh, rsa-pem (PKCS#1), ecdsa-openssh, ecdsa-pem (SEC1),
    ed25519-openssh, ed25519-pkcs8, ed25519-passphrase (OpenSSH, bcrypt),
    rsa-pem-passphrase (PKCS#1, AES), ecdsa-pkcs8-passphrase, dsa (ssh-keygen),
    wrong (an ED25519 key no server knows), and cert, rsa-cert, ecdsa-cert
    (keys whose certificates are signed by ``ca_key`` for ``principal``; the keys
    themselves are in no authorized_keys file).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    keys: dict[str, UserKey] = {}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ssh_ = serialization.PrivateFormat.OpenSSH
    pem = serialization.Encoding.PEM
    none = serialization.NoEncryption()

    def pub(key: object, name: str) -> str:
        line = key.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        return f"{line} vsa-lab-{name}"

    def add(name: str, key: object, fmt: serialization.PrivateFormat, passphrase: str | None = None) -> None:
        enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else none)
        text = key.private_bytes(pem, fmt, enc).decode()  # type: ignore[attr-defined]
        keys[name] = UserKey(name, text, pub(key, name), passphrase)

    add("rsa-openssh", rsa_key, ssh_)
    add("rsa-pem", rsa_key, serialization.PrivateFormat.TraditionalOpenSSL)
    add("ecdsa-openssh", ec_key, ssh_)
    add("ecdsa-pem", ec_key, serialization.PrivateFormat.TraditionalOpenSSL)
    add("ed25519-openssh", ed_key, ssh_)
    add("ed25519-pkcs8", ed_key, serialization.PrivateFormat.PKCS8)
    add("ed25519-passphrase", ed25519.Ed25519PrivateKey.generate(), ssh_, secrets.token_urlsafe(12))
    add("rsa-pem-passphrase", rsa.generate_private_key(public_exponent=65537, key_size=2048),
        serialization.PrivateFormat.TraditionalOpenSSL, secrets.token_urlsafe(12))
    add("ecdsa-pkcs8-passphrase", ec.generate_private_key(ec.SECP384R1()),
        serialization.PrivateFormat.PKCS8, secrets.token_urlsafe(12))
    add("wrong", ed25519.Ed25519PrivateKey.generate(), ssh_)
    # DSA: cryptography still writes DSA keys in OpenSSH form.
    import warnings

    from cryptography.hazmat.primitives.asymmetric import dsa
    from cryptography.utils import CryptographyDeprecationWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        add("dsa", dsa.generate_private_key(key_size=1024), ssh_)
    if ca_key is not None:
        for name, cert_key in (("cert", ed25519.Ed25519PrivateKey.generate()),
                               ("rsa-cert", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                               ("ecdsa-cert", ec.generate_private_key(ec.SECP256R1()))):
            add(name, cert_key, ssh_)
            pub_path = _write(workdir / f"{name}-key.pub", keys[name].public + "\n", 0o644)
            _run([_which("ssh-keygen") or "ssh-keygen", "-q", "-s", str(ca_key), "-I", f"vsa-lab-{name}",
                  "-n", principal, "-V", "-5m:+1d", str(pub_path)])
            cert_line = (workdir / f"{name}-key-cert.pub").read_text().strip()
            keys[name] = UserKey(name, keys[name].pem, keys[name].public, None, cert_line)
    return keys


def make_ca(workdir: Path) -> Path:
    """A user CA (ED25519) for TrustedUserCAKeys; returns the private key's path (``.pub`` beside)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "user_ca"
    key = ed25519.Ed25519PrivateKey.generate()
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()).decode())
    _write(Path(str(path) + ".pub"), key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " vsa-lab-ca\n", 0o644)
    return path


def make_host_key(path: Path, kind: str = "ed25519") -> Path:
    """Write a fresh host key (ed25519, ecdsa or rsa) at ``path``."""
    if kind == "ed25519":
        key: object = ed25519.Ed25519PrivateKey.generate()
    elif kind == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise LabError(f"unknown host key type {kind}")
    text = key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    _write(path, text.decode())
    return path


# ---- users, passwords and sudoers inside one namespace -------------------------------------


@dataclass(frozen=True)
class LabUser:
    """A Linux user that exists only inside the lab's target namespaces."""

    name: str
    password: str | None = None  # login password (None: locked, keys only)
    sudoers: str | None = None  # sudoers lines for this user, e.g. "ALL=(ALL) NOPASSWD: ALL"
    authorized: tuple[str, ...] = ()  # public key lines


@dataclass
class LabUsers:
    """Users, a root password (for su) and sudoers rules, rendered as /etc files."""

    users: list[LabUser]
    root_password: str | None = None
    extra_sudoers: tuple[str, ...] = ()
    _hashes: dict[str, str] = field(default_factory=dict)

    def _hash(self, password: str) -> str:
        if password not in self._hashes:
            # The password goes through stdin, never argv.
            out = _run([_which("openssl") or "openssl", "passwd", "-6", "-stdin"], stdin=password + "\n")
            self._hashes[password] = out.stdout.strip()
        return self._hashes[password]

    def files(self, home_base: Path) -> dict[str, tuple[str, int]]:
        """relpath → (text, mode) for /etc/netns/NS/: passwd, shadow, group, sudoers."""
        passwd = Path("/etc/passwd").read_text()
        shadow = Path("/etc/shadow").read_text()
        group = Path("/etc/group").read_text()
        if self.root_password is not None:
            lines = []
            for line in shadow.splitlines():
                parts = line.split(":")
                if parts[0] == "root":
                    parts[1] = self._hash(self.root_password)
                    line = ":".join(parts)
                lines.append(line)
            shadow = "\n".join(lines) + "\n"
        for i, user in enumerate(self.users):
            uid = FIRST_LAB_UID + i
            home = home_base / user.name
            passwd += f"{user.name}:x:{uid}:{uid}:vsa lab:{home}:/bin/sh\n"
            hashed = self._hash(user.password) if user.password else "*"
            shadow += f"{user.name}:{hashed}:19000:0:99999:7:::\n"
            group += f"{user.name}:x:{uid}:\n"
        rules = ["Defaults env_reset", "Defaults secure_path=\"/usr/sbin:/usr/bin:/sbin:/bin\"",
                 "root ALL=(ALL:ALL) ALL", *self.extra_sudoers]
        rules += [f"{u.name} {u.sudoers}" for u in self.users if u.sudoers]
        return {"passwd": (passwd, 0o644), "shadow": (shadow, 0o640), "group": (group, 0o644),
                "sudoers": ("\n".join(rules) + "\n", 0o440)}


@dataclass
class LabEtc:
    """A private copy of ``/etc`` holding the lab's users, mounted over ``/etc`` for lab processes."""

    path: Path
    home_base: Path

    @classmethod
    def create(cls, workdir: Path, users: LabUsers) -> LabEtc:
        """Copy the machine's /etc under ``workdir`` and write the lab's users into the copy."""
        workdir.mkdir(parents=True, exist_ok=True)
        etc = workdir / "etc"
        home_base = workdir / "home"
        home_base.mkdir(exist_ok=True)
        os.chmod(home_base, 0o755)
        result = subprocess.run(["cp", "-a", "/etc", str(etc)], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise LabError(f"cannot copy /etc: {result.stderr.strip()}")
        for relpath, (text, mode) in users.files(home_base).items():
            path = etc / relpath
            tmp = path.with_name(path.name + ".vsa-tmp")
            tmp.write_text(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        for i, user in enumerate(users.users):
            home = home_base / user.name
            home.mkdir(exist_ok=True)
            os.chown(home, FIRST_LAB_UID + i, FIRST_LAB_UID + i)
        return cls(etc, home_base)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run with this copy mounted over /etc (inside ``ip netns exec``'s mount namespace)."""
        return ["sh", "-c", 'mount --bind "$0" /etc && exec "$@"', str(self.path), *argv]


# ---- one sshd --------------------------------------------------------------------------------


@dataclass
class SshServer:
    """One ``sshd -D`` in a target namespace, with its whole state under ``workdir``.

    ``workdir`` and its parents must be searchable by everyone: sshd reads
    authorized keys as the user logging in.
    """

    lab: NetnsLab
    host: Host
    workdir: Path
    users: LabUsers
    etc: LabEtc
    ca_pub: Path | None = None
    host_key_types: tuple[str, ...] = ("ed25519",)
    use_pam: bool = True
    extra_config: tuple[str, ...] = ()
    port: int = SSH_PORT
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def ip(self) -> str:
        """The server's address on the lab bridge."""
        return self.host.ip

    @property
    def pid(self) -> int | None:
        """The sshd process's ID while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def config_path(self) -> Path:
        """The absolute path of this server's sshd_config."""
        return self.workdir / "sshd_config"

    def host_key_path(self, kind: str) -> Path:
        """Where the host key of type ``kind`` lives."""
        return self.workdir / f"ssh_host_{kind}_key"

    def setup(self) -> None:
        """Write host keys, authorized keys, the namespace's /etc files and the config."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        for kind in self.host_key_types:
            if not self.host_key_path(kind).exists():
                make_host_key(self.host_key_path(kind), kind)
        keys_dir = self.workdir / "authorized_keys"
        keys_dir.mkdir(exist_ok=True)
        for user in self.users.users:
            _write(keys_dir / user.name, "".join(line + "\n" for line in user.authorized), 0o644)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.config_path.write_text(self.config_text())
        check = subprocess.run([_which("sshd") or "sshd", "-t", "-f", str(self.config_path)],
                               capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if check.returncode != 0:
            raise LabError(f"sshd -t rejected {self.config_path}: {check.stderr.strip()}")

    def config_text(self) -> str:
        """The server's sshd_config: absolute paths only (LAB-NOTES.md)."""
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host.ip}",
            *(f"HostKey {self.host_key_path(k)}" for k in self.host_key_types),
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}/%u",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            f"UsePAM {'yes' if self.use_pam else 'no'}",
            "PermitRootLogin no",
            "StrictModes no",  # keys live under /tmp
            "MaxStartups 200",  # many simultaneous connections in tests (LAB-NOTES.md)
            "MaxSessions 20",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel VERBOSE",
        ]
        if self.ca_pub is not None:
            lines.append(f"TrustedUserCAKeys {self.ca_pub}")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Start sshd in the foreground of its namespace and wait until it listens."""
        log = open(self.workdir / "sshd.log", "ab")  # noqa: SIM115 - handed to the child
        sshd = [_which("sshd") or "sshd", "-D", "-e", "-f", str(self.config_path)]
        self._proc = self.lab.popen(self.host.netns, self.etc.wrap(sshd), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise LabError(f"sshd on {self.host.ip} exited: {self.log_tail()}")
            listening = self.lab.host_run(self.host, "ss", "-Hltn", f"sport = :{self.port}",
                                          check=False).stdout
            if listening.strip():
                return
            time.sleep(0.05)
        raise LabError(f"sshd on {self.host.ip} did not listen within {START_TIMEOUT_S:g} s")

    def stop(self) -> None:
        """Stop this sshd (the lab also kills it when it closes)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def replace_host_keys(self) -> None:
        """New host keys (a reinstalled host, or an impostor); restart sshd with them."""
        self.stop()
        for kind in self.host_key_types:
            make_host_key(self.host_key_path(kind), kind)
        self.start()

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a short command in this target, seeing the lab's users (e.g. ``runuser``)."""
        return self.lab.host_run(self.host, *self.etc.wrap(argv))

    def log_tail(self, lines: int = 20) -> str:
        """The end of this server's log, for failure messages."""
        path = self.workdir / "sshd.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---- a tiny IMDS in a target namespace ----------------------------------------------------

IMDS_STUB = r'''
import json, secrets, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
DATA = json.loads(sys.argv[1]); TOKENS = set(); REQUIRE = sys.argv[2] == "required"
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _send(self, code, body=b""):
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_PUT(self):
        if sys.argv[2] == "v1-only":
            return self._send(403)
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(400)
        t = secrets.token_urlsafe(24); TOKENS.add(t); self._send(200, t.encode())
    def do_GET(self):
        tok = self.headers.get("X-aws-ec2-metadata-token")
        if (tok and tok not in TOKENS) or (REQUIRE and not tok):
            return self._send(401)
        path = self.path[len("/latest/"):] if self.path.startswith("/latest/") else None
        if path not in DATA: return self._send(404)
        self._send(200, DATA[path].encode())
ThreadingHTTPServer(("169.254.169.254", 80), H).serve_forever()
'''


def start_imds_stub(lab: NetnsLab, host: Host, data: dict[str, str], *, tokens: str = "required") -> None:
    """Serve ``data`` (IMDS path under /latest/ → body) at 169.254.169.254 inside ``host``'s namespace.

    A minimal IMDSv2 (token PUT, token-checked GETs; ``tokens="optional"``
    also answers v1; ``tokens="v1-only"`` refuses the token PUT with 403, as an
    IMDS with tokens disabled does). It lives on the target's own loopback, so only that
    target's processes reach it, as on EC2.
    """
    import json
    import sys

    lab.host_run(host, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo")
    lab.popen(host.netns, [sys.executable, "-c", IMDS_STUB, json.dumps(data), tokens],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lab.host_run(host, "ss", "-Hltn", "sport = :80", check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise LabError("the IMDS stub did not start")
