"""A lab for end-to-end daemon tests: reference platform + IMDS emulator + `vsa run` as a real process.

The platform runs in a thread of the test process (its admin handle, a second
:class:`Platform` on the same SQLite store, creates codes and injects faults);
the IMDS emulator runs in another thread; the daemon is ``.venv/bin/vsa run``
in its own process with a TOML configuration pointing at both, and test-only
timings (``VSA_POLL_INTERVAL_FLOOR_S``, ``VSA_WAIT_CAP_S``) so that polls come
every second or two and refusals are retried within seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from appliance.lab.imds import EmulatorConfig, ImdsEmulator, InstanceProfile
from appliance.lab.platform.admin import Platform
from appliance.lab.platform.server import PlatformThread

REPO = Path(__file__).resolve().parents[2]
VSA = REPO / ".venv" / "bin" / "vsa"


def vsa_command() -> list[str]:
    """The `vsa` console script of the venv (scripts/setup installs it), else the same CLI by module."""
    return [str(VSA)] if VSA.exists() else [sys.executable, "-m", "appliance.cli"]
INSTANCE_A = "i-0aaaa1111bbbb2222"
INSTANCE_B = "i-0bbbb3333cccc4444"


class DaemonLab:
    """Platform, IMDS emulator and a daemon process, all on 127.0.0.1, cleaned up on exit."""

    def __init__(self, tmp: Path, *, poll_interval_s: int = 2, instance_id: str = INSTANCE_A) -> None:
        self.tmp = tmp
        self.state_dir = tmp / "state"
        self.platform_dir = tmp / "platform"
        self.poll_interval_s = poll_interval_s
        self.instance_id = instance_id
        self._stack = ExitStack()
        self.platform: Platform | None = None
        self.server: PlatformThread | None = None
        self.imds: ImdsEmulator | None = None
        self.imds_url: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = tmp / "daemon.stdout"
        self.stderr_path = tmp / "daemon.stderr"
        self.config_path = tmp / "appliance.toml"
        self._runs = 0

    # --- lab services ---

    def __enter__(self) -> DaemonLab:
        Platform.init(self.platform_dir, poll_interval_s=self.poll_interval_s).close()
        self.server = PlatformThread(self.platform_dir).start()
        self._stack.callback(self.server.stop)
        self.platform = Platform(self.platform_dir)
        self._stack.callback(self.platform.close)
        self.imds = ImdsEmulator(EmulatorConfig(profile=InstanceProfile(instance_id=self.instance_id)))
        self.imds_url = self._stack.enter_context(self.imds.serve_in_thread())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_daemon()
        self._stack.close()

    def set_user_data(self, text: str | None) -> None:
        """What IMDS serves as user-data (None: 404)."""
        assert self.imds is not None
        self.imds.user_data = text.encode() if text is not None else None

    def set_instance(self, instance_id: str) -> None:
        """Make the emulator pretend to be another instance (the clone case)."""
        assert self.imds is not None
        self.imds.profile = InstanceProfile(instance_id=instance_id)
        self.imds._pkcs7_cache = None  # the signed document names the instance
        self.instance_id = instance_id

    def write_config(self, **extra: str) -> Path:
        """The daemon's TOML configuration."""
        assert self.server is not None and self.platform is not None
        lines = [
            "[platform]",
            f'url = "{self.server.url}"',
            f'ca_file = "{self.platform.ca_file}"',
            "[state]",
            f'dir = "{self.state_dir}"',
            "[imds]",
            f'endpoint = "{self.imds_url}"',
        ]
        for key, value in extra.items():
            lines.append(f"{key} = {value}")
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    # --- the daemon process ---

    def env(self, **extra: str) -> dict[str, str]:
        """The daemon's environment: test timings, no systemd, nothing of the host's VSA_/AWS_ settings."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VSA_", "AWS_", "NOTIFY_SOCKET", "WATCHDOG_", "HTTP_PROXY", "HTTPS_PROXY",
                                    "http_proxy", "https_proxy"))}
        env.update({"VSA_POLL_INTERVAL_FLOOR_S": "1", "VSA_WAIT_CAP_S": "2", "PYTHONUNBUFFERED": "1"})
        env.update(extra)
        return env

    def start_daemon(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``vsa run --config CONFIG [args]``; stdout and stderr go to files (appended across runs)."""
        if not self.config_path.exists():
            self.write_config()
        self._runs += 1
        out = open(self.stdout_path, "ab")  # noqa: SIM115 - closed in stop_daemon via the process
        err = open(self.stderr_path, "ab")  # noqa: SIM115
        self._files = (out, err)
        self._stdout_offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        self.proc = subprocess.Popen(
            [*vsa_command(), "run", "--config", str(self.config_path), *args],
            stdout=out, stderr=err, env=env or self.env(), cwd=self.tmp,
        )
        return self.proc

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        """Stop the daemon with ``sig``; return its exit status (None if none ran)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        for handle in getattr(self, "_files", ()):
            handle.close()
        return code

    def console(self) -> str:
        """Everything the daemon wrote on standard output (all runs)."""
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def journal(self) -> str:
        """Everything the daemon wrote on standard error (its structured logs)."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def run_console(self) -> str:
        """Standard output of the current (last) run only."""
        return self.console()[getattr(self, "_stdout_offset", 0):]

    def wait_for(self, pattern: str, timeout_s: float = 30.0, *, current_run: bool = True, count: int = 1) -> re.Match[str]:
        """Wait until the console shows ``pattern`` (a regex) ``count`` times; fail with the console if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.run_console() if current_run else self.console()
            matches = list(re.finditer(pattern, text, re.MULTILINE))
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) before {pattern!r}:\n{text}\n{self.journal()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r}; console:\n{text}\njournal:\n{self.journal()[-3000:]}")
            time.sleep(0.1)

    def wait_until(self, predicate: Any, timeout_s: float = 30.0, what: str = "a condition") -> Any:
        """Wait until ``predicate()`` is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; console:\n{self.console()}\njournal:\n{self.journal()[-3000:]}")
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        """``vsa status --json`` as a separate process."""
        out = subprocess.run([*vsa_command(), "status", "--json", "--config", str(self.config_path)],
                             capture_output=True, env=self.env(), timeout=30, check=True)
        return json.loads(out.stdout)

    def status_text(self) -> str:
        """``vsa status`` (human form)."""
        out = subprocess.run([*vsa_command(), "status", "--config", str(self.config_path)],
                             capture_output=True, env=self.env(), timeout=30, check=True, text=True)
        return out.stdout

    # --- the platform's view ---

    def polls(self, status: int | None = 200) -> list[dict[str, Any]]:
        """Recorded poll requests (answered ``status``)."""
        assert self.platform is not None
        filters: dict[str, Any] = {"path": "/vsa/v1/poll"}
        if status is not None:
            filters["status"] = status
        return self.platform.requests(**filters)

    def registers(self, status: int | None = None) -> list[dict[str, Any]]:
        """Recorded register requests."""
        assert self.platform is not None
        filters: dict[str, Any] = {"path": "/vsa/v1/register"}
        if status is not None:
            filters["status"] = status
        return self.platform.requests(**filters)

    def state_files_text(self) -> Iterator[tuple[Path, bytes]]:
        """Every file under the state directory with its bytes."""
        for path in sorted(self.state_dir.rglob("*")):
            if path.is_file():
                yield path, path.read_bytes()

