"""A real Squid forward proxy for the lab and the tests, with basic authentication.

Started in the foreground (``squid -N``) with a configuration of its own in a
private directory, so it never touches the machine's Squid. It stands for the
operator's ``PROXY_URL`` proxy and for the platform's ``ec2_api_proxy``.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SQUID_BINARY = "/usr/sbin/squid"
NCSA_HELPER = "/usr/lib/squid/basic_ncsa_auth"
START_TIMEOUT_S = 30.0


class SquidError(RuntimeError):
    """Squid could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def squid_available() -> str | None:
    """None when Squid and its NCSA helper are installed, else why not."""
    for path in (SQUID_BINARY, NCSA_HELPER):
        if not os.path.exists(path):
            return f"{path} is missing (install Debian's squid)"
    return None


def _apr1(password: str) -> str:
    result = subprocess.run(
        ["openssl", "passwd", "-apr1", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return result.stdout.strip()


@dataclass
class Squid:
    """A Squid process on ``host:port``; ``users`` maps login to password (empty: no auth)."""

    users: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def access_log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "access.log"

    def access_log_text(self) -> str:
        """What Squid logged of the requests it handled so far."""
        try:
            return self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Squid:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration and start Squid; wait until it accepts connections."""
        reason = squid_available()
        if reason:
            raise SquidError(reason)
        if self.port == 0:
            self.port = free_port(self.host)
        self.workdir = Path(tempfile.mkdtemp(prefix="vsa-squid-"))
        os.chmod(self.workdir, 0o755)
        auth_lines = ""
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.write_text("".join(f"{user}:{_apr1(pw)}\n" for user, pw in self.users.items()))
            auth_lines = (
                f"auth_param basic program {NCSA_HELPER} {passwd}\n"
                "auth_param basic realm vsa-lab\n"
                "auth_param basic children 2\n"
                "auth_param basic casesensitive on\n"
                "acl authenticated proxy_auth REQUIRED\n"
                "http_access allow authenticated\n"
            )
        else:
            auth_lines = "http_access allow all\n"
        conf = self.workdir / "squid.conf"
        conf.write_text(
            f"http_port {self.host}:{self.port}\n"
            f"{auth_lines}"
            "http_access deny all\n"
            "cache deny all\n"
            f"pid_filename {self.workdir}/squid.pid\n"
            f"access_log stdio:{self.workdir}/access.log\n"
            f"cache_log {self.workdir}/cache.log\n"
            f"coredump_dir {self.workdir}\n"
            "shutdown_lifetime 0 seconds\n"
            "dns_v4_first on\n"
            "logfile_rotate 0\n"
        )
        try:
            proxy_user = pwd.getpwnam("proxy")
            for path in self.workdir.iterdir():
                os.chown(path, proxy_user.pw_uid, proxy_user.pw_gid)
            os.chown(self.workdir, proxy_user.pw_uid, proxy_user.pw_gid)
        except KeyError:
            pass  # no "proxy" user: Squid keeps running as root, which also works
        self.process = subprocess.Popen(
            [SQUID_BINARY, "-N", "-f", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (
                    (self.workdir / "cache.log").read_text(errors="replace")
                    if (self.workdir / "cache.log").exists()
                    else ""
                )
                raise SquidError(f"squid exited with {self.process.returncode}: {log[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise SquidError(
            f"squid did not listen on {self.host}:{self.port} within {START_TIMEOUT_S} s"
        )

    def stop(self) -> None:
        """Stop Squid and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
