"""Authenticated Linux checks over SSH (paramiko), behind async functions.

One call of :func:`check_unix` logs in to one host with one ``unix``
authentication record (PROTOCOL.md) and inventories it:

1. connect (TCP, then the SSH handshake), each with its own timeout;
2. host key: its SHA256 fingerprint goes into the result, and it is checked
   against the pin of the host's ``host_key`` (:mod:`appliance.state.hostkeys`)
   BEFORE any credential is sent: a changed key stops there with status ``error``;
3. authenticate: each private key of the record (OpenSSH or PEM; RSA, ECDSA,
   ED25519; with a passphrase; with an OpenSSH user certificate), then the
   password; DSA keys are reported as unsupported (paramiko 5 has no DSA);
4. one channel runs the collector script of :mod:`appliance.scan.inventory`
   through the record's root delegation (``sudo -n``; ``sudo -S -p ''`` with the
   password written to standard input then closed; ``su`` through a
   pseudo-terminal, the password sent only once the prompt is shown, with echo
   off). A delegation that fails or waits for input (``requiretty``, an
   unexpected prompt) is given up after ``delegation_s`` with words saying
   why, and the collectors run again unprivileged;
5. on EC2 targets, a second channel reads the target's own instance metadata.

Blocking paramiko work runs in the caller's bounded thread pool, one step at a
time, each step with its own timeout; at most :data:`MAX_SESSIONS_PER_HOST`
checks touch one host at once (real sshd drops connections past MaxStartups).
Nothing raises for a host's failure: every failure is a value with words in
the returned :class:`UnixCheck`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import io
import logging
import secrets
import shlex
import socket
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from appliance.authrecords import PrivateKeySpec, UnixRecord
from appliance.console import redact
from appliance.errors import StateError, VsaError
from appliance.results import AuthOutcome, HostResult, OsInfo, Packages
from appliance.scan import inventory
from appliance.scan.inventory import CommandResult, ListeningSocket
from appliance.state.hostkeys import HostKeyPins, PinVerdict

log = logging.getLogger("vsa.ssh")

MAX_SESSIONS_PER_HOST = 2
MAX_OUTPUT_BYTES = 32 * 1024 * 1024  # one channel's standard output
MAX_STDERR_BYTES = 64 * 1024
READ_CHUNK_BYTES = 256 * 1024
KEY_CACHE_SIZE = 256
# Asyncio's guard around a blocking step, on top of the step's own timeouts
# (which end the thread); only reached if paramiko ignored its timeouts.
STEP_GUARD_MARGIN_S = 10.0
# Host-key algorithms paramiko can negotiate for each key type (pinned type first).
_KEY_ALGORITHMS = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
}

T = TypeVar("T")


class SshError(VsaError):
    """An SSH step failed; the message says which and why (used inside this module)."""


@dataclass(frozen=True)
class SshTimeouts:
    """Timeouts of each step, in seconds."""

    connect_s: float = 10.0  # TCP connect
    handshake_s: float = 15.0  # banner and key exchange
    auth_s: float = 20.0  # each authentication attempt
    command_s: float = 120.0  # the collector channel, start to end
    delegation_s: float = 10.0  # sudo/su must have answered by then (covers PAM's ~2 s delay)
    imds_s: float = 40.0  # the instance-metadata channel


@dataclass(frozen=True)
class Stage:
    """One step of a check: ``ok`` None when it was not reached or not asked for."""

    name: str  # connect, host_key, authenticate, root, collectors, instance_metadata
    ok: bool | None
    detail: str


@dataclass
class UnixCheck:
    """What one unix record taught us of one host (a value; nothing here raises)."""

    ip: str
    port: int
    auth: AuthOutcome
    os: OsInfo | None = None
    packages: Packages | None = None
    listening: tuple[ListeningSocket, ...] = ()
    instance_metadata: dict[str, Any] | None = None
    host_key_type: str | None = None
    host_key_fingerprint: str | None = None  # SHA256:... (OpenSSH form)
    errors: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    commands: list[CommandResult] = field(default_factory=list)  # without their output

    def apply_to(self, result: HostResult) -> None:
        """Fill a :class:`HostResult` with this check (the job engine's one call)."""
        result.auth.append(self.auth)
        if self.os is not None:
            result.os = self.os
        if self.packages is not None:
            result.packages = self.packages
        if self.instance_metadata is not None:
            result.instance_metadata = self.instance_metadata
        result.errors.extend(f"ssh {self.ip}: {e}" for e in self.errors)


# ---- private keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedKey:
    """A record's private key made ready for paramiko, or why it cannot be used."""

    index: int  # 1-based, as an operator counts the record's keys
    pkey: paramiko.PKey | None
    label: str  # "key 1 (ssh-ed25519 SHA256:...)", never anything secret
    problem: str | None = None


_key_cache: OrderedDict[int, tuple[PrivateKeySpec, LoadedKey]] = OrderedDict()
_key_cache_lock = threading.Lock()


def load_key(spec: PrivateKeySpec, index: int = 1) -> LoadedKey:
    """Load one private key (cached per record key: bcrypt KDFs cost tens of ms each)."""
    with _key_cache_lock:
        hit = _key_cache.get(id(spec))
        if hit is not None and hit[0] is spec and hit[1].index == index:
            _key_cache.move_to_end(id(spec))
            return hit[1]
    loaded = _load_key(spec, index)
    with _key_cache_lock:
        _key_cache[id(spec)] = (spec, loaded)
        while len(_key_cache) > KEY_CACHE_SIZE:
            _key_cache.popitem(last=False)
    return loaded


def _load_key(spec: PrivateKeySpec, index: int) -> LoadedKey:
    label = f"key {index}"
    data = spec.pem.strip().encode("utf-8") + b"\n"
    password = spec.passphrase.encode("utf-8") if spec.passphrase else None
    try:
        key = _deserialize(data, password)
    except TypeError:
        if password is None:
            return LoadedKey(index, None, label, "is encrypted and the record has no passphrase")
        return LoadedKey(index, None, label, "could not be read (not a private key)")
    except UnsupportedAlgorithm:
        return LoadedKey(index, None, label, "has a key type this appliance cannot use")
    except ValueError as exc:
        if password is not None and _is_encrypted(data):
            return LoadedKey(index, None, label, "could not be decrypted: wrong passphrase or damaged key")
        if b"ssh-dss" in data or b"BEGIN DSA PRIVATE KEY" in data:
            return LoadedKey(index, None, label, _DSA_WORDS)
        return LoadedKey(index, None, label, f"could not be read: {_exc_words(exc)}")
    if isinstance(key, dsa.DSAPrivateKey):
        return LoadedKey(index, None, label, _DSA_WORDS)
    pkey_class: type[paramiko.PKey]
    if isinstance(key, rsa.RSAPrivateKey):
        pkey_class = paramiko.RSAKey
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        pkey_class = paramiko.ECDSAKey
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        pkey_class = paramiko.Ed25519Key
    else:
        return LoadedKey(index, None, label, f"is of an unsupported type ({type(key).__name__})")
    # Re-encode in memory (never on disk) as an unencrypted OpenSSH key, the one
    # form paramiko reads for every key type; PKCS#8 PEM included.
    openssh = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode("ascii")
    try:
        pkey = pkey_class.from_private_key(io.StringIO(openssh))
    except (paramiko.SSHException, ValueError) as exc:
        return LoadedKey(index, None, label, f"could not be used: {_exc_words(exc)}")
    if spec.certificate:
        problem = _attach_certificate(pkey, spec.certificate)
        if problem:
            return LoadedKey(index, None, f"{label} ({pkey.get_name()} {pkey.fingerprint})", problem)
        return LoadedKey(index, pkey, f"{label} ({pkey.public_blob.key_type} certificate, key {pkey.fingerprint})")  # type: ignore[union-attr]
    return LoadedKey(index, pkey, f"{label} ({pkey.get_name()} {pkey.fingerprint})")


_DSA_WORDS = ("is a DSA (ssh-dss) key: the key type is unsupported (paramiko 5 has no DSA "
              "and OpenSSH disables it by default); use an ED25519, ECDSA or RSA key")


def _deserialize(data: bytes, password: bytes | None) -> Any:
    def load(pw: bytes | None) -> Any:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            return serialization.load_ssh_private_key(data, pw)
        return serialization.load_pem_private_key(data, pw)

    try:
        with warnings.catch_warnings():
            # cryptography warns when it reads a DSA key; we refuse those with words below.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return load(password)
    except TypeError:
        if password is None:
            raise
            # A passphrase given for a key that has none: use the key as it is.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return load(None)


def _is_encrypted(data: bytes) -> bool:
    if b"ENCRYPTED" in data:
        return True
    if b"BEGIN OPENSSH PRIVATE KEY" in data:
        body = b"".join(line for line in data.splitlines() if not line.startswith(b"-----"))
        try:
            raw = base64.b64decode(body)[:64]
        except ValueError:
            return False
        return b"bcrypt" in raw
    return False


def _attach_certificate(pkey: paramiko.PKey, line: str) -> str | None:
    parts = line.strip().split()
    if len(parts) < 2 or not parts[0].endswith("-cert-v01@openssh.com"):
        return "has a certificate that is not an OpenSSH *-cert-v01@openssh.com line"
    try:
        blob = base64.b64decode(parts[1], validate=True)
        pkey.load_certificate(paramiko.Message(blob))
    except (ValueError, paramiko.SSHException) as exc:
        return f"has a certificate that does not fit it: {_exc_words(exc)}"
    return None


def _exc_words(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return redact(text)[:200]


# ---- one SSH connection (blocking; runs in the executor) ---------------------------------


@dataclass
class _Exec:
    stdout: bytes = b""
    stderr: bytes = b""
    status: int | None = None
    error: str | None = None  # None: the command ran to its end
    truncated: bool = False
    answered: bool = False  # any output arrived before the delegation deadline


class _Connection:
    """One SSH connection to one host; every method blocks, none raises SshError-less."""

    def __init__(self, ip: str, port: int, timeouts: SshTimeouts) -> None:
        self.ip = ip
        self.port = port
        self.timeouts = timeouts
        self.transport: paramiko.Transport | None = None
        self._sock: socket.socket | None = None
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connection (thread-safe; unblocks a step in progress)."""
        with self._lock:
            self._closed = True
            transport, sock = self.transport, self._sock
        if transport is not None:
            transport.close()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def connect(self, key_types: tuple[str, ...] | None) -> paramiko.PKey:
        """TCP connect and SSH handshake; the server's host key. Raises SshError with words."""
        t = self.timeouts
        try:
            sock = socket.create_connection((self.ip, self.port), timeout=t.connect_s)
        except ConnectionRefusedError:
            raise SshError(f"connection refused on port {self.port} (no SSH server listening)") from None
        except TimeoutError:
            raise SshError(f"no answer on port {self.port} within {t.connect_s:g} s") from None
        except OSError as exc:
            raise SshError(f"cannot connect to port {self.port}: {exc.strerror or exc}") from None
        # SSH is request/response: without TCP_NODELAY, Nagle's algorithm and the
        # peer's delayed ACK stall small writes (~40 ms each at authentication).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._closed:
                sock.close()
                raise SshError("the check was stopped")
            self._sock = sock
            transport = paramiko.Transport(sock)
            self.transport = transport
        transport.banner_timeout = t.handshake_s
        transport.handshake_timeout = t.handshake_s
        transport.auth_timeout = t.auth_s
        if key_types:
            options = transport.get_security_options()
            usable = tuple(k for k in key_types if k in options.key_types)
            if usable:
                options.key_types = usable
        try:
            transport.start_client(timeout=t.handshake_s)
        except paramiko.SSHException as exc:
            words = str(exc)
            if "no acceptable host key" in words and key_types:
                raise _HostKeyGone(key_types[0]) from None
            if "banner" in words.lower():
                raise SshError(f"port {self.port} does not speak SSH (no SSH banner within {t.handshake_s:g} s)") from None
            raise SshError(f"SSH handshake failed: {_exc_words(exc)}") from None
        except (EOFError, OSError) as exc:
            raise SshError(f"the server closed the connection during the handshake ({_exc_words(exc)})") from None
        if not transport.is_active():
            raise SshError("SSH handshake did not complete")
        try:
            return transport.get_remote_server_key()
        except paramiko.SSHException:
            # start_client() returns quietly when its timeout passes mid-handshake.
            if transport.remote_version:
                raise SshError(f"the SSH handshake did not finish within {t.handshake_s:g} s") from None
            raise SshError(f"port {self.port} does not speak SSH (no SSH banner within "
                           f"{t.handshake_s:g} s)") from None

    def authenticate(self, username: str, keys: list[LoadedKey], password: str | None) -> tuple[str, str]:
        """Try the keys, then the password. Returns (status, words): success/failed/error."""
        transport = self.transport
        assert transport is not None
        notes: list[str] = []
        tried = False
        for key in keys:
            if key.problem or key.pkey is None:
                notes.append(f"{key.label} {key.problem}")
                continue
            pkey = key.pkey
            outcome = self._attempt(functools.partial(transport.auth_publickey, username, pkey), key.label)
            if outcome[0] == "success":
                return "success", f"logged in as {username} with {key.label}"
            tried = tried or outcome[0] == "failed"
            notes.append(outcome[1])
            if outcome[0] in ("error", "closed"):
                break
        if password is not None and transport.is_active() and not transport.is_authenticated():
            outcome = self._attempt(lambda: transport.auth_password(username, password), "password")
            if outcome[0] == "success":
                return "success", f"logged in as {username} with a password"
            tried = tried or outcome[0] in ("failed", "closed")
            notes.append(outcome[1])
        if not keys and password is None:
            notes.append("the record has neither keys nor a password")
        status = "failed" if tried else "error"
        return status, f"{username}: " + "; ".join(notes)

    def _attempt(self, fn: Callable[[], Any], label: str) -> tuple[str, str]:
        transport = self.transport
        assert transport is not None
        try:
            remaining = fn()
        except paramiko.BadAuthenticationType as exc:
            allowed = ", ".join(exc.allowed_types) or "none"
            return "failed", f"{label}: the server does not accept this method (it allows: {allowed})"
        except paramiko.AuthenticationException as exc:
            words = str(exc)
            if "timeout" in words.lower():
                return "error", f"{label}: no answer within {self.timeouts.auth_s:g} s"
            if "transport shut down" in words or not transport.is_active():
                return "closed", f"{label}: refused, and the server closed the connection (too many attempts?)"
            return "failed", f"{label}: refused"
        except (paramiko.SSHException, EOFError, OSError) as exc:
            return "error", f"{label}: {_exc_words(exc)}"
        if transport.is_authenticated():
            return "success", label
        return "failed", f"{label}: accepted, but the server asks for more ({', '.join(remaining or [])})"

    def exec(self, command: str, *, timeout_s: float, stdin: bytes | None = None,
             answer_s: float | None = None) -> _Exec:
        """Run ``command`` (no pty); ``stdin`` is written then closed (EOF) at once.

        ``answer_s``: the first byte of standard output (or the end of the
        command) must come within that time, else the command is abandoned as
        waiting for input.
        """
        transport = self.transport
        if transport is None or not transport.is_active():
            return _Exec(error="the connection is closed")
        try:
            chan = transport.open_session(timeout=min(timeout_s, self.timeouts.handshake_s))
        except (paramiko.SSHException, EOFError, OSError) as exc:
            return _Exec(error=f"cannot open a session channel: {_exc_words(exc)}")
        try:
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            # Nothing on the target may ever wait for more input from us.
            chan.shutdown_write()
            return _read(chan, time.monotonic() + timeout_s, answer_s)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            return _Exec(error=f"the command failed: {_exc_words(exc)}")
        finally:
            chan.close()

    def exec_su(self, script: str, password: str, *, timeout_s: float, answer_s: float) -> _Exec:
        """Run ``script`` as root through ``su`` on a pseudo-terminal.

        Echo is switched off before su starts (``stty -echo``), and the password
        is sent only after su has printed its prompt, so it can neither be
        echoed back nor read by anything else; it is also scrubbed from the output.
        """
        transport = self.transport
        if transport is None or not transport.is_active():
            return _Exec(error="the connection is closed")
        secret = password.encode("utf-8")
        try:
            chan = transport.open_session(timeout=min(timeout_s, self.timeouts.handshake_s))
        except (paramiko.SSHException, EOFError, OSError) as exc:
            return _Exec(error=f"cannot open a session channel: {_exc_words(exc)}")
        try:
            chan.get_pty(term="dumb", width=200, height=24)
            chan.exec_command("stty -echo -onlcr 2>/dev/null; exec su -s /bin/sh root -c "
                              + shlex.quote(script))
            deadline = time.monotonic() + timeout_s
            prompt_deadline = time.monotonic() + answer_s
            seen = b""
            while True:
                now = time.monotonic()
                if now >= prompt_deadline:
                    return _Exec(stdout=seen, error=f"su showed no password prompt within {answer_s:g} s")
                chan.settimeout(prompt_deadline - now)
                try:
                    data = chan.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    return _Exec(stdout=seen.replace(secret, b"***"), status=_exit_status(chan, 2.0),
                                 answered=True, error="su ended before asking for a password")
                seen += data
                if inventory.SECTION_PREFIX.encode() in seen:
                    break  # already root: su asked nothing
                if seen.rstrip().endswith(b":"):
                    # The prompt ("Password: ", in any language): echo is off by now.
                    chan.sendall(secret + b"\n")
                    break
                if len(seen) > 4096:
                    return _Exec(stdout=seen[:4096], error="su printed something other than a password prompt")
            result = _read(chan, deadline, answer_s + 5.0)
            result.stdout = (seen + result.stdout).replace(secret, b"***").replace(b"\r\n", b"\n")
            result.answered = True
            return result
        except (paramiko.SSHException, EOFError, OSError) as exc:
            return _Exec(error=f"su failed: {_exc_words(exc)}")
        finally:
            chan.close()


class _HostKeyGone(SshError):
    """The server no longer offers a key of the pinned type."""

    def __init__(self, key_type: str) -> None:
        super().__init__(key_type)
        self.key_type = key_type


def _exit_status(chan: paramiko.Channel, wait_s: float) -> int | None:
    if chan.status_event.wait(max(0.0, wait_s)):
        return int(chan.exit_status)
    return None


def _read(chan: paramiko.Channel, deadline: float, answer_s: float | None) -> _Exec:
    """Read a channel's stdout to EOF (bounded in time and size), then stderr and status."""
    out = bytearray()
    answer_deadline = time.monotonic() + answer_s if answer_s else deadline
    result = _Exec()
    while True:
        now = time.monotonic()
        limit = deadline if out else min(deadline, answer_deadline)
        if now >= limit:
            if not out and limit == answer_deadline and answer_deadline < deadline:
                result.error = f"no answer within {answer_s:g} s (waiting for input?)"
            else:
                result.error = "timed out"
            break
        chan.settimeout(limit - now)
        try:
            data = chan.recv(READ_CHUNK_BYTES)
        except TimeoutError:
            continue
        if not data:
            break
        out += data
        if len(out) > MAX_OUTPUT_BYTES:
            result.truncated = True
            result.error = f"more than {MAX_OUTPUT_BYTES // (1024 * 1024)} MiB of output"
            break
    result.answered = bool(out) or result.error is None
    err = bytearray()
    while chan.recv_stderr_ready() and len(err) < MAX_STDERR_BYTES:
        err += chan.recv_stderr(MAX_STDERR_BYTES)
    result.stdout = bytes(out)
    result.stderr = bytes(err[:MAX_STDERR_BYTES])
    if result.error is None:
        result.status = _exit_status(chan, max(0.0, min(5.0, deadline - time.monotonic())))
        if chan.recv_stderr_ready() and len(err) < MAX_STDERR_BYTES:
            result.stderr += chan.recv_stderr(MAX_STDERR_BYTES - len(err))
    return result


# ---- root delegation words ----------------------------------------------------------------


def sudo_command(script: str, *, with_password: bool) -> str:
    """The command line that runs ``script`` as root through sudo (no secret in it)."""
    if with_password:
        # -S: the password comes on stdin; -p '': no prompt text mixed into the output.
        return "sudo -S -p '' -- sh -c " + shlex.quote(script)
    return "sudo -n -- sh -c " + shlex.quote(script)


def explain_delegation_failure(method: str, username: str, result: _Exec) -> str:
    """Words for a sudo/su that did not run the script as root."""
    text = redact((result.stderr + b"\n" + result.stdout).decode("utf-8", "replace"))
    text = " ".join(text.split())[:300]
    low = text.lower()
    if method == "sudo":
        if "must have a tty" in low or "terminal is required" in low or "no tty present" in low:
            return (f"sudo requires a tty (requiretty): allow {username} without one "
                    f"(`Defaults:{username} !requiretty` in sudoers)")
        if "a password is required" in low:
            return "sudo asks for a password and the record has none (sudo -n)"
        if "incorrect password" in low or "try again" in low or "no password was provided" in low:
            return "sudo refused the record's password"
        if "not in the sudoers" in low or "may not run sudo" in low or "not allowed to execute" in low:
            return f"{username} may not run sudo on this host"
        if result.status == 127 or "not found" in low:
            return "sudo is not installed on the target"
    else:
        if "authentication failure" in low or "incorrect password" in low:
            return "su refused the root password"
        if "must be run from a terminal" in low:
            return "su needs a terminal and did not get one"
        if result.status == 127 or "not found" in low:
            return "su is not installed on the target"
    if result.error and not result.answered:
        return (f"{method} did not answer within the delegation timeout: it is waiting for "
                "input (an unexpected password prompt or a tty)")
    detail = result.error or f"exit status {result.status}"
    return f"{method} failed ({detail})" + (f": {text}" if text else "")


# ---- per-host session limit ---------------------------------------------------------------


class _HostSlots:
    """At most MAX_SESSIONS_PER_HOST checks at once per address, per event loop."""

    def __init__(self) -> None:
        self._sems: dict[str, tuple[asyncio.Semaphore, int]] = {}

    async def acquire(self, ip: str) -> None:
        entry = self._sems.get(ip)
        sem, users = entry if entry else (asyncio.Semaphore(MAX_SESSIONS_PER_HOST), 0)
        self._sems[ip] = (sem, users + 1)
        try:
            await sem.acquire()
        except BaseException:
            self._drop(ip)
            raise

    def release(self, ip: str) -> None:
        self._sems[ip][0].release()
        self._drop(ip)

    def _drop(self, ip: str) -> None:
        sem, users = self._sems[ip]
        if users <= 1:
            del self._sems[ip]
        else:
            self._sems[ip] = (sem, users - 1)


_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _HostSlots] = weakref.WeakKeyDictionary()


def _host_slots() -> _HostSlots:
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = _HostSlots()
    return slots


# ---- the check ----------------------------------------------------------------------------


class _Runner:
    """Runs blocking steps in the executor with a guard that closes the connection."""

    def __init__(self, executor: concurrent.futures.Executor, conn: _Connection) -> None:
        self.executor = executor
        self.conn = conn

    async def __call__(self, fn: Callable[[], T], budget_s: float, what: str) -> T:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def run() -> T:
            loop.call_soon_threadsafe(started.set)
            return fn()

        future = loop.run_in_executor(self.executor, run)
        # Time spent queued for a thread is not the step's: wait for it to start.
        waiter: asyncio.Future[Any] = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        finally:
            waiter.cancel()
        try:
            return await asyncio.wait_for(asyncio.shield(future), budget_s + STEP_GUARD_MARGIN_S)
        except TimeoutError:
            self.conn.close()
            future.add_done_callback(_consume)
            raise SshError(f"{what} did not finish within {budget_s:g} s") from None


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _preferred_key_types(pinned_type: str | None) -> tuple[str, ...] | None:
    if pinned_type is None:
        return None
    return _KEY_ALGORITHMS.get(pinned_type)


async def check_unix(
    ip: str,
    record: UnixRecord,
    *,
    pins: HostKeyPins,
    host_key: str,
    executor: concurrent.futures.ThreadPoolExecutor,
    timeouts: SshTimeouts = SshTimeouts(),
    is_ec2: bool = False,
) -> UnixCheck:
    """Log in to ``ip`` with ``record`` and inventory the host; never raises for the host.

    ``host_key`` is the host's key in PROTOCOL.md's sense (instance ID or IP)
    under which its SSH host key is pinned; ``executor`` is the bounded pool
    that runs paramiko (size it to the number of hosts checked at once).
    """
    slots = _host_slots()
    await slots.acquire(ip)
    conn = _Connection(ip, record.port, timeouts)
    check = UnixCheck(ip=ip, port=record.port,
                      auth=AuthOutcome(record.id, "unix", "error", False, "not started"))
    try:
        await _check(conn, check, record, pins, host_key, executor, timeouts, is_ec2)
    except SshError as exc:
        # A step's guard fired: the connection is closed; say where we were.
        _fail_stage(check, record, str(exc))
    except asyncio.CancelledError:
        conn.close()
        raise
    except Exception as exc:  # noqa: BLE001 - one host's surprise must not end the scan
        # Not a failure we know how to name (a library bug, a shut-down pool):
        # the host gets an error with words, the journal gets the detail.
        log.error("ssh %s: unexpected failure: %s", ip, redact(repr(exc)))
        _fail_stage(check, record, f"internal error in the SSH check ({type(exc).__name__}); see the journal")
    finally:
        # Closing joins no thread; paramiko's own thread ends with the transport.
        conn.close()
        slots.release(ip)
    return check


def _fail_stage(check: UnixCheck, record: UnixRecord, words: str) -> None:
    reached = {s.name for s in check.stages}
    if "authenticate" not in reached:
        check.auth = AuthOutcome(record.id, "unix", "error", False, words)
    check.errors.append(words)


async def _check(conn: _Connection, check: UnixCheck, record: UnixRecord, pins: HostKeyPins,
                 host_key: str, executor: concurrent.futures.ThreadPoolExecutor,
                 timeouts: SshTimeouts, is_ec2: bool) -> None:
    run = _Runner(executor, conn)
    rid = record.id

    def fail(status: str, words: str, stage: str) -> None:
        check.auth = AuthOutcome(rid, "unix", status, False, words)  # type: ignore[arg-type]
        check.stages.append(Stage(stage, False, words))

    # 1. connect, limited to the pinned key type when there is a pin.
    try:
        pinned = await run(lambda: pins.get(host_key), 5.0, "reading the host-key pin")
    except StateError as exc:
        fail("error", f"host-key pins unusable: {exc}", "host_key")
        return
    try:
        server_key = await run(
            lambda: conn.connect(_preferred_key_types(pinned.key_type if pinned else None)),
            timeouts.connect_s + timeouts.handshake_s, "connecting")
    except _HostKeyGone as exc:
        assert pinned is not None
        check.stages.append(Stage("connect", True, f"port {record.port} answers SSH"))
        fail("error", (f"host key changed: {host_key} is pinned to {pinned.key_type} "
                       f"{pinned.fingerprint} and the server no longer offers a {exc.key_type} key; "
                       f"authentication stopped. If the change is expected, run "
                       f"`vsa hostkeys forget {host_key}`"), "host_key")
        return
    except SshError as exc:
        fail("error", str(exc), "connect")
        return
    check.stages.append(Stage("connect", True, f"port {record.port} answers SSH"))
    check.host_key_type = server_key.get_name()
    check.host_key_fingerprint = server_key.fingerprint

    # 2. the host key, before any credential leaves.
    try:
        verdict: PinVerdict = await run(
            lambda: pins.check_or_pin(host_key, server_key.get_name(), server_key.fingerprint),
            5.0, "pinning the host key")
    except StateError as exc:
        fail("error", f"host key not checked, authentication stopped: {exc}", "host_key")
        return
    if not verdict.ok:
        fail("error", verdict.message(), "host_key")
        log.warning("ssh %s: %s", conn.ip, verdict.message())
        return
    check.stages.append(Stage("host_key", True, verdict.message()))

    # 3. authenticate.
    keys = [load_key(spec, i + 1) for i, spec in enumerate(record.private_keys)]
    status, words = await run(lambda: conn.authenticate(record.username, keys, record.password),
                              timeouts.auth_s * (len(keys) + 1), "authenticating")
    if status != "success":
        fail(status, words, "authenticate")
        return
    check.stages.append(Stage("authenticate", True, words))
    check.auth = AuthOutcome(rid, "unix", "success", False, words)

    # 4. collectors through the root delegation.
    nonce = secrets.token_hex(8)
    script = inventory.collector_script(nonce)
    method = record.root_delegation.method
    delegated: _Exec | None = None
    delegation_problem: str | None = None
    if method == "sudo" and record.username != "root":
        password = record.root_delegation.password
        command = sudo_command(script, with_password=password is not None)
        stdin = (password.encode("utf-8") + b"\n") if password is not None else None
        delegated = await run(lambda: conn.exec(command, timeout_s=timeouts.command_s, stdin=stdin,
                                                answer_s=timeouts.delegation_s),
                              timeouts.command_s, "running the collectors through sudo")
    elif method == "su" and record.username != "root":
        password = record.root_delegation.password
        if password is None:
            delegation_problem = "su needs the root password and the record has none"
        else:
            delegated = await run(lambda: conn.exec_su(script, password, timeout_s=timeouts.command_s,
                                                       answer_s=timeouts.delegation_s),
                                  timeouts.command_s, "running the collectors through su")
    sections: dict[str, CommandResult] | None = None
    if delegated is not None:
        sections = _sections(delegated, nonce)
        if "id" not in sections:
            delegation_problem = explain_delegation_failure(method, record.username, delegated)
            sections = None
    if sections is None:
        plain = await run(lambda: conn.exec(script, timeout_s=timeouts.command_s),
                          timeouts.command_s, "running the collectors")
        sections = _sections(plain, nonce)
        if "id" not in sections:
            check.errors.append("collectors: " + (plain.error or f"no output (exit status {plain.status})"))
    found = inventory.inventory_from(sections)
    privileged = found.uid == 0
    check.commands.extend(CommandResult(name=s.name, exit_status=s.exit_status, error=s.error,
                                        truncated=s.truncated) for s in sections.values())
    if delegation_problem:
        check.errors.append(f"root delegation ({method}): {delegation_problem}")
        check.stages.append(Stage("root", False, delegation_problem))
        words += f"; root not reached: {delegation_problem}"
    elif method == "none":
        check.stages.append(Stage("root", privileged or None,
                                  "logged in as root" if privileged else "no root delegation asked for"))
    else:
        detail = f"root reached through {method}" if privileged else f"{method} ran the collectors as uid {found.uid}"
        check.stages.append(Stage("root", privileged, detail))
    check.auth = AuthOutcome(rid, "unix", "success", privileged, words)
    check.os = found.os
    check.packages = found.packages
    check.listening = found.listening
    check.errors.extend(found.errors)
    collected = found.os is not None and found.packages is not None
    check.stages.append(Stage(
        "collectors", collected,
        (f"{len(found.packages.items)} {found.packages.manager} packages, "  # type: ignore[union-attr]
         f"{len(found.listening)} listening sockets" if collected else "; ".join(found.errors) or "no output")))

    # 5. the target's own instance metadata (EC2 only).
    if is_ec2:
        nonce = secrets.token_hex(8)
        imds_script = inventory.imds_script(nonce)
        result = await run(lambda: conn.exec(imds_script, timeout_s=timeouts.imds_s),
                           timeouts.imds_s, "reading the instance metadata")
        check.instance_metadata = inventory.parse_imds(_sections(result, nonce))
        if check.instance_metadata is None:
            check.errors.append("instance metadata: the target's IMDS did not answer "
                                "(no IMDS, IMDS disabled, or no curl/wget/python3)")
        check.stages.append(Stage("instance_metadata", check.instance_metadata is not None,
                                   "read" if check.instance_metadata else "not available"))


def _sections(result: _Exec, nonce: str) -> dict[str, CommandResult]:
    text = result.stdout.decode("utf-8", "replace")
    try:
        sections = inventory.split_sections(text, nonce)
    except inventory.InventoryParseError as exc:
        log.info("ssh: unusable collector output: %s", exc)
        return {}
    if result.error and sections:
        # The channel was cut: the last section may be partial (split_sections marks it).
        log.debug("ssh: collector output cut short: %s", result.error)
    return sections


# ---- a record from the command line (vsa scan --ssh-user --ssh-key ...) -------------------


def cli_unix_record(
    *,
    username: str,
    key_paths: tuple[str, ...] = (),
    key_passphrase: str | None = None,
    password: str | None = None,
    delegation: str = "none",
    delegation_password: str | None = None,
    port: int = 22,
    targets: tuple[str, ...] = ("0.0.0.0/0", "::/0"),
) -> UnixRecord:
    """A :class:`UnixRecord` from ``vsa scan`` options, parsed like a platform record.

    Keys are read from ``key_paths`` (a ``KEY-cert.pub`` beside a key is its
    certificate, as OpenSSH does); secrets (passphrase, passwords) come from the
    caller, who reads them from the environment, never from argv. Every secret
    is registered with the console's scrubber. Raises
    :class:`appliance.authrecords.AuthRecordError` (a bad option) or ``OSError``
    (an unreadable key file).
    """
    from pathlib import Path

    from appliance.authrecords import AuthRecordError, parse_auth_record

    keys = []
    for path in key_paths:
        pem = Path(path).read_text(encoding="utf-8")
        cert_path = Path(path + "-cert.pub")
        certificate = cert_path.read_text(encoding="utf-8").strip() if cert_path.exists() else None
        keys.append({"pem": pem, "passphrase": key_passphrase, "certificate": certificate})
    parsed = parse_auth_record({
        "type": "unix", "id": "cli", "title": "command line", "username": username,
        "password": password, "private_keys": keys,
        "root_delegation": {"method": delegation, "password": delegation_password},
        "port": port, "targets": list(targets),
    })
    if not isinstance(parsed, UnixRecord):
        raise AuthRecordError("not a unix record")
    return parsed


# ---- preflight ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreflightReport:
    """For one host and record: can we connect, authenticate, reach root, run the collectors?"""

    ip: str
    host_key: str
    record_id: str
    connect: Stage
    authenticate: Stage
    root: Stage
    collectors: Stage
    host_key_fingerprint: str | None

    @property
    def ok(self) -> bool:
        """Everything asked for works (root only counts when the record asks for it)."""
        return bool(self.connect.ok and self.authenticate.ok and self.collectors.ok
                    and self.root.ok is not False)

    def lines(self) -> list[str]:
        """Human lines, one per step, e.g. for ``vsa scan --check-auth``."""
        def mark(stage: Stage) -> str:
            return {True: "ok  ", False: "FAIL", None: "--  "}[stage.ok]
        head = f"{self.ip} ({self.host_key}) record {self.record_id}"
        if self.host_key_fingerprint:
            head += f", host key {self.host_key_fingerprint}"
        return [head] + [f"  {mark(s)} {s.name}: {s.detail}"
                         for s in (self.connect, self.authenticate, self.root, self.collectors)]


async def preflight_unix(
    ip: str,
    record: UnixRecord,
    *,
    pins: HostKeyPins,
    host_key: str,
    executor: concurrent.futures.ThreadPoolExecutor,
    timeouts: SshTimeouts = SshTimeouts(),
) -> PreflightReport:
    """Check one host the way a scan would, and say for each step whether it works and why not.

    It pins the host key on first use exactly as a scan does.
    """
    check = await check_unix(ip, record, pins=pins, host_key=host_key, executor=executor,
                             timeouts=timeouts)
    stages = {s.name: s for s in check.stages}
    not_reached = Stage("", None, "not reached")

    def get(name: str) -> Stage:
        s = stages.get(name)
        return s if s is not None else Stage(name, None, not_reached.detail)

    connect = get("connect")
    host = stages.get("host_key")
    if connect.ok and host is not None and not host.ok:
        # A changed host key stops authentication: report it there.
        authenticate = Stage("authenticate", False, host.detail)
    else:
        authenticate = get("authenticate")
        if connect.ok is False:
            connect = Stage("connect", False, connect.detail)
    root = get("root")
    if record.root_delegation.method == "none" and root.ok is None and root.detail == "not reached":
        root = Stage("root", None, "no root delegation asked for")
    return PreflightReport(ip=ip, host_key=host_key, record_id=record.id, connect=connect,
                           authenticate=authenticate, root=root, collectors=get("collectors"),
                           host_key_fingerprint=check.host_key_fingerprint)
