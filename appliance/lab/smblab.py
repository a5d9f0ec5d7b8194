"""A standalone Samba server in a target namespace, for SMB/NTLM tests and benches.

Everything the server writes lives under the test's own folder (LAB-NOTES.md,
Samba): private, lock, state, cache, pid, ncalrpc and binddns directories, the
logs and the shares. NetBIOS is off, smbd listens on 445 of the target's lab
address only, and runs in the foreground under :meth:`NetnsLab.popen`, so the
lab reaps it. ``samba-dcerpcd`` (started on demand for srvsvc, winreg, ...)
detaches from smbd: :meth:`SambaServer.stop` kills it through its pid file.

Samba users need a Linux user of the same name; Linux users are machine-wide,
so tests create them in a session fixture (:func:`linux_user`) and remove them
after.

The scanner side of a test must open its sockets inside the hub namespace:
:func:`netns_executor` gives a thread pool whose threads have entered a
namespace (network namespaces are per thread), so the code under test runs
unchanged.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.lab.netns import Host, LabError, NetnsLab, netns_executor

SMB_PORT = 445
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0
USERDB_LOCK_WAIT_S = 10.0  # other test sessions may be adding users at the same moment
SAMBA_TOOLS = ("smbd", "smbpasswd", "net")


def samba_available() -> str | None:
    """None when smbd, smbpasswd and net are installed, else what is missing."""
    missing = [t for t in SAMBA_TOOLS if _which(t) is None]
    return f"not installed: {', '.join(missing)} (Debian packages samba, smbclient)" if missing else None


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )


def _run(argv: Sequence[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    if result.returncode != 0:
        # argv never holds a password: they go through stdin.
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


# ---- Linux users (machine-wide) ------------------------------------------------------


@contextlib.contextmanager
def linux_user(name: str) -> Iterator[str]:
    """Create a Linux user without home or shell for a Samba account; delete it after."""
    if _run_ok(["getent", "passwd", name]):
        raise LabError(f"Linux user {name} already exists; refusing to reuse or delete it")
    _run_locked(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name])
    try:
        yield name
    finally:
        _run_locked(["userdel", name], check=False)


def _run_locked(argv: Sequence[str], *, check: bool = True) -> None:
    """useradd/userdel, retried while another process holds /etc/passwd's lock."""
    deadline = time.monotonic() + USERDB_LOCK_WAIT_S
    while True:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        locked = "lock" in result.stderr.lower()
        if result.returncode == 0 or not locked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def _run_ok(argv: Sequence[str]) -> bool:
    return subprocess.run(list(argv), capture_output=True, timeout=COMMAND_TIMEOUT_S).returncode == 0


# ---- threads inside a namespace -------------------------------------------------------


# ---- the server -----------------------------------------------------------------------


@dataclass(frozen=True)
class SambaSettings:
    """The knobs a test turns; everything else is fixed by :meth:`SambaServer.config_text`."""

    workgroup: str = "VSALAB"
    netbios_name: str = "VSATARGET"
    ntlm_auth: str = "ntlmv2-only"  # Samba 4.17's default; "yes" also accepts NTLMv1
    server_signing: str = "default"  # "mandatory" requires signing
    server_min_protocol: str | None = None  # e.g. "NT1" to enable SMB1
    server_max_protocol: str | None = None
    log_level: int | str = 1  # e.g. "1 auth_json_audit:3" to log every authentication as JSON
    extra_global: tuple[tuple[str, str], ...] = ()
    shares: tuple[str, ...] = ("data",)


@dataclass
class SambaServer:
    """One smbd in a target namespace, with its whole state under ``workdir``."""

    lab: NetnsLab
    host: Host
    workdir: Path
    settings: SambaSettings = field(default_factory=SambaSettings)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        """The server's smb.conf."""
        return self.workdir / "smb.conf"

    @property
    def ip(self) -> str:
        """The address smbd listens on."""
        return self.host.ip

    def _dir(self, name: str) -> Path:
        return self.workdir / name

    def config_text(self) -> str:
        """The smb.conf text: standalone, no NetBIOS, port 445 on the lab address only."""
        s = self.settings
        lines = [
            "[global]",
            f"  workgroup = {s.workgroup}",
            f"  netbios name = {s.netbios_name}",
            "  server role = standalone server",
            "  disable netbios = yes",
            f"  smb ports = {SMB_PORT}",
            f"  interfaces = {self.host.ip}/32",
            "  bind interfaces only = yes",
            f"  private dir = {self._dir('private')}",
            f"  lock directory = {self._dir('lock')}",
            f"  state directory = {self._dir('state')}",
            f"  cache directory = {self._dir('cache')}",
            f"  pid directory = {self._dir('pid')}",
            f"  ncalrpc dir = {self._dir('ncalrpc')}",
            f"  binddns dir = {self._dir('binddns')}",
            f"  log file = {self._dir('log')}/log.%m",
            f"  log level = {s.log_level}",
            "  max log size = 0",
            "  passdb backend = tdbsam",
            "  map to guest = Never",
            f"  ntlm auth = {s.ntlm_auth}",
            f"  server signing = {s.server_signing}",
            "  load printers = no",
            "  printing = bsd",
            "  printcap name = /dev/null",
            "  disable spoolss = yes",
            "  usershare max shares = 0",
        ]
        if s.server_min_protocol:
            lines.append(f"  server min protocol = {s.server_min_protocol}")
        if s.server_max_protocol:
            lines.append(f"  server max protocol = {s.server_max_protocol}")
        lines += [f"  {k} = {v}" for k, v in s.extra_global]
        for share in s.shares:
            lines += [
                f"[{share}]",
                f"  path = {self._dir('shares') / share}",
                "  read only = yes",
                f"  comment = lab share {share}",
            ]
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        """Write smb.conf and create every directory it names (no process yet)."""
        for name in ("private", "lock", "state", "cache", "pid", "ncalrpc", "binddns", "log"):
            self._dir(name).mkdir(parents=True, exist_ok=True)
        self._dir("private").chmod(0o700)
        for share in self.settings.shares:
            (self._dir("shares") / share).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config_text())

    def add_user(self, name: str, password: str) -> None:
        """Add a Samba account (the Linux user must exist); the password goes through stdin."""
        _run(["smbpasswd", "-c", str(self.conf), "-s", "-a", name], stdin=f"{password}\n{password}\n")

    def net(self, *args: str, stdin: str | None = None) -> str:
        """Run ``net -s CONF ARGS`` (e.g. ``registry createkey ...``) and return its output."""
        return _run(["net", "-s", str(self.conf), *args], stdin=stdin).stdout

    def start(self) -> None:
        """Start smbd in the target namespace and wait until port 445 accepts."""
        if not self.conf.exists():
            self.prepare()
        log = open(self._dir("log") / "smbd.stdout", "wb")  # noqa: SIM115 - owned by the process
        self._proc = self.lab.popen(
            self.host.netns,
            [_which("smbd") or "smbd", "--foreground", "--no-process-group", "-s", str(self.conf)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with netns_executor(self.lab.hub, 1) as pool:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise LabError(f"smbd exited with {self._proc.returncode}: {self.log_tail()}")
                if pool.submit(_port_open, self.host.ip, SMB_PORT).result():
                    return
                time.sleep(0.05)
        raise LabError(f"smbd did not listen on {self.host.ip}:{SMB_PORT} within {START_TIMEOUT_S} s")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of smbd's logs (for failure messages)."""
        texts = []
        for path in sorted(self._dir("log").glob("*")):
            with contextlib.suppress(OSError):
                texts += [f"{path.name}: {line}" for line in path.read_text(errors="replace").splitlines()]
        return "\n".join(texts[-lines:])

    def auth_events(self) -> list[dict[str, object]]:
        """The JSON authentication audit events smbd logged (needs ``auth_json_audit:3``)."""
        events: list[dict[str, object]] = []
        for path in sorted(self._dir("log").glob("log.*")):
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    start = line.find('{"timestamp"')
                    if start < 0:
                        continue
                    with contextlib.suppress(ValueError):
                        event = json.loads(line[start:])
                        if isinstance(event, dict) and isinstance(event.get("Authentication"), dict):
                            events.append(event["Authentication"])
        return events

    def stop(self) -> None:
        """Stop smbd, then samba-dcerpcd through its pid file (it detaches from smbd)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=STOP_TIMEOUT_S)
        for pidfile in self._dir("pid").glob("samba-dcerpcd*.pid"):
            _kill_pidfile(pidfile)

    def __enter__(self) -> SambaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_pidfile(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    # Only a live samba-dcerpcd: never a recycled pid, never a zombie (PID 1
    # does not reap here, so a killed daemon stays a zombie).
    if not _alive(pid) or not _comm(pid).startswith("samba-dcerpcd"):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.M)
    return state is not None and state.group(1) not in ("Z", "X")


def _port_open(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((ip, port)) == 0
