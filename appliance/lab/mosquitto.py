"""A real Mosquitto for the lab and the tests: foreground, its own configuration, 127.0.0.1 only.

LAB-NOTES (Mosquitto 2.0.11): started with ``subprocess.Popen`` in the
foreground (never ``-d``: a detached daemon is reparented to PID 1, which does
not reap it here) and ``wait()``-ed on; a TLS listener with
``require_certificate true`` works with the platform's CA, but Mosquitto drops
to its own user before it reads the key, so the lab configuration says
``user root``; a plain listener needs ``allow_anonymous true`` spelled out.

The broker can be stopped and started again on the same port (the "broker
down, then back" cases), or killed outright.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from appliance.lab.platform.mqtt import PLATFORM_MQTT_CN  # the platform's own client certificate

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
READY_POLL_S = 0.05
LOG_TAIL_CHARS = 2000


class MosquittoError(RuntimeError):
    """The lab broker could not be started (the message carries its log)."""


@dataclass(frozen=True)
class BrokerTls:
    """The TLS listener's files: the CA that signs clients (and the broker), the broker's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    """The mosquitto executable (Debian puts it in /usr/sbin), or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None
    )




def broker_acl(observers: tuple[str, ...] = ()) -> str:
    """A least-privilege ACL for certificate users (pure): what PROTOCOL.md's MQTT section needs, no more.

    Each appliance (user = its certificate's CN = its appliance ID) may read only
    its own wake topic and write only its own events and status topics; the
    platform may wake any appliance and read every event and status;
    ``observers`` (tests, dashboards) may read everything under ``vsa/``.
    """
    lines = [
        f"user {PLATFORM_MQTT_CN}",
        "topic write vsa/+/wake",
        "topic read vsa/+/events",
        "topic read vsa/+/status",
    ]
    for name in observers:
        lines += [f"user {name}", "topic readwrite vsa/#"]
    lines += [
        "pattern read vsa/%u/wake",
        "pattern write vsa/%u/events",
        "pattern write vsa/%u/status",
    ]
    return "\n".join(lines) + "\n"


def broker_config(
    port: int, tls: BrokerTls | None, *, require_certificate: bool = True, acl_file: Path | None = None
) -> str:
    """The text of a lab ``mosquitto.conf`` (pure).

    With ``tls``: one TLS listener that demands a client certificate signed by
    ``tls.ca_file`` and takes the certificate's common name as the user name.
    Without: a plain listener open to anonymous clients (LAB-NOTES: say so explicitly).
    With ``acl_file``: topic access as that file says (see :func:`broker_acl`).
    """
    lines = [
        "user root",  # LAB-NOTES: mosquitto reads the key after dropping privileges
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"listener {port} 127.0.0.1",
    ]
    if tls is None:
        lines.append("allow_anonymous true")
    else:
        lines += [
            f"cafile {tls.ca_file}",
            f"certfile {tls.cert_file}",
            f"keyfile {tls.key_file}",
            "tls_version tlsv1.2",  # the minimum: TLS 1.2 and 1.3 are accepted
            f"require_certificate {'true' if require_certificate else 'false'}",
        ]
        if require_certificate:
            lines.append("use_identity_as_username true")
        else:
            lines.append("allow_anonymous true")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    return "\n".join(lines) + "\n"


class MosquittoBroker:
    """One lab Mosquitto on 127.0.0.1:``port``; a context manager that stops it on exit."""

    def __init__(
        self,
        directory: Path,
        *,
        tls: BrokerTls | None,
        port: int | None = None,
        require_certificate: bool = True,
        acl_observers: tuple[str, ...] | None = None,
    ) -> None:
        """Prepare the broker's folder and configuration; nothing runs until :meth:`start`.

        ``acl_observers``: None for no ACL (any client may use any topic), else
        the least-privilege ACL of :func:`broker_acl` with these observer names.
        """
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = port or free_port()
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        acl_file = None
        if acl_observers is not None:
            acl_file = self.directory / "acl"
            acl_file.write_text(broker_acl(acl_observers))
        self.config_path.write_text(
            broker_config(self.port, tls, require_certificate=require_certificate, acl_file=acl_file)
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtts://127.0.0.1:<port>`` (or ``mqtt://`` for a plain listener)."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """The broker's log so far (connections, refusals)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = START_TIMEOUT_S) -> MosquittoBroker:
        """Start Mosquitto in the foreground and wait until its port accepts connections."""
        if self.running:
            return self
        binary = mosquitto_binary()
        if binary is None:
            raise MosquittoError("mosquitto is not installed (scripts/setup installs it)")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while not self._port_open():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MosquittoError(f"mosquitto did not start on 127.0.0.1:{self.port}: {self.log()[-LOG_TAIL_CHARS:]}")
            time.sleep(READY_POLL_S)
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
