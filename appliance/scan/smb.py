"""Authenticated Windows checks over SMB with NTLM (impacket), in a bounded thread pool.

:func:`check_windows` is the one entry point: it logs in to one host with one
``windows`` authentication record and returns a :class:`WindowsCheck` value.
One check, in order:

1. NEGOTIATE probes of its own (:mod:`appliance.scan.smbnegotiate`): which SMB
   dialects the server agrees to (SMB1 included) and whether it *requires*
   signing. A host that cannot be reached on port 445 ends here with
   ``auth.status`` ``error`` and the cause.
2. NTLM login with the record, trying ``record.protocols`` in order: NTLMv2,
   and NTLMv1 only when the record lists it. A password or an NT hash; a local
   account when ``domain`` is null.
3. With a session: whether the account is an administrator (``ADMIN$``), the
   shares and server facts (srvsvc), then the remote registry (winreg) for the
   product, build, UBR, architecture and installed updates (parsed by
   :mod:`appliance.scan.winversion`).
4. Network findings (:mod:`appliance.scan.winfindings`) from what was seen.

Outcomes map onto ``auth[].status`` exactly: ``success``; ``failed`` when the
server refused the credentials (STATUS_LOGON_FAILURE and its kin, or only a
guest session); ``error`` when something prevented a try (connection refused,
timeout, not SMB, NTLM blocked by policy, protocol failure), with the cause in
the message. What a server does not offer (no remote registry, values it does
not serve) goes to ``notes``, never to the auth status.

Every blocking call runs in the caller's thread pool with socket timeouts;
past ``timeout_s`` the check's sockets are shut down so the worker thread
returns, and the check reports what it had. Secrets never reach a message or
a log line: the record's password and NT hash are registered with the
console's scrubber, and no message is built from them.

NTLMv1: impacket's SMB2/3 login always builds NTLMv2 messages (its module flag
``USE_NTLMv2`` is read once, as a default argument, at import). For an NTLMv1
attempt the connection's SMB3 object is given a subclass whose ``login`` is
impacket's own code bound to a namespace in which the NTLMSSP type-1 and
type-3 builders are called with ``use_ntlmv2=False``. Nothing global changes,
so NTLMv2 checks running at the same time in other threads are unaffected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from impacket import nt_errors, ntlm, smb, smb3
from impacket.dcerpc.v5 import rrp, srvs, transport
from impacket.dcerpc.v5.rpcrt import DCERPCException
from impacket.nmb import NetBIOSError, NetBIOSTimeout
from impacket.smbconnection import SessionError, SMBConnection

from appliance.authrecords import WindowsRecord
from appliance.console import redact, register_secret
from appliance.results import AuthOutcome, Finding, HostResult, OsInfo
from appliance.scan import smbnegotiate as neg
from appliance.scan import winversion as wv
from appliance.scan.winfindings import SmbFacts, smb_findings

LOG = logging.getLogger("vsa.scan.smb")

SMB_PORT = 445
DEFAULT_TIMEOUT_S = 120.0  # a whole check; the registry walk of a real host takes seconds
IO_TIMEOUT_S = 10.0  # one connect or one read
SMB1_PROBE_TIMEOUT_S = 3.0  # an SMB2 server that ignores SMB1 answers nothing at all
ABORT_WAIT_S = 5.0  # after the sockets are shut down, how long the worker may take to return
PIPE_RETRY_DELAY_S = 1.0  # a trigger-started RemoteRegistry service needs a moment
MAX_CBS_PACKAGES = 20_000  # real hosts hold a few thousand; stop well before pathological keys
KEY_READ = 0x00020019

ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_NO_MORE_ITEMS = 259

STATUS_ACCESS_DENIED = 0xC0000022
STATUS_OBJECT_NAME_NOT_FOUND = 0xC0000034
STATUS_PIPE_NOT_AVAILABLE = 0xC00000AC
STATUS_BAD_NETWORK_NAME = 0xC00000CC

# Statuses meaning "the server refused these credentials": auth status failed.
REFUSED_STATUSES = frozenset({
    0xC000006D,  # STATUS_LOGON_FAILURE
    0xC000006A,  # STATUS_WRONG_PASSWORD
    0xC0000064,  # STATUS_NO_SUCH_USER
    0xC0000072,  # STATUS_ACCOUNT_DISABLED
    0xC0000234,  # STATUS_ACCOUNT_LOCKED_OUT
    0xC0000193,  # STATUS_ACCOUNT_EXPIRED
    0xC0000071,  # STATUS_PASSWORD_EXPIRED
    0xC0000224,  # STATUS_PASSWORD_MUST_CHANGE
    0xC000006E,  # STATUS_ACCOUNT_RESTRICTION
    0xC000006F,  # STATUS_INVALID_LOGON_HOURS
    0xC0000070,  # STATUS_INVALID_WORKSTATION
    0xC000015B,  # STATUS_LOGON_TYPE_NOT_GRANTED
    STATUS_ACCESS_DENIED,
})
# Statuses that prevent a try whatever the credentials, with the words to say it.
BLOCKING_STATUSES: dict[int, str] = {
    0xC0000418: "the server blocks NTLM by policy (STATUS_NTLM_BLOCKED)",
    0xC000005E: "the server could not reach a domain controller (STATUS_NO_LOGON_SERVERS)",
    0xC00002DD: "the server's trust with the domain failed (STATUS_TRUSTED_RELATIONSHIP_FAILURE)",
    0xC000018C: "the server's trust with the domain failed (STATUS_TRUSTED_DOMAIN_FAILURE)",
    0xC00000D0: "the server accepts no more sessions (STATUS_REQUEST_NOT_ACCEPTED)",
}

NtlmProtocol = Literal["ntlmv2", "ntlmv1"]
PROTOCOL_NAMES: dict[str, str] = {"ntlmv2": "NTLMv2", "ntlmv1": "NTLMv1"}
SV_TYPE_SERVER_UNIX = 0x00000800  # srvsvc server type bit Samba sets
SHARE_TYPES = {0: "disk", 1: "printer", 2: "device", 3: "ipc"}
STYPE_SPECIAL = 0x80000000

T = TypeVar("T")


# ---- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """One share the server lists (srvsvc NetrShareEnum level 1)."""

    name: str
    type: str  # disk, printer, device, ipc
    special: bool = False  # administrative share (C$, ADMIN$, IPC$)
    remark: str | None = None


@dataclass(frozen=True)
class ServerIdentity:
    """What the server says of itself: NTLM target info, NTLM version, srvsvc facts."""

    netbios_name: str | None = None
    netbios_domain: str | None = None
    dns_domain: str | None = None
    dns_hostname: str | None = None
    ntlm_version: tuple[int, int, int] | None = None  # major, minor, build
    server_type: int | None = None  # srvsvc sv101_type
    comment: str | None = None  # srvsvc sv101_comment ("Samba 4.17.12-Debian")

    @property
    def is_samba(self) -> bool:
        """Whether srvsvc marks the server as a Unix (Samba) server."""
        return self.server_type is not None and bool(self.server_type & SV_TYPE_SERVER_UNIX)


@dataclass(frozen=True)
class LoginAttempt:
    """One NTLM login attempt with one protocol."""

    protocol: NtlmProtocol
    outcome: Literal["success", "guest", "refused", "error"]
    status: str | None = None  # NT status name, when the server answered with one
    detail: str = ""


@dataclass(frozen=True)
class WindowsCheck:
    """Everything one authenticated Windows check learnt of one host with one record."""

    ip: str
    auth: AuthOutcome
    os: OsInfo | None = None
    protocol: NtlmProtocol | None = None  # the protocol that logged in
    attempts: tuple[LoginAttempt, ...] = ()
    dialects: tuple[str, ...] = ()  # agreed dialects, "1.0" for SMB1, low to high
    smb1_enabled: bool | None = None  # None: not learnt
    signing_required: bool | None = None  # on every agreed dialect; None: not learnt
    shares: tuple[Share, ...] | None = None  # None: not learnt
    server: ServerIdentity = ServerIdentity()
    windows: wv.WindowsVersion | None = None  # from the remote registry
    updates: tuple[wv.InstalledUpdate, ...] | None = None  # None: not learnt
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()  # what the server does not offer (not failures)
    errors: tuple[str, ...] = ()  # what went wrong after the login decision
    elapsed_ms: float = 0.0

    def host_errors(self) -> list[str]:
        """Lines for HostResult ``errors``: this check's errors, then its notes."""
        return [f"smb: {e}" for e in self.errors] + [f"smb: {n}" for n in self.notes]

    def apply_to(self, result: HostResult) -> None:
        """Add this check's auth entry, findings, errors/notes and (if none yet) OS to ``result``.

        Several windows records may apply to one host: each adds its auth entry,
        but a network finding or a line already in ``result`` is not added twice.
        """
        result.auth.append(self.auth)
        if result.os is None and self.os is not None:
            result.os = self.os
        known = {(f.id, f.source) for f in result.findings}
        result.findings.extend(f for f in self.findings if (f.id, f.source) not in known)
        result.errors.extend(line for line in self.host_errors() if line not in result.errors)


@dataclass(frozen=True)
class RegistryPaths:
    """Where the registry facts are read (Windows' own keys by default)."""

    current_version: str = wv.CURRENT_VERSION_KEY
    cbs_packages: str = wv.CBS_PACKAGES_KEY
    environment: str = wv.ENVIRONMENT_KEY


# ---- pure helpers ---------------------------------------------------------------------


def status_name(code: int) -> str:
    """An NT status code's name (``STATUS_LOGON_FAILURE``), or its hex form."""
    entry = nt_errors.ERROR_MESSAGES.get(code)
    return entry[0] if entry else f"NTSTATUS {code:#010x}"


def classify_status(code: int) -> tuple[Literal["refused", "error"], str]:
    """Whether a session-setup status refuses the credentials or prevents a try, in words."""
    if code in REFUSED_STATUSES:
        return "refused", status_name(code)
    if code in BLOCKING_STATUSES:
        return "error", BLOCKING_STATUSES[code]
    return "error", f"session setup failed with {status_name(code)}"


def network_cause(exc: BaseException, ip: str, port: int) -> str:
    """What a socket-level failure means, in an operator's words."""
    inner = exc.args[1] if isinstance(exc, OSError) and len(exc.args) > 1 and isinstance(exc.args[1], BaseException) else exc
    where = f"{ip}:{port}"
    if isinstance(inner, ConnectionRefusedError):
        return f"connection refused on {where} (no SMB service listening)"
    if isinstance(inner, (socket.timeout, TimeoutError, NetBIOSTimeout)):
        return f"no answer from {where} within the timeout"
    if isinstance(inner, ConnectionResetError):
        return f"{where} reset the connection"
    if isinstance(inner, OSError) and inner.strerror:
        return f"cannot reach {where}: {inner.strerror}"
    return f"protocol failure talking to {where}: {type(inner).__name__}: {inner}"


def decide_auth(record: WindowsRecord, attempts: tuple[LoginAttempt, ...], *, privileged: bool,
                who: str) -> AuthOutcome:
    """The record's AuthOutcome from its login attempts (in the order they were made)."""
    def status_of(a: LoginAttempt) -> str:
        return f"{PROTOCOL_NAMES[a.protocol]}: {a.status or a.detail}"

    success = next((a for a in attempts if a.outcome == "success"), None)
    if success is not None:
        message = f"{PROTOCOL_NAMES[success.protocol]} login as {who} accepted"
        if privileged:
            message += " (administrator: ADMIN$ reachable)"
        earlier = [status_of(a) for a in attempts if a is not success]
        if earlier:
            message += "; refused first: " + ", ".join(earlier)
        return AuthOutcome(record_id=record.id, type="windows", status="success",
                           privileged=privileged, message=message)
    refusals = [a for a in attempts if a.outcome in ("refused", "guest")]
    if refusals:
        message = f"credentials for {who} refused (" + "; ".join(
            status_of(a) if a.outcome == "refused" else f"{PROTOCOL_NAMES[a.protocol]}: {a.detail}"
            for a in attempts) + ")"
        if all(a.protocol == "ntlmv1" for a in refusals) and "ntlmv2" not in record.protocols:
            # On the wire a server that refuses NTLMv1 says exactly what it says
            # for a wrong password; only the record's own NTLMv2 could tell them apart.
            message += ("; a server that refuses NTLMv1 answers the same way (Windows LAN Manager "
                        "authentication level 5, Samba 'ntlm auth = ntlmv2-only'): list ntlmv2 in "
                        "the record's protocols to tell them apart")
        return AuthOutcome(record_id=record.id, type="windows", status="failed", message=message)
    cause = attempts[-1].detail if attempts else "no login was attempted"
    return AuthOutcome(record_id=record.id, type="windows", status="error",
                       message=f"could not try the credentials: {cause}")


def account_label(record: WindowsRecord) -> str:
    """``DOMAIN\\user``, or ``user (local account)``."""
    return f"{record.domain}\\{record.username}" if record.domain else f"{record.username} (local account)"


def os_from(server: ServerIdentity, version: wv.WindowsVersion | None, arch: str | None) -> tuple[OsInfo | None, str | None]:
    """The host's OsInfo from what SMB taught, and a note when SMB's own claim is not believable."""
    if server.is_samba:
        samba_version = None
        if server.comment and server.comment.lower().startswith("samba "):
            samba_version = server.comment.split(None, 1)[1]
        note = None
        if server.ntlm_version is not None:
            major, minor, build = server.ntlm_version
            note = (f"the server is Samba (srvsvc type SV_TYPE_SERVER_UNIX); it reports "
                    f"Windows {major}.{minor} Build {build} over SMB, which is not its OS")
        return OsInfo(family="unix", name="Samba", version=samba_version, source="smb"), note
    if version is not None and not version.empty:
        return OsInfo(family="windows", name=version.product_name or "Windows", version=version.version,
                      arch=arch, source="smb"), None
    if server.ntlm_version is not None:
        major, minor, build = server.ntlm_version
        if build == 0:
            # No Windows release has build 0; Samba says "Windows 6.1 Build 0".
            return None, f"SMB reports Windows {major}.{minor} Build 0, which no Windows release reports (Samba does)"
        return OsInfo(family="windows", name="Windows", version=f"{major}.{minor}.{build}",
                      arch=arch, source="smb"), None
    return None, None


# ---- NTLMv1 through impacket's own login code ----------------------------------------


class _NtlmV1Builders:
    """impacket's ``ntlm`` module as impacket's SMB3 login sees it, building NTLMv1 messages."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ntlm, name)

    @staticmethod
    def getNTLMSSPType1(workstation: str = "", domain: str = "", signingRequired: bool = False,  # noqa: N802,N803 - impacket's names
                        use_ntlmv2: bool = True, version: Any = None) -> Any:
        return ntlm.getNTLMSSPType1(workstation, domain, signingRequired, use_ntlmv2=False, version=version)

    @staticmethod
    def getNTLMSSPType3(type1: Any, type2: bytes, user: str, password: str, domain: str,  # noqa: N802
                        lmhash: Any = "", nthash: Any = "", use_ntlmv2: bool = True, **kwargs: Any) -> Any:
        return ntlm.getNTLMSSPType3(type1, type2, user, password, domain, lmhash, nthash,
                                    use_ntlmv2=False, **kwargs)


def _rebind_ntlm(function: Callable[..., Any]) -> Callable[..., Any] | None:
    """A copy of ``function`` whose global ``ntlm`` builds NTLMv1 messages (None if impossible)."""
    code = getattr(function, "__code__", None)
    if code is None or "ntlm" not in code.co_names or function.__closure__:
        return None
    namespace = dict(function.__globals__)
    namespace["ntlm"] = _NtlmV1Builders()
    clone = types.FunctionType(code, namespace, function.__name__, function.__defaults__)
    clone.__kwdefaults__ = function.__kwdefaults__
    return clone


_SMB3_LOGIN_V1 = _rebind_ntlm(smb3.SMB3.login)


class _Smb3NtlmV1(smb3.SMB3):
    """impacket's SMB2/3 client with an NTLMv1 login (same code, NTLMv1 builders)."""

    if _SMB3_LOGIN_V1 is not None:
        login = _SMB3_LOGIN_V1


class _Smb1NtlmV1(smb.SMB):
    """impacket's SMB1 client with an NTLMv1-only login (its own ``use_ntlmv2`` switch)."""

    def login(self, user: str, password: str, domain: str = "", lmhash: str = "", nthash: str = "",
              ntlm_fallback: bool = True) -> Any:
        return self.login_extended(user, password, domain, lmhash, nthash, use_ntlmv2=False)


def ntlmv1_available() -> bool:
    """Whether this impacket's SMB2/3 login could be rebound to NTLMv1."""
    return _SMB3_LOGIN_V1 is not None


def _force_ntlmv1(conn: SMBConnection) -> None:
    server = conn.getSMBServer()
    if isinstance(server, smb3.SMB3):
        if _SMB3_LOGIN_V1 is None:
            raise _CannotTry("this impacket version cannot be made to send NTLMv1 over SMB2/3")
        server.__class__ = _Smb3NtlmV1
    elif isinstance(server, smb.SMB):
        server.__class__ = _Smb1NtlmV1


# ---- the worker -----------------------------------------------------------------------


class _Aborted(Exception):
    """The check's deadline passed or the caller gave up."""


class _CannotTry(Exception):
    """Something prevents a login attempt (the message says what)."""


class _Aborter:
    """Shuts down a check's sockets from another thread, so a blocked read returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.aborted = False

    def track(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if self.aborted:
                _shutdown(sock)

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # An already closed socket is what we want anyway.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _conn_socket(conn: SMBConnection) -> socket.socket | None:
    with contextlib.suppress(AttributeError):
        session = conn.getNMBServer()
        if session:
            return session.get_socket()  # type: ignore[no-any-return]
    with contextlib.suppress(AttributeError):
        return conn.getSMBServer().get_socket()  # type: ignore[no-any-return]
    return None


class _CheckRun:
    """The state of one check while its worker thread runs it."""

    def __init__(self, ip: str, record: WindowsRecord, *, port: int, timeout_s: float,
                 aborter: _Aborter, paths: RegistryPaths) -> None:
        self.ip, self.record, self.port, self.paths = ip, record, port, paths
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.aborter = aborter
        self.notes: list[str] = []
        self.errors: list[str] = []
        self.attempts: list[LoginAttempt] = []
        self.smb2: dict[str, neg.Smb2Negotiation] = {}
        self.smb1: neg.Smb1Negotiation | None = None
        self.reach_error: str | None = None
        self.conn: SMBConnection | None = None
        self.protocol: NtlmProtocol | None = None
        self.privileged = False
        self.shares: tuple[Share, ...] | None = None
        self.server = ServerIdentity()
        self.values: dict[str, wv.RegValue] = {}
        self.arch: str | None = None
        self.package_states: dict[str, int | None] | None = None

    # -- time --

    def io_timeout(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or self.aborter.aborted:
            raise _Aborted()
        return min(IO_TIMEOUT_S, remaining)

    # -- 1. negotiate probes --

    def exchange(self, payload: bytes, *, timeout_s: float | None = None) -> bytes:
        """Send one framed message on a fresh connection and read one framed answer."""
        timeout = min(self.io_timeout(), timeout_s or IO_TIMEOUT_S)
        with socket.create_connection((self.ip, self.port), timeout=timeout) as sock:
            self.aborter.track(sock)
            sock.sendall(payload)
            length = neg.frame_length(_recv_exact(sock, 4))
            if length > neg.MAX_FRAME_BYTES:
                raise neg.NegotiateParseError(f"a {length}-byte answer to NEGOTIATE")
            return _recv_exact(sock, length)

    def probe(self) -> None:
        guid, salt = uuid.uuid4().bytes, uuid.uuid4().bytes * 2
        offer_all = neg.build_smb2_negotiate(tuple(neg.SMB2_DIALECTS), client_guid=guid, salt=salt)
        try:
            best = neg.parse_smb2_negotiate_response(self.exchange(offer_all))
        except (ConnectionResetError, EOFError, neg.NegotiateParseError) as exc:
            best = None  # a server without SMB2 may drop or answer in SMB1: try SMB1 below
            LOG.debug("%s: no SMB2 answer: %s", self.ip, exc)
        except OSError as exc:
            self.reach_error = network_cause(exc, self.ip, self.port)
            return
        if best is not None and best.accepted and best.dialect is not None:
            self.smb2[neg.SMB2_DIALECTS[best.dialect]] = best
            for dialect, name in neg.SMB2_DIALECTS.items():
                if dialect >= best.dialect:
                    continue
                try:
                    answer = neg.parse_smb2_negotiate_response(self.exchange(
                        neg.build_smb2_negotiate((dialect,), client_guid=guid, salt=salt)))
                except (OSError, EOFError, neg.NegotiateParseError) as exc:
                    self.errors.append(f"NEGOTIATE probe for SMB {name} failed: {network_cause(exc, self.ip, self.port)}")
                    continue
                if answer.accepted:
                    self.smb2[name] = answer
        # A server that already answered SMB2 and ignores SMB1 must not stall the check.
        smb1_timeout = SMB1_PROBE_TIMEOUT_S if self.smb2 else None
        try:
            answer1 = neg.parse_smb1_negotiate_response(
                self.exchange(neg.build_smb1_negotiate(), timeout_s=smb1_timeout))
            self.smb1 = answer1 if isinstance(answer1, neg.Smb1Negotiation) else neg.Smb1Negotiation(status=answer1.status)
        except (ConnectionResetError, EOFError, neg.NegotiateParseError):
            self.smb1 = neg.Smb1Negotiation(status=-1)  # dropped: Windows' way of saying no SMB1
        except TimeoutError:
            if not self.smb2:
                self.reach_error = network_cause(TimeoutError(), self.ip, self.port)
                return
            self.smb1 = neg.Smb1Negotiation(status=-1)  # no answer to SMB1 from an SMB2 server: no SMB1
        except OSError as exc:
            self.errors.append(f"SMB1 NEGOTIATE probe failed: {network_cause(exc, self.ip, self.port)}")
        if not self.smb2 and not (self.smb1 and self.smb1.accepted):
            self.reach_error = f"{self.ip}:{self.port} does not speak SMB (no NEGOTIATE answer)"

    def dialects(self) -> tuple[str, ...]:
        names = ([neg.SMB1_NAME] if self.smb1 is not None and self.smb1.accepted else [])
        return tuple(names + [n for n in neg.SMB2_DIALECTS.values() if n in self.smb2])

    def signing_by_dialect(self) -> dict[str, bool]:
        required = {name: answer.signing_required for name, answer in self.smb2.items()}
        if self.smb1 is not None and self.smb1.accepted:
            required[neg.SMB1_NAME] = self.smb1.signing_required
        return required

    # -- 2. login --

    def login(self) -> None:
        for protocol in self.record.protocols:
            attempt, conn = self.attempt(protocol)
            self.attempts.append(attempt)
            if attempt.outcome == "success":
                self.conn, self.protocol = conn, protocol
                return
            if conn is not None:
                _close(conn)
            if attempt.outcome in ("error", "guest"):
                return  # the next protocol would meet the same obstacle

    def attempt(self, protocol: NtlmProtocol) -> tuple[LoginAttempt, SMBConnection | None]:
        conn: SMBConnection | None = None
        try:
            conn = SMBConnection(self.ip, self.ip, sess_port=self.port, timeout=self.io_timeout())
            self.aborter.track(_conn_socket(conn))
            if protocol == "ntlmv1":
                _force_ntlmv1(conn)
            conn.login(self.record.username, self.record.password or "", self.record.domain or "",
                       lmhash="", nthash=self.record.nt_hash or "", ntlmFallback=False)
        except SessionError as exc:
            self.remember_identity(conn)
            kind, words = classify_status(exc.getErrorCode())
            status = status_name(exc.getErrorCode())
            return LoginAttempt(protocol, kind, status=status, detail=words), conn
        except _CannotTry as exc:
            return LoginAttempt(protocol, "error", detail=str(exc)), conn
        except (OSError, NetBIOSError, NetBIOSTimeout, EOFError) as exc:
            if self.aborter.aborted or time.monotonic() >= self.deadline:
                raise _Aborted() from exc
            return LoginAttempt(protocol, "error", detail=network_cause(exc, self.ip, self.port)), conn
        except _Aborted:
            raise
        except Exception as exc:  # impacket raises bare Exception for malformed answers
            return LoginAttempt(protocol, "error", detail=redact(
                f"protocol failure during login: {type(exc).__name__}: {exc}")), conn
        self.remember_identity(conn)
        if conn.isGuestSession():
            return LoginAttempt(protocol, "guest", status="guest session",
                                detail="the server answered with a guest session"), conn
        return LoginAttempt(protocol, "success"), conn

    def remember_identity(self, conn: SMBConnection | None) -> None:
        """Keep what the NTLM challenge said of the server (also after a refused login)."""
        if conn is None:
            return
        with contextlib.suppress(Exception):  # best effort: older answers lack some fields
            major, minor, build = conn.getServerOSMajor(), conn.getServerOSMinor(), conn.getServerOSBuild()
            version = (int(major), int(minor), int(build)) if major is not None and major != "" else None
            name = conn.getServerName() or None
            self.server = replace(
                self.server, netbios_name=name,
                netbios_domain=conn.getServerDomain() or name,
                dns_domain=conn.getServerDNSDomainName() or None,
                dns_hostname=conn.getServerDNSHostName() or None,
                ntlm_version=version or self.server.ntlm_version,
            )

    # -- 3. with a session --

    def inspect(self) -> None:
        assert self.conn is not None
        self.privileged = self.step("ADMIN$ check", self.admin_share) or False
        self.step("srvsvc", self.read_srvsvc)
        self.step("remote registry", self.read_registry)

    def step(self, what: str, action: Callable[[], T]) -> T | None:
        """Run one inspection step; a failure becomes an error line, not a failed check."""
        try:
            return action()
        except _Aborted:
            raise
        except (OSError, NetBIOSError, NetBIOSTimeout) as exc:
            if self.aborter.aborted or time.monotonic() >= self.deadline:
                raise _Aborted() from exc
            self.errors.append(f"{what}: {network_cause(exc, self.ip, self.port)}")
        except SessionError as exc:
            self.errors.append(f"{what}: {status_name(exc.getErrorCode())}")
        except DCERPCException as exc:
            self.errors.append(redact(f"{what}: {exc}"))
        except Exception as exc:  # impacket raises bare Exception for malformed answers
            self.errors.append(redact(f"{what}: {type(exc).__name__}: {exc}"))
        return None

    def admin_share(self) -> bool:
        assert self.conn is not None
        self.conn.setTimeout(self.io_timeout())
        try:
            tree = self.conn.connectTree("ADMIN$")
        except SessionError as exc:
            if exc.getErrorCode() in (STATUS_ACCESS_DENIED, STATUS_BAD_NETWORK_NAME):
                return False
            raise
        with contextlib.suppress(SessionError):
            self.conn.disconnectTree(tree)
        return True

    def rpc(self, pipe: str, interface: bytes) -> Any:
        """A bound DCE/RPC handle on a named pipe of the session."""
        assert self.conn is not None
        self.conn.setTimeout(self.io_timeout())
        rpc_transport = transport.SMBTransport(self.ip, self.port, filename=pipe, smb_connection=self.conn)
        dce = rpc_transport.get_dce_rpc()
        dce.connect()
        dce.bind(interface)
        return dce

    def read_srvsvc(self) -> None:
        dce = self.rpc(r"\srvsvc", srvs.MSRPC_UUID_SRVS)
        try:
            entries = srvs.hNetrShareEnum(dce, 1, serverName=f"\\\\{self.ip}")["InfoStruct"]["ShareInfo"]["Level1"]["Buffer"]
            self.shares = tuple(
                Share(name=_rpc_text(e["shi1_netname"]) or "?",
                      type=SHARE_TYPES.get(int(e["shi1_type"]) & 0xFF, "other"),
                      special=bool(int(e["shi1_type"]) & STYPE_SPECIAL) or (_rpc_text(e["shi1_netname"]) or "").endswith("$"),
                      remark=_rpc_text(e["shi1_remark"]))
                for e in entries)
            try:
                info = srvs.hNetrServerGetInfo(dce, 101)["InfoStruct"]["ServerInfo101"]
            except DCERPCException as exc:
                self.notes.append(f"srvsvc: server information not served ({exc})")
            else:
                self.server = replace(self.server, server_type=int(info["sv101_type"]),
                                      comment=_rpc_text(info["sv101_comment"]))
        finally:
            _disconnect(dce)

    def read_registry(self) -> None:
        try:
            dce = self.rpc(r"\winreg", rrp.MSRPC_UUID_RRP)
        except SessionError as exc:
            code = exc.getErrorCode()
            if code == STATUS_PIPE_NOT_AVAILABLE:
                time.sleep(min(PIPE_RETRY_DELAY_S, self.io_timeout()))
                try:
                    dce = self.rpc(r"\winreg", rrp.MSRPC_UUID_RRP)
                except SessionError as again:
                    code = again.getErrorCode()
                else:
                    code = 0
            if code == STATUS_OBJECT_NAME_NOT_FOUND or code == STATUS_PIPE_NOT_AVAILABLE:
                self.notes.append("remote registry: not offered (no \\winreg pipe: the RemoteRegistry "
                                  "service is stopped or disabled); product, build and updates unknown")
                return
            if code == STATUS_ACCESS_DENIED:
                self.notes.append("remote registry: access to \\winreg denied for this account; "
                                  "product, build and updates unknown")
                return
            if code:
                raise
        try:
            try:
                hklm = rrp.hOpenLocalMachine(dce)["phKey"]
            except rrp.DCERPCSessionError as exc:
                self.notes.append(f"remote registry: HKLM not opened ({_werr(exc)})")
                return
            self.read_current_version(dce, hklm)
            self.read_architecture(dce, hklm)
            self.read_packages(dce, hklm)
        finally:
            _disconnect(dce)

    def open_key(self, dce: Any, root: Any, path: str, what: str) -> Any | None:
        self.io_timeout()
        try:
            return rrp.hBaseRegOpenKey(dce, root, path, samDesired=KEY_READ)["phkResult"]
        except rrp.DCERPCSessionError as exc:
            self.notes.append(f"remote registry: {what} not served (HKLM\\{path}: {_werr(exc)})")
            return None

    def query(self, dce: Any, key: Any, name: str) -> wv.RegValue | None:
        """One value, or None when the server does not serve it (any other error raises)."""
        self.io_timeout()
        try:
            return rrp.hBaseRegQueryValue(dce, key, name)  # type: ignore[no-any-return]
        except rrp.DCERPCSessionError as exc:
            if exc.get_error_code() in (ERROR_FILE_NOT_FOUND, ERROR_ACCESS_DENIED):
                return None
            raise

    def read_current_version(self, dce: Any, hklm: Any) -> None:
        key = self.open_key(dce, hklm, self.paths.current_version, "Windows version key")
        if key is None:
            return
        try:
            for name in wv.CURRENT_VERSION_VALUES:
                value = self.query(dce, key, name)
                if value is not None:
                    self.values[name] = value
        finally:
            _close_key(dce, key)
        missing = [n for n in ("ProductName", "CurrentBuildNumber", "UBR") if n not in self.values]
        if "CurrentBuildNumber" in missing and "CurrentBuild" in self.values:
            missing.remove("CurrentBuildNumber")
        if missing:
            served = ", ".join(sorted(self.values)) or "nothing"
            self.notes.append(f"remote registry: {', '.join(missing)} not served by "
                              f"HKLM\\{self.paths.current_version} (it serves {served})")

    def read_architecture(self, dce: Any, hklm: Any) -> None:
        key = self.open_key(dce, hklm, self.paths.environment, "processor architecture")
        if key is None:
            return
        try:
            value = self.query(dce, key, wv.ARCH_VALUE)
        finally:
            _close_key(dce, key)
        self.arch = wv.architecture(value)
        if value is None:
            self.notes.append(f"remote registry: {wv.ARCH_VALUE} not served")

    def read_packages(self, dce: Any, hklm: Any) -> None:
        key = self.open_key(dce, hklm, self.paths.cbs_packages, "installed updates (CBS packages)")
        if key is None:
            return
        names: list[str] = []
        try:
            while len(names) < MAX_CBS_PACKAGES:
                self.io_timeout()
                try:
                    names.append(_rpc_text(rrp.hBaseRegEnumKey(dce, key, len(names))["lpNameOut"]) or "")
                except rrp.DCERPCSessionError as exc:
                    if exc.get_error_code() == ERROR_NO_MORE_ITEMS:
                        break
                    raise
            else:
                self.notes.append(f"remote registry: stopped listing CBS packages at {MAX_CBS_PACKAGES}")
            wanted = list(wv.kb_packages(names).values()) + list(wv.rollup_packages(names))
            states: dict[str, int | None] = dict.fromkeys(names)
            for package in wanted:
                sub = self.open_key(dce, key, package, f"package {package}")
                if sub is not None:
                    # Not closed one by one: each close is a round trip, and the
                    # server frees every handle of the pipe when it is closed.
                    states[package] = wv.reg_int(self.query(dce, sub, "CurrentState"))
            self.package_states = states
        finally:
            _close_key(dce, key)

    # -- 4. the result --

    def result(self, elapsed_ms: float) -> WindowsCheck:
        who = account_label(self.record)
        if self.reach_error is not None and not self.attempts:
            auth = AuthOutcome(record_id=self.record.id, type="windows", status="error",
                               message=f"could not try the credentials: {self.reach_error}")
        elif not self.attempts:
            auth = AuthOutcome(record_id=self.record.id, type="windows", status="error",
                               message=f"could not try the credentials: the check stopped after {self.timeout_s:g} s")
        else:
            auth = decide_auth(self.record, tuple(self.attempts), privileged=self.privileged, who=who)
        if auth.status == "success" and self.record.domain:
            domain_note = self.domain_note()
            if domain_note:
                self.notes.append(domain_note)
        windows = wv.parse_current_version(self.values) if self.values else None
        updates = None
        if self.package_states is not None:
            updates = wv.parse_updates(self.package_states)
            rollup = wv.latest_rollup(self.package_states)
            if windows is not None and windows.ubr is None and rollup is not None:
                windows = replace(windows, ubr=rollup[1])
        os_info, os_note = os_from(self.server, windows, self.arch)
        if os_note:
            self.notes.append(os_note)
        dialects = self.dialects()
        signing = self.signing_by_dialect()
        facts = SmbFacts(
            dialects=dialects, signing_required=signing,
            ntlmv1_accepted=self.protocol == "ntlmv1",
            guest_fallback=any(a.outcome == "guest" for a in self.attempts),
        )
        return WindowsCheck(
            ip=self.ip, auth=auth, os=os_info, protocol=self.protocol, attempts=tuple(self.attempts),
            dialects=dialects,
            smb1_enabled=(self.smb1.accepted if self.smb1 is not None else None),
            signing_required=(all(signing.values()) if signing else None),
            shares=self.shares, server=self.server, windows=windows, updates=updates,
            findings=tuple(smb_findings(facts)), notes=tuple(redact(n) for n in self.notes),
            errors=tuple(redact(e) for e in self.errors), elapsed_ms=round(elapsed_ms, 1),
        )

    def domain_note(self) -> str | None:
        """Say so when a domain login was taken as a local account by a standalone server."""
        domain = (self.record.domain or "").upper()
        server = self.server
        known = {d.upper() for d in (server.netbios_domain, server.dns_domain) if d}
        if domain in known or (server.dns_domain and domain == server.dns_domain.split(".")[0].upper()):
            return None
        if server.netbios_domain and server.netbios_name and server.netbios_domain.upper() == server.netbios_name.upper():
            return (f"the server is standalone (its NTLM domain is its own name, {server.netbios_name}): "
                    f"it accepted {self.record.domain}\\{self.record.username} as its local account")
        return (f"the server reports domain {server.netbios_domain or '(none)'}, not {self.record.domain}: "
                "the login was accepted by a trust or as a local account")

    def close(self) -> None:
        if self.conn is not None:
            _close(self.conn, logoff=True)
            self.conn = None


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data


def _rpc_text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).split("\x00", 1)[0].strip()
    return text or None


def _werr(exc: DCERPCException) -> str:
    code = exc.get_error_code() if hasattr(exc, "get_error_code") else None
    if code == ERROR_FILE_NOT_FOUND:
        return "not found"
    if code == ERROR_ACCESS_DENIED:
        return "access denied"
    return str(exc)


def _close_key(dce: Any, key: Any) -> None:
    # Closing a handle is courtesy; the server frees it with the pipe anyway.
    with contextlib.suppress(DCERPCException, OSError, NetBIOSError, SessionError):
        rrp.hBaseRegCloseKey(dce, key)


def _disconnect(dce: Any) -> None:
    with contextlib.suppress(DCERPCException, OSError, NetBIOSError, SessionError):
        dce.disconnect()


def _close(conn: SMBConnection, *, logoff: bool = False) -> None:
    # Errors while hanging up change nothing in the result.
    if logoff:
        with contextlib.suppress(Exception):
            conn.logoff()
    with contextlib.suppress(Exception):
        conn.close()


def _run_check(ip: str, record: WindowsRecord, *, port: int, timeout_s: float, aborter: _Aborter,
               paths: RegistryPaths) -> WindowsCheck:
    """The whole check, in the calling (pool) thread; never raises."""
    started = time.monotonic()
    run = _CheckRun(ip, record, port=port, timeout_s=timeout_s, aborter=aborter, paths=paths)
    try:
        run.probe()
        if run.reach_error is None:
            run.login()
            if run.conn is not None:
                run.inspect()
    except _Aborted:
        run.errors.append(f"the check stopped after {timeout_s:g} s (timeout); results are partial")
    except Exception as exc:  # a failure not foreseen above must not lose the host's other results
        LOG.debug("%s: SMB check failed", ip, exc_info=True)
        run.errors.append(redact(f"internal error in the SMB check: {type(exc).__name__}: {exc}"))
    finally:
        run.close()
    return run.result((time.monotonic() - started) * 1000)


# ---- the entry point ------------------------------------------------------------------


async def check_windows(
    ip: str,
    record: WindowsRecord,
    *,
    executor: concurrent.futures.ThreadPoolExecutor,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    port: int = SMB_PORT,
    registry_paths: RegistryPaths | None = None,
) -> WindowsCheck:
    """Run one authenticated Windows check of ``ip`` with ``record`` in ``executor``.

    Never raises for anything the host does: every outcome is a :class:`WindowsCheck`
    whose ``auth`` is the record's HostResult ``auth[]`` entry. ``timeout_s`` bounds
    the check from the moment a pool thread picks it up (time queued for a thread
    is the caller's to bound); past it the check's sockets are shut down and what
    was learnt so far is returned. Cancelling the coroutine aborts the check.
    ``registry_paths`` changes where registry facts are read (tests use keys of
    their own; the defaults are Windows' keys).
    """
    register_secret(record.password)
    register_secret(record.nt_hash)
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    aborter = _Aborter()
    paths = registry_paths or RegistryPaths()

    def work() -> WindowsCheck:
        loop.call_soon_threadsafe(_resolve, started)
        return _run_check(ip, record, port=port, timeout_s=timeout_s, aborter=aborter, paths=paths)

    LOG.debug("%s: SMB check with record %s", ip, record.id)
    cfuture = executor.submit(work)
    future = asyncio.wrap_future(cfuture, loop=loop)
    try:
        first: set[asyncio.Future[Any]] = {started, future}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        done, _ = await asyncio.wait({future}, timeout=timeout_s + ABORT_WAIT_S)
        if future in done:
            return future.result()
        # The worker is stuck past its own deadline: free it, then give it a moment.
        aborter.abort()
        done, _ = await asyncio.wait({future}, timeout=ABORT_WAIT_S)
        if future in done:
            return future.result()
        return WindowsCheck(
            ip=ip,
            auth=AuthOutcome(record_id=record.id, type="windows", status="error",
                             message=f"could not try the credentials: the check did not finish within {timeout_s:g} s"),
            errors=(f"the SMB check of {ip} did not return within {timeout_s + 2 * ABORT_WAIT_S:g} s",),
        )
    except asyncio.CancelledError:
        cfuture.cancel()
        aborter.abort()
        raise
    finally:
        if not started.done():
            started.cancel()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


__all__ = [
    "DEFAULT_TIMEOUT_S", "SMB_PORT", "LoginAttempt", "RegistryPaths", "ServerIdentity", "Share",
    "WindowsCheck", "check_windows", "classify_status", "decide_auth", "network_cause",
    "ntlmv1_available", "os_from", "status_name",
]
