"""A contained network lab built from Linux network namespaces.

Layout (LAB-NOTES.md, Network namespaces): a *hub* namespace holds a bridge
``br0`` with the scanner's address (``.1`` of the lab subnet) and runs the
scanner and every lab service on its own loopback; each *target* namespace is
joined to the bridge by a veth pair. There are no default routes and no link
to the root namespace, so no probe can leave the lab.

Every lab names its namespaces with a prefix of its own (PID and a random
suffix) and deletes only those, even when the test fails.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SUBNET = "10.77.0.0/24"
CLONE_NEWNET = 0x40000000  # from <sched.h>
NETNS_ETC = Path("/etc/netns")


class LabError(RuntimeError):
    """The lab could not be built (not root, no iproute2, a command failed)."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def lab_available() -> str | None:
    """None when namespaces can be built here, else the reason why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    return None


def enter_netns(netns: str) -> None:
    """Move the calling thread into the named network namespace (``/run/netns/NAME``).

    Sockets the thread opens afterwards live there: in-process tests use this to
    send their probes from inside the lab, never from the root namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise LabError(f"setns({netns}) failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def netns_executor(netns: str, max_workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A bounded thread pool whose every thread lives in ``netns``."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=max_workers,
        thread_name_prefix=f"ns-{netns}",
        initializer=enter_netns,
        initargs=(netns,),
    )


@dataclass
class Host:
    """One target namespace on the lab bridge."""

    name: str  # short name, e.g. "t1"
    netns: str  # full namespace name
    ip: str
    mac: str | None = None

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class NetnsLab:
    """A hub namespace with a bridge, and target namespaces joined to it.

    Use as a context manager; :meth:`close` kills the processes started
    through :meth:`popen` and deletes every namespace this lab created.
    """

    subnet: str = DEFAULT_SUBNET
    prefix: str = field(default_factory=lambda: f"vsa{os.getpid()}{secrets.token_hex(2)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _etc_dirs: list[Path] = field(default_factory=list)
    _next_index: int = 2
    _closed: bool = False

    # ---- building ---------------------------------------------------------------

    def __post_init__(self) -> None:
        self.network = ipaddress.ip_network(self.subnet)
        self.hub = f"{self.prefix}-hub"
        self.scanner_ip = str(self.network.network_address + 1)

    def __enter__(self) -> NetnsLab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        """Create the hub namespace with its bridge and loopback."""
        reason = lab_available()
        if reason:
            raise LabError(reason)
        atexit.register(self.close)
        self._add_netns(self.hub)
        self.hub_run("ip", "link", "set", "lo", "up")
        self.hub_run("ip", "link", "add", "br0", "type", "bridge")
        self.hub_run(
            "ip", "addr", "add", f"{self.scanner_ip}/{self.network.prefixlen}", "dev", "br0"
        )
        self.hub_run("ip", "link", "set", "br0", "up")
        # New namespaces have bridge netfilter on; frames between ports must
        # not pass through iptables (LAB-NOTES.md).
        for name in (
            "bridge-nf-call-iptables",
            "bridge-nf-call-ip6tables",
            "bridge-nf-call-arptables",
        ):
            if Path(f"/proc/sys/net/bridge/{name}").exists():
                self.hub_run("sysctl", "-qw", f"net.bridge.{name}=0", check=False)

    def add_host(self, name: str, ip: str | None = None, *, hostname: str | None = None) -> Host:
        """Add a target namespace with one address on the lab bridge."""
        if name in self.hosts:
            raise LabError(f"host {name} already exists")
        if ip is None:
            ip = str(self.network.network_address + self._next_index)
        self._next_index = (
            max(self._next_index, int(ipaddress.ip_address(ip)) - int(self.network.network_address))
            + 1
        )
        netns = f"{self.prefix}-{name}"
        self._add_netns(netns)
        index = len(self.hosts) + 1
        hub_end = f"vh{index}"
        _run(
            [
                "ip",
                "-n",
                self.hub,
                "link",
                "add",
                hub_end,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns,
            ]
        )
        self.hub_run("ip", "link", "set", hub_end, "master", "br0")
        self.hub_run("ip", "link", "set", hub_end, "up")
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{ip}/{self.network.prefixlen}", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        mac = _run(["ip", "-n", netns, "-br", "link", "show", "eth0"]).stdout.split()[2]
        host = Host(name=name, netns=netns, ip=ip, mac=mac)
        self.hosts[name] = host
        if hostname:
            self.write_etc(host, "hosts", f"127.0.0.1 localhost\n{ip} {hostname}\n")
            self.write_etc(host, "hostname", f"{hostname}\n")
        return host

    def add_hub_address(self, cidr: str, dev: str = "lo") -> None:
        """Put an extra address in the hub (e.g. 169.254.169.254/32 on lo for IMDS)."""
        self.hub_run("ip", "addr", "add", cidr, "dev", dev)

    def write_etc(self, host: Host, relpath: str, text: str) -> Path:
        """Write /etc/netns/NS/relpath, which processes in NS see as /etc/relpath."""
        base = NETNS_ETC / host.netns
        if base not in self._etc_dirs:
            self._etc_dirs.append(base)
        path = base / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)

    # ---- running ----------------------------------------------------------------

    def hub_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` in the hub (scanner) namespace."""
        return ["ip", "netns", "exec", self.hub, *argv]

    def hub_run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a short command in the hub namespace."""
        return _run(self.hub_argv(argv), check=check)

    def host_run(
        self, host: Host | str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in a target namespace."""
        h = self.hosts[host] if isinstance(host, str) else host
        return _run(h.exec_argv(argv), check=check)

    def popen(self, netns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a long-running process in a namespace; it is killed by :meth:`close`.

        Servers must run in the foreground (``sshd -D``, ``smbd --foreground``):
        backgrounded daemons are reparented to PID 1, which does not reap them here.
        """
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], start_new_session=True, **kwargs
        )  # type: ignore[call-overload]
        self._processes.append(proc)
        return proc

    # ---- tearing down -----------------------------------------------------------

    def close(self) -> None:
        """Kill started processes and delete this lab's namespaces (only these)."""
        if self._closed:
            return
        self._closed = True
        for proc in self._processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self._processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                proc.wait(timeout=5)
        for netns in self._namespaces:
            # Any process still inside (a detached helper) dies with the namespace's users.
            pids = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    continue
        for netns in reversed(self._namespaces):
            _run(["ip", "netns", "delete", netns], check=False)
        for path in self._etc_dirs:
            shutil.rmtree(path, ignore_errors=True)
        atexit.unregister(self.close)
