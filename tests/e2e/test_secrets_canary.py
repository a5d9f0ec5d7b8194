"""Secrets canary (issue 11): every secret is a unique canary, and none of them is found anywhere afterwards.

One module-scoped run on the demo fleet (:func:`appliance.lab.fleet.build_fleet`)
where every secret the appliance handles is a unique, greppable string:

- the personalization code (only its last 4 characters may ever appear);
- the ``PROXY_URL`` password: a real Squid with basic authentication in the
  hub namespace, and the platform is reached only through it;
- the ``ec2_api_proxy`` password: a second Squid in the hub, set on the
  platform (``set_ec2_api_proxy``) so that every STS/EC2 call to moto goes
  through it;
- the SSH private key, re-encrypted with a canary passphrase (its PEM body,
  encrypted and clear, is a canary too), a canary login password and a canary
  sudo password;
- the Windows password (Samba's, random per run) and a second Windows record
  holding a canary NT hash;
- an environment variable of the daemon holding a canary (the environment must
  never be dumped).

The auth records go the real way: plaintext to the platform's ``submit_job``,
which encrypts them (JWE) for this appliance; the daemon decrypts them.

Afterwards each canary is searched for, as bytes (and as UTF-16LE, upper case
hex, and the base64 ``user:password`` of an HTTP ``Proxy-Authorization``) in:
the console (stdout), the journal (stderr), every file under the state
directory (SQLite databases with their WAL and SHM files included), every other
file the daemon wrote under its working directory, and any file written under
``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/root`` since the daemon started.
The job's results at the platform are checked as well, and so are the command
lines and environments of the daemon and every child it started while the job
ran (sampled every 0.1 s from ``/proc``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from appliance.lab.demo import DemoError, Outcome, Scenario
from appliance.lab.fleet import Fleet, build_fleet, fleet_available
from appliance.lab.netns import netns_executor
from appliance.lab.squid import Squid, squid_available
from tests.conftest import require

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PROXY_PORT = 3128  # in the hub namespace
EC2_PROXY_PORT = 3129
PROXY_USER = "vsaproxy"
EC2_PROXY_USER = "vsaec2proxy"
MAX_SCANNED_FILE_BYTES = 64 * 1024 * 1024
FIND_TIMEOUT_S = 120
PROC_SAMPLE_S = 0.1
SCRATCH_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/root"))


def canary(kind: str) -> str:
    """A unique string no program would print by chance."""
    return f"CANARY{kind}{secrets.token_hex(10)}"


@dataclass
class Canaries:
    """The secrets of this run, by name, with the byte forms to look for."""

    values: dict[str, str]
    forms: dict[str, list[bytes]]


@dataclass
class Run:
    """What the canary run left behind."""

    fleet: Fleet
    outcome: Outcome
    canaries: Canaries
    perscode: str
    console: str
    journal: bytes
    state_files: list[tuple[Path, bytes]]
    written_files: list[tuple[Path, bytes]]
    proxy_log: str
    ec2_proxy_log: str
    daemon_exit: int | None
    processes: dict[tuple[int, str], bytes]
    fleet_pid: int


def _pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM's private part (the first two carry the public header and key)."""
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    return body[2:]


def _forms(name: str, value: str, user: str | None = None) -> list[bytes]:
    forms = [value.encode(), value.encode("utf-16-le"), value.upper().encode()]
    if user is not None:  # as a Proxy-Authorization header would carry it
        forms.append(base64.b64encode(f"{user}:{value}".encode()))
    return forms


def _files_written_since(roots: tuple[Path, ...], since: float, skip: tuple[Path, ...]) -> list[Path]:
    """Regular files under ``roots`` modified at or after ``since`` (epoch s), minus ``skip`` subtrees.

    ``find`` walks them (hundreds of thousands of entries under /root and /tmp
    on a shared machine: too slow in Python).
    """
    out = subprocess.run(
        ["find", *(str(r) for r in roots if r.exists()), "-xdev", "-type", "f", "-newermt", f"@{since:.0f}",
         "-size", f"-{MAX_SCANNED_FILE_BYTES // 1024}k", "-print0"],
        capture_output=True, timeout=FIND_TIMEOUT_S, check=False)  # unreadable or vanished entries: rc 1
    found = []
    for raw in out.stdout.split(b"\0"):
        if not raw:
            continue
        path = Path(os.fsdecode(raw))
        if not any(path == s or s in path.parents for s in skip):
            found.append(path)
    return found


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None  # removed meanwhile (another program's temporary file)


class ProcessWatch:
    """Samples the command lines and environments of a process and its descendants until stopped.

    A secret passed to a child in its argv is visible to every user (``ps``);
    in its environment, to anything that dumps it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[tuple[int, str], bytes] = {}  # (pid, "cmdline" | "environ") -> bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary-procs", daemon=True)

    def start(self) -> ProcessWatch:
        """Sample every :data:`PROC_SAMPLE_S` in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in _descendants(self.pid):
                for what in ("cmdline", "environ"):
                    try:
                        self.seen[(pid, what)] = Path(f"/proc/{pid}/{what}").read_bytes()
                    except OSError:
                        continue  # exited meanwhile
            self._stop.wait(PROC_SAMPLE_S)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _snapshot(state_dir: Path) -> list[tuple[Path, bytes]]:
    """Every file under the state directory with its bytes."""
    files = []
    for path in sorted(state_dir.rglob("*")):
        data = _read(path) if path.is_file() else None
        if data is not None:
            files.append((path, data))
    return files


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    reason = fleet_available() or squid_available()
    require(reason is None, reason or "")
    values = {name: canary(name.upper().replace(" ", "")) for name in (
        "proxy password", "ec2 proxy password", "key passphrase", "unix password", "sudo password",
        "windows password", "environment")}
    perscode = f"CANARY-PERS-{secrets.token_hex(12)}"
    nt_hash = secrets.token_hex(16)
    proxy_line = f"PROXY_URL={PROXY_USER}:{values['proxy password']}@127.0.0.1:{PROXY_PORT}\n"
    with tempfile.TemporaryDirectory(prefix="vsa-e2e-canary-") as tmp, \
            build_fleet(Path(tmp), perscode=perscode, user_data_extra=proxy_line) as fleet, \
            netns_executor(fleet.lab.hub, 1) as hub:
        proxy = Squid(users={PROXY_USER: values["proxy password"]}, port=PROXY_PORT)
        ec2_proxy = Squid(users={EC2_PROXY_USER: values["ec2 proxy password"]}, port=EC2_PROXY_PORT)
        # Started from a hub thread: Squid (and its readiness check) live in the hub namespace.
        hub.submit(proxy.start).result(timeout=60)
        try:
            hub.submit(ec2_proxy.start).result(timeout=60)
            fleet.platform.set_ec2_api_proxy(f"http://127.0.0.1:{EC2_PROXY_PORT}", EC2_PROXY_USER,
                                             values["ec2 proxy password"])

            # The records: the demo's key re-encrypted with a canary passphrase, canary passwords,
            # and a second Windows record with a canary NT hash.
            unix, windows = fleet.auth_records
            clear_pem = unix["private_keys"][0]["pem"]
            key = serialization.load_ssh_private_key(clear_pem.encode(), None)
            encrypted_pem = key.private_bytes(  # type: ignore[union-attr]
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                serialization.BestAvailableEncryption(values["key passphrase"].encode())).decode()
            unix["private_keys"] = [{"pem": encrypted_pem, "passphrase": values["key passphrase"],
                                     "certificate": None}]
            unix["password"] = values["unix password"]
            unix["root_delegation"] = {"method": "sudo", "password": values["sudo password"]}
            values["windows password"] = windows["password"]  # Samba's real one: random per run
            fleet.auth_records.append({
                "type": "windows", "id": "rec-windows-hash", "title": "NT hash record", "domain": None,
                "username": "vsacanaryhash", "password": None, "nt_hash": nt_hash, "protocols": ["ntlmv2"],
                "targets": list(windows["targets"])})

            forms: dict[str, list[bytes]] = {
                name: _forms(name, value, {"proxy password": PROXY_USER,
                                           "ec2 proxy password": EC2_PROXY_USER}.get(name))
                for name, value in values.items()}
            forms["nt hash"] = _forms("nt hash", nt_hash)
            # Beyond its last 4 characters: the code without them, its random head, and its last 10.
            forms["perscode"] = [perscode.encode(), perscode[:-4].encode(), perscode[:-4].encode("utf-16-le"),
                                 perscode[12:22].encode(), perscode[-10:].encode()]
            for label, pem in (("encrypted key", encrypted_pem), ("clear key", clear_pem)):
                forms[label] = [line.encode() for line in _pem_body_lines(pem)]
            canaries = Canaries({**values, "nt hash": nt_hash, "perscode": perscode}, forms)

            base_env = fleet.daemon_env
            fleet.daemon_env = lambda: {**base_env(), "LAB_CANARY_MARK": values["environment"]}  # type: ignore[method-assign]

            started = time.time() - 1  # mtime granularity
            scenario = Scenario(fleet, narrate=lambda _m: None)
            state_dir = fleet.workdir / "state"
            try:
                appliance_id = scenario.boot()
                watch = ProcessWatch(fleet.daemon_pid() or 0).start()
                try:
                    outcome = scenario.run_job(appliance_id)
                finally:
                    watch.stop()
                # While the daemon still runs: the SQLite WAL and SHM files exist only now.
                live_state = _snapshot(state_dir)
            except DemoError as exc:
                scenario.stop()
                pytest.fail(f"{exc}\nconsole:\n" + "\n".join(scenario.console) + "\njournal (end):\n"
                            + fleet.daemon_log.read_text(errors="replace")[-4000:])
            finally:
                code = scenario.stop()
            time.sleep(0.2)
            state_files = live_state + _snapshot(state_dir)
            # Files the lab itself wrote hold secrets by design (user-data, the platform's vault): skipped.
            lab_owned = (fleet.workdir / "platform", fleet.workdir / "user-data", fleet.workdir / "broker",
                         fleet.workdir / "platform.log", state_dir, fleet.daemon_log,
                         *(s.workdir for s in (proxy, ec2_proxy) if s.workdir is not None))
            written = []
            for path in _files_written_since((fleet.workdir, *SCRATCH_DIRS), started, lab_owned):
                data = _read(path)
                if data is not None:
                    written.append((path, data))
            yield Run(fleet, outcome, canaries, perscode, "\n".join(scenario.console), fleet.daemon_log.read_bytes(),
                      state_files, written, proxy.access_log_text(), ec2_proxy.access_log_text(), code,
                      watch.seen, watch.pid)
        finally:
            hub.submit(ec2_proxy.stop).result(timeout=30)
            hub.submit(proxy.stop).result(timeout=30)


def _leaks(run: Run, data: bytes) -> list[str]:
    return [name for name, forms in run.canaries.forms.items() if any(f in data for f in forms)]


# ---- the run really used every secret ---------------------------------------------------------------


def test_the_job_finished_and_used_the_secrets(run: Run) -> None:
    assert run.outcome.report["state"] == "completed"
    assert run.outcome.report["completion"]["status"] == "finished"
    assert run.daemon_exit == 0
    auth = [a for h in run.outcome.report["hosts"].values() for a in h["auth"] if a["record_id"]]
    # The passphrase-protected key logged in with sudo (so the passphrase was used), Samba's password worked,
    # and the NT-hash record was tried.
    assert ("rec-linux", "success", True) in {(a["record_id"], a["status"], a["privileged"]) for a in auth}, auth
    assert ("rec-windows", "success") in {(a["record_id"], a["status"]) for a in auth}, auth
    assert "rec-windows-hash" in {a["record_id"] for a in auth}, auth


def test_the_platform_was_reached_through_the_proxy(run: Run) -> None:
    assert f"CONNECT 127.0.0.1:{8443}" in run.proxy_log and PROXY_USER in run.proxy_log, run.proxy_log[-2000:]
    assert f"reachable through the proxy {PROXY_USER}:***@127.0.0.1:{PROXY_PORT}" in run.console, run.console


def test_ec2_calls_went_through_the_ec2_api_proxy(run: Run) -> None:
    assert "/200 " in run.ec2_proxy_log and f"http://127.0.0.1:5000/ {EC2_PROXY_USER}" in run.ec2_proxy_log, \
        run.ec2_proxy_log[-2000:]
    assert f"http://{EC2_PROXY_USER}:***@127.0.0.1:{EC2_PROXY_PORT}" in run.console, run.console


# ---- and no canary anywhere -------------------------------------------------------------------------------


def test_the_search_finds_a_canary_where_one_is(run: Run) -> None:
    """Positive control: the lab's own user-data holds the PERSCODE and the proxy password in clear."""
    user_data = (run.fleet.workdir / "user-data").read_bytes()
    assert {"perscode", "proxy password"} <= set(_leaks(run, user_data))
    assert _leaks(run, base64.b64encode(f"{EC2_PROXY_USER}:{run.canaries.values['ec2 proxy password']}".encode())) \
        == ["ec2 proxy password"]
    assert len(run.written_files) > 0 and len(run.state_files) > 0


def test_no_canary_on_the_console(run: Run) -> None:
    assert _leaks(run, run.console.encode()) == []
    assert f"PERSCODE ending in {run.perscode[-4:]}" in run.console, run.console


def test_no_canary_in_the_journal(run: Run) -> None:
    assert run.journal, "the journal is empty: nothing was checked"
    assert _leaks(run, run.journal) == []


def test_no_canary_in_the_state_directory(run: Run) -> None:
    names = {p.name for p, _ in run.state_files}
    assert any(n.endswith("-wal") for n in names), f"no SQLite WAL file was seen: {sorted(names)}"
    leaks = {str(path): _leaks(run, data) for path, data in run.state_files}
    assert {p: names_ for p, names_ in leaks.items() if names_} == {}


def test_no_canary_in_any_file_the_daemon_wrote(run: Run) -> None:
    leaks = {str(path): _leaks(run, data) for path, data in run.written_files}
    assert {p: names_ for p, names_ in leaks.items() if names_} == {}


def test_no_canary_in_the_results_at_the_platform(run: Run) -> None:
    assert _leaks(run, json.dumps(run.outcome.report).encode()) == []



def test_no_canary_in_the_command_line_or_environment_of_any_process(run: Run) -> None:
    # The daemon at least (it scans in-process today; any child it starts is sampled too).
    assert (run.fleet_pid, "cmdline") in run.processes and (run.fleet_pid, "environ") in run.processes
    leaks = {f"{pid} {what}": _leaks(run, data) for (pid, what), data in run.processes.items()}
    # The environment canary was put in the daemon's environment by this test: children inherit it.
    allowed = {"environment"}
    leaks = {k: [n for n in v if not (k.endswith("environ") and n in allowed)] for k, v in leaks.items()}
    assert {k: v for k, v in leaks.items() if v} == {}
