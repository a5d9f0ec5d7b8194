"""The demo fleet: a whole lab for one ``vm_scan`` by EC2 tags, with its ground truth.

One context manager, :func:`build_fleet`, builds everything the demo, the
end-to-end test (tests/e2e/test_demo_scenario.py) and ``bench/job`` need, and
tears it all down on exit, even on failure or Ctrl-C:

- a :class:`~appliance.lab.netns.NetnsLab` (hub namespace with bridge ``br0``,
  the appliance at ``10.77.0.1``) and six target namespaces:

  ===========  ==========  =========================================================
  name         address     what runs there
  ===========  ==========  =========================================================
  ``app1``     10.77.0.10  sshd; the scan user has a key and NOPASSWD sudo; an IMDS
  ``app2``     10.77.0.11  the same, but its os-release says Ubuntu 22.04 LTS
  ``legacy``   10.77.0.12  sshd where the scan key is not authorized (auth ``failed``)
  ``files``    10.77.0.13  Samba (the Windows record logs in)
  ``web``      10.77.0.14  an HTTP server on 80 and HTTPS on 443
  ``vault``    10.77.0.15  drops every packet (nftables), so it is ``down``
  ===========  ==========  =========================================================

- in the hub, on its own ``127.0.0.1``: moto's server (one EC2 instance per
  target, tagged ``env=demo``, plus a terminated one, a ``t3.nano`` and one
  outside the tag selection), the reference platform (HTTPS, its own CA),
  Mosquitto (mutual TLS under the platform's CA) and, at ``169.254.169.254``
  on the hub's loopback, the IMDS emulator serving the appliance's user-data;
- every SSH target also runs a small IMDS on its own loopback describing its
  EC2 instance, so the appliance reads ``instance_metadata`` through SSH;
- a knowledge-base bundle published on the platform: OSV records built at
  run time from this machine's ``dpkg-query`` (the SSH targets share its
  filesystem), affecting the installed ``openssl``, ``openssh`` and ``sudo``
  source packages (fixed just above the installed versions), one Ubuntu
  record (which only ``app2`` must match) and two records that must match
  nothing.

The ground truth (:class:`ExpectedHost`) is computed from the sources, never
from the appliance: addresses and EC2 facts from moto's own answers, open
ports from the listeners in each namespace (``ss``), OS and packages from
this machine, findings from the bundle's records and ``dpkg-query``.

The appliance itself is started by the caller (:meth:`Fleet.start_daemon`),
as ``vsa run`` inside the hub namespace.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import platform as pyplatform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.lab import sshlab
from appliance.lab.mosquitto import BrokerTls, broker_config, mosquitto_binary
from appliance.lab.moto import Ec2Seeder, MotoServer
from appliance.lab.netns import Host, LabError, NetnsLab, lab_available, netns_executor
from appliance.lab.platform.admin import Platform
from appliance.lab.platform.mqtt import broker_files
from appliance.lab.portlab import HTTP_SERVER, TLS_SUBJECT_CN
from appliance.lab.smblab import SambaServer, linux_user, samba_available
from appliance.scan.portlists import tcp_ports as expand_tcp_ports

SUBNET = "10.77.0.0/24"
VPC_CIDR = "10.77.0.0/16"
REGION = "us-east-1"
IMDS_ADDRESS = "169.254.169.254"
MOTO_PORT = 5000
PLATFORM_PORT = 8443
MQTT_PORT = 8883
READY_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 2  # announced by the platform; VSA_POLL_INTERVAL_FLOOR_S lets the daemon honour it
SCAN_USER = "vsa-scan"
APPLIANCE_INSTANCE_ID = "i-0a9917ce5c4ddemo0"
TAG_SELECTION = {"key": "env", "value": "demo"}
TCP_PORTS = "standard"
KB_VERSION_PREFIX = "demo"
FIX_SUFFIX = "+vsa1"  # appended to an installed Debian version: sorts just above it
WEB_PORTS = (80, 443)
# app2's os-release claims Ubuntu over this machine's dpkg (its own copy of /etc): the
# appliance must take the ecosystem from os-release and match Ubuntu's records only.
OTHER_OS_RELEASE = (
    'PRETTY_NAME="Ubuntu 22.04.5 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\n'
    'VERSION="22.04.5 LTS (Jammy Jellyfish)"\nVERSION_CODENAME=jammy\nID=ubuntu\nID_LIKE=debian\n'
)
OTHER_OS_HOSTS = ("app2",)


def say_nothing(_message: str) -> None:
    """The default narration: silent."""


# ---- ground truth ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedAuth:
    """One expected ``auth[]`` entry."""

    record_id: str | None
    type: str
    status: str
    privileged: bool


@dataclass(frozen=True)
class ExpectedFinding:
    """One expected finding (``package`` is the installed package, ``source_package`` the advisory's key)."""

    id: str
    severity: int
    package: str | None
    source_package: str | None
    installed: str | None
    fixed: str | None
    source: str = "osv"
    detection: str = "package"


@dataclass(frozen=True)
class ExpectedPort:
    """One expected open TCP port and what the banner probes must learn of it."""

    port: int
    service: str | None
    product: str | None
    version: str | None
    banner: str | None  # exact, or None when no banner is expected
    banner_contains: tuple[str, ...] = ()  # for banners the appliance composes (HTTP, TLS)


@dataclass
class ExpectedHost:
    """What the appliance must report of one EC2 instance (``targeted`` False: no result at all)."""

    name: str
    ip: str
    role: str  # ssh, ssh-denied, smb, web, drop, terminated, small, outside
    targeted: bool
    status: str | None
    reason: str | None
    instance_id: str = ""
    target: dict[str, Any] = field(default_factory=dict)  # the HostResult ``target`` object
    tcp_ports: tuple[int, ...] = ()
    ports: tuple[ExpectedPort, ...] = ()
    auth: tuple[ExpectedAuth, ...] = ()
    os: dict[str, Any] | None = None
    packages_manager: str | None = None
    packages_ecosystem: str | None = None
    package_count: int | None = None
    findings: tuple[ExpectedFinding, ...] = ()
    instance_metadata: dict[str, Any] | None = None
    errors_prefix: str | None = None  # None: no errors at all; else every error starts with it
    errors_include: tuple[str, ...] = ()  # substrings some error must contain
    netns: str | None = None

    @property
    def host_key(self) -> str:
        """The platform's key for this host: the instance ID."""
        return self.instance_id

    def severity_counts(self) -> dict[int, int]:
        """Expected findings per severity."""
        counts: dict[int, int] = {}
        for f in self.findings:
            counts[f.severity] = counts.get(f.severity, 0) + 1
        return counts


@dataclass(frozen=True)
class InstalledPackage:
    """One package as this machine's dpkg lists it (status installed)."""

    name: str
    version: str
    source_name: str
    source_version: str


def installed_packages() -> list[InstalledPackage]:
    """This machine's installed dpkg packages (what every SSH target's inventory lists)."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}\t${Package}\t${Version}\t${source:Package}\t${source:Version}\n"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    items = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) < 5 or parts[0].split()[-1:] != ["installed"]:
            continue
        items.append(InstalledPackage(parts[1], parts[2], parts[3] or parts[1], parts[4] or parts[2]))
    return items


def os_release() -> dict[str, str]:
    """This machine's os-release as a dict (what the SSH targets report)."""
    path = Path("/etc/os-release") if Path("/etc/os-release").exists() else Path("/usr/lib/os-release")
    return _parse_release(path.read_text())


def _release_name(text: str) -> str:
    values = _parse_release(text)
    return values.get("PRETTY_NAME") or values.get("NAME") or "another distribution"


def _parse_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values


# The advisories: (id, source package, severity, summary). Fixed versions come from dpkg at run time.
AFFECTING = (
    ("VSA-DEMO-2026-0001", "openssl", 4, "OpenSSL: demo advisory fixed just above the installed version"),
    ("VSA-DEMO-2026-0002", "openssh", 3, "OpenSSH: demo advisory fixed just above the installed version"),
    ("VSA-DEMO-2026-0003", "sudo", 5, "sudo: demo advisory fixed just above the installed version"),
)


def knowledge_base(packages: list[InstalledPackage], ecosystem: str, other_ecosystem: str = "Ubuntu:22.04:LTS"
                   ) -> tuple[list[dict[str, Any]], dict[str, list[ExpectedFinding]]]:
    """OSV records for this machine's packages, and the findings they give per host ecosystem.

    ``ecosystem`` is this machine's (``Debian:12``): three records affect the
    installed openssl, openssh and sudo sources, fixed just above the installed
    versions. One record of ``other_ecosystem`` affects openssl with no fix: a
    target whose os-release claims that distribution (over this machine's dpkg)
    gets it and none of the others. Two more records match nothing anywhere
    (fixed long ago; a package no target has).
    """
    by_source: dict[str, list[InstalledPackage]] = {}
    for p in packages:
        by_source.setdefault(p.source_name, []).append(p)
    records: list[dict[str, Any]] = []
    expected: dict[str, list[ExpectedFinding]] = {ecosystem: [], other_ecosystem: []}
    for advisory_id, source, severity, summary in AFFECTING:
        binaries = by_source.get(source)
        if not binaries:
            continue  # not installed here: no record, no finding
        # One fixed version per source; binaries of one source share the source version.
        fixed = max(b.source_version for b in binaries) + FIX_SUFFIX
        records.append(_osv(advisory_id, summary, severity, ecosystem, source,
                            [{"introduced": "0"}, {"fixed": fixed}]))
        expected[ecosystem] += [ExpectedFinding(advisory_id, severity, b.name, source if source != b.name else None,
                                                b.version, fixed) for b in binaries]
    other_source = "openssl" if "openssl" in by_source else next(iter(sorted(by_source)), "openssl")
    records.append(_osv("VSA-DEMO-2026-0103", f"{other_source} on {other_ecosystem}: no fix yet", 5,
                        other_ecosystem, other_source, [{"introduced": "0"}]))
    expected[other_ecosystem] += [ExpectedFinding("VSA-DEMO-2026-0103", 5, b.name,
                                                  other_source if other_source != b.name else None, b.version, None)
                                  for b in by_source.get(other_source, [])]
    records.append(_osv("VSA-DEMO-2026-0101", "fixed long ago", 4, ecosystem, other_source,
                        [{"introduced": "0"}, {"fixed": "0.0.1-1"}]))
    records.append(_osv("VSA-DEMO-2026-0102", "a package no target has", 5, ecosystem,
                        "vsa-demo-not-installed", [{"introduced": "0"}]))
    return records, expected


def _osv(advisory_id: str, summary: str, severity: int, ecosystem: str, name: str,
         events: list[dict[str, str]]) -> dict[str, Any]:
    return {"schema_version": "1.6.0", "id": advisory_id, "modified": "2026-12-01T00:00:00Z",
            "published": "2026-12-01T00:00:00Z", "summary": summary,
            "database_specific": {"severity": severity},
            "affected": [{"package": {"ecosystem": ecosystem, "name": name},
                          "ranges": [{"type": "ECOSYSTEM", "events": events}]}]}


def openssh_identification() -> str:
    """``OpenSSH_9.2p1 Debian-2+deb12u3``: this machine's OpenSSH, as sshd's banner names it (``ssh -V``)."""
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).split(",")[0].strip()


def samba_version() -> str:
    """``4.17.12-Debian``: this machine's Samba version (``smbd -V``)."""
    out = subprocess.run(["smbd", "-V"], capture_output=True, text=True, timeout=10).stdout
    return out.strip().removeprefix("Version ").strip()


def debian_ecosystem(release: Mapping[str, str]) -> str:
    """The OSV ecosystem of a Debian-like os-release (``Debian:12``), as PROTOCOL.md names it."""
    distro = release.get("ID", "debian")
    version = release.get("VERSION_ID", "")
    if distro == "ubuntu":
        lts = ":LTS" if "LTS" in release.get("VERSION", "") else ""
        return f"Ubuntu:{version}{lts}"
    return f"{distro.capitalize()}:{version.split('.')[0]}"


# ---- the fleet ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The built lab, its services and its ground truth; the daemon is started by the caller."""

    lab: NetnsLab
    workdir: Path
    platform: Platform
    platform_url: str
    moto_url: str
    mqtt_url: str | None
    perscode: str
    hosts: dict[str, ExpectedHost]
    auth_records: list[dict[str, Any]]
    kb_records: list[dict[str, Any]]
    kb_version: str
    config_path: Path
    daemon_log: Path
    _daemon: subprocess.Popen[bytes] | None = None

    # -- the job ------------------------------------------------------------------------------

    def targeted(self) -> list[ExpectedHost]:
        """The hosts that must get a result, in address order."""
        return sorted((h for h in self.hosts.values() if h.targeted),
                      key=lambda h: ipaddress.ip_address(h.ip))

    def job_spec(self, title: str = "Demo: every instance tagged env=demo") -> dict[str, Any]:
        """The ``vm_scan`` by EC2 tags, with plaintext auth records (the platform encrypts them)."""
        return {
            "type": "vm_scan",
            "title": title,
            "targets": {"ips": [], "hostnames": [], "ec2": {
                "role_arn": None, "external_id": None, "regions": [REGION], "platform": "vpc_all",
                "vpc_ids": [], "instance_ids": None, "tags_include": [TAG_SELECTION], "tags_exclude": [],
                "include_small_types": False, "address": "private"}},
            "exclude": [],
            "options": {"tcp_ports": TCP_PORTS, "udp_ports": "none", "host_discovery": "default",
                        "service_detection": "banner", "rate_pps": 10000, "max_parallel_hosts": 16,
                        "host_timeout_s": 300, "authentication": True},
            "auth_records": self.auth_records,
        }

    # -- the daemon ----------------------------------------------------------------------------

    def daemon_env(self) -> dict[str, str]:
        """The daemon's environment: lab endpoints and test timings, nothing of the caller's AWS/VSA/proxy settings."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VSA_", "AWS_", "NOTIFY_SOCKET", "WATCHDOG_"))
               and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
        env.update({
            "AWS_ENDPOINT_URL_STS": self.moto_url,
            "AWS_ENDPOINT_URL_EC2": self.moto_url,
            "VSA_POLL_INTERVAL_FLOOR_S": "1",  # documented test knob (appliance/platform/retry.py)
            "VSA_WAIT_CAP_S": "2",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start_daemon(self, **popen: Any) -> subprocess.Popen[bytes]:
        """``vsa run --config CONFIG`` as a real process inside the hub namespace."""
        if self._daemon is not None and self._daemon.poll() is None:
            raise LabError("the daemon already runs")
        self._daemon = self.lab.popen(self.lab.hub, [*vsa_command(), "run", "--config", str(self.config_path)],
                                      env=self.daemon_env(), cwd=str(self.workdir), **popen)
        return self._daemon

    @property
    def daemon(self) -> subprocess.Popen[bytes] | None:
        """The daemon process, if started."""
        return self._daemon

    def stop_daemon(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM the daemon (its process group) and wait; its exit status, None if none ran."""
        proc = self._daemon
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def daemon_pid(self) -> int | None:
        """The PID of the ``vsa run`` Python process (``ip netns exec`` execs into it)."""
        return self._daemon.pid if self._daemon is not None and self._daemon.poll() is None else None

    def vsa_status(self) -> dict[str, Any] | None:
        """``vsa status --json`` (reads the state directory; None when it fails)."""
        result = subprocess.run([*vsa_command(), "status", "--json", "--config", str(self.config_path)],
                                capture_output=True, text=True, timeout=30, env=self.daemon_env())
        try:
            return json.loads(result.stdout) if result.returncode == 0 else None
        except ValueError:
            return None

    def wake(self, appliance_id: str) -> bool:
        """An MQTT wake-up from the platform (published from inside the hub); False when it fails."""
        if self.mqtt_url is None:
            return False
        with netns_executor(self.lab.hub, 1) as pool:
            try:
                pool.submit(self.platform.wake, appliance_id).result(timeout=15)
                return True
            except Exception:  # noqa: BLE001 - the broker is an accelerator: polling still works
                return False


def vsa_command() -> list[str]:
    """The venv's ``vsa`` console script, else the same CLI by module."""
    beside = Path(sys.executable).with_name("vsa")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "appliance.cli"]


def fleet_available() -> str | None:
    """None when this machine can build the fleet, else what is missing."""
    missing = [reason for reason in (lab_available(), sshlab.ssh_lab_available(), samba_available()) if reason]
    if mosquitto_binary() is None:
        missing.append("mosquitto is not installed")
    if shutil.which("nft") is None:
        missing.append("nft (nftables) is not installed")
    if shutil.which("dpkg-query") is None:
        missing.append("dpkg-query is missing (the demo targets are Debian)")
    return "; ".join(missing) or None


# ---- building ------------------------------------------------------------------------------------

TARGETS: tuple[tuple[str, str, str, str, dict[str, str]], ...] = (
    # name, last octet, role, instance type, extra tags
    ("app1", "10", "ssh", "t3.large", {"role": "app"}),
    ("app2", "11", "ssh", "m5.large", {"role": "db"}),
    ("legacy", "12", "ssh-denied", "t3.medium", {"role": "legacy"}),
    ("files", "13", "smb", "t3.large", {"role": "files"}),
    ("web", "14", "web", "t3.small", {"role": "web"}),
    ("vault", "15", "drop", "t3.large", {"role": "vault"}),
)
NOT_SCANNED: tuple[tuple[str, str, str, str, dict[str, str]], ...] = (
    ("old-batch", "20", "terminated", "t3.large", {"env": "demo"}),
    ("tiny", "21", "small", "t3.nano", {"env": "demo"}),
    ("sandbox", "22", "outside", "t3.large", {"env": "sandbox"}),
)


@contextlib.contextmanager
def build_fleet(workdir: Path, *, say: Callable[[str], None] = say_nothing,
                mqtt: bool = True, perscode: str | None = None, user_data_extra: str = "") -> Iterator[Fleet]:
    """Build the whole demo lab under ``workdir`` (see the module docstring); tear it down on exit.

    ``perscode`` replaces the generated personalization code and
    ``user_data_extra`` is appended to the user-data (``PROXY_URL=...``): the
    secrets canary test (tests/e2e/test_secrets_canary.py) uses both.
    """
    reason = fleet_available()
    if reason:
        raise LabError(f"cannot build the demo lab: {reason}")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # sshd and samba read files below as other users
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(NetnsLab(subnet=SUBNET))
        hub_pool = stack.enter_context(netns_executor(lab.hub, 2))
        say(f"lab: hub namespace {lab.hub}, the appliance will run there at {lab.scanner_ip}")
        net = ipaddress.ip_network(SUBNET)
        hosts: dict[str, Host] = {}
        for name, octet, _role, _type, _tags in TARGETS:
            hosts[name] = lab.add_host(name, str(net.network_address + int(octet)), hostname=name)

        # moto, the platform and the broker: all in the hub, on its own 127.0.0.1.
        moto_url = f"http://127.0.0.1:{MOTO_PORT}"
        from appliance.lab.moto import moto_server_path

        lab.popen(lab.hub, [moto_server_path(), "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        platform_dir = workdir / "platform"
        platform = Platform.init(platform_dir, poll_interval_s=POLL_INTERVAL_S)
        stack.callback(platform.close)
        mqtt_url = None
        if mqtt:
            files = broker_files(platform, workdir / "broker", ["127.0.0.1"])
            conf = workdir / "broker" / "mosquitto.conf"
            conf.write_text(broker_config(MQTT_PORT, BrokerTls(files.ca_file, files.cert_file, files.key_file)))
            with open(workdir / "broker" / "mosquitto.log", "ab") as log:
                lab.popen(lab.hub, [mosquitto_binary() or "mosquitto", "-c", str(conf)],
                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            mqtt_url = f"mqtts://127.0.0.1:{MQTT_PORT}"
            platform.set_mqtt(mqtt_url)
        with open(workdir / "platform.log", "ab") as log:
            lab.popen(lab.hub, [sys.executable, "-m", "appliance.lab.platform", "--data-dir", str(platform_dir),
                                "serve", "--host", "127.0.0.1", "--port", str(PLATFORM_PORT)],
                      stdout=log, stderr=subprocess.STDOUT)
        platform_url = f"https://127.0.0.1:{PLATFORM_PORT}"

        # The appliance's own IMDS, at its real address on the hub's loopback.
        perscode = perscode or f"DEMO-{secrets.token_hex(6).upper()}"
        platform.create_perscode(perscode, label="demo appliance")
        user_data = workdir / "user-data"
        user_data.write_text(f"# pasted into the EC2 launch wizard\nPERSCODE={perscode}\n{user_data_extra}")
        os.chmod(user_data, 0o600)
        lab.add_hub_address(f"{IMDS_ADDRESS}/32")
        lab.popen(lab.hub, [sys.executable, "-m", "appliance.lab.imds", "--host", IMDS_ADDRESS, "--port", "80",
                            "--mode", "v2-required", "--user-data-file", str(user_data),
                            "--instance-id", APPLIANCE_INSTANCE_ID, "--region", REGION,
                            "--private-ip", lab.scanner_ip],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        for what, port, ip in (("moto", MOTO_PORT, "127.0.0.1"), ("the platform", PLATFORM_PORT, "127.0.0.1"),
                               ("the IMDS emulator", 80, IMDS_ADDRESS)) + (
                (("Mosquitto", MQTT_PORT, "127.0.0.1"),) if mqtt else ()):
            _wait_tcp(hub_pool, ip, port, what)
        say(f"services in the hub: moto at {moto_url}, the platform at {platform_url}, "
            f"IMDS at http://{IMDS_ADDRESS}" + (f", Mosquitto at {mqtt_url}" if mqtt_url else ""))

        # EC2: one instance per target (its address), and three that are never scanned.
        truth = hub_pool.submit(_seed_ec2, moto_url, lab.scanner_ip).result(timeout=120)
        say(f"moto: {len(truth)} instances in {REGION}, {sum(1 for t in truth.values() if t['Tags'].get('env') == 'demo')}"
            " tagged env=demo (one terminated, one t3.nano)")

        # Targets.
        key = ed25519.Ed25519PrivateKey.generate()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption()).decode()
        key_pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode() + " vsa-demo"
        other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " someone-else"
        users = sshlab.LabUsers([sshlab.LabUser(SCAN_USER, None, "ALL=(ALL) NOPASSWD: ALL", (key_pub,))])
        denied_users = sshlab.LabUsers([sshlab.LabUser(SCAN_USER, None, None, (other,))])
        etc = sshlab.LabEtc.create(workdir / "etc-copy", users)
        other_etc = sshlab.LabEtc.create(workdir / "etc-copy-other", users)
        release_path = other_etc.path / "os-release"
        release_path.unlink()  # a symlink to ../usr/lib/os-release on Debian: replace it by a file
        release_path.write_text(OTHER_OS_RELEASE)
        metadata: dict[str, dict[str, Any]] = {}
        for name, _octet, role, _type, _tags in TARGETS:
            host = hosts[name]
            if role in ("ssh", "ssh-denied"):
                server = sshlab.SshServer(lab, host, workdir / f"sshd-{name}",
                                          users if role == "ssh" else denied_users,
                                          other_etc if name in OTHER_OS_HOSTS else etc)
                server.setup()
                server.start()
                if role == "ssh":
                    data, metadata[name] = _imds_data(truth[name], host)
                    sshlab.start_imds_stub(lab, host, data)
            elif role == "web":
                from appliance.lab.portlab import _tls_material

                tls_dir = workdir / "web-tls"
                tls_dir.mkdir(exist_ok=True)
                cert, key_file = _tls_material(tls_dir)
                lab.popen(host.netns, [sys.executable, "-m", "appliance.lab.portlab", "serve",
                                       "--ports", ",".join(map(str, WEB_PORTS)), "--tls-cert", str(cert),
                                       "--tls-key", str(key_file)], stdout=subprocess.DEVNULL)
            elif role == "drop":
                # A listener too: if the drop rule failed, its ports would show.
                lab.popen(host.netns, [sys.executable, "-m", "appliance.lab.portlab", "serve", "--ports", "22,80,443"],
                          stdout=subprocess.DEVNULL)
                lab.host_run(host, "nft", "add table inet vsademo")
                lab.host_run(host, "nft", "add chain inet vsademo input { type filter hook input priority 0 ; policy drop ; }")
        smb_user = f"vsademo{secrets.token_hex(3)}"
        smb_password = f"Pw-{secrets.token_urlsafe(12)}"
        stack.enter_context(linux_user(smb_user))
        smb_dir = workdir / "samba"
        smb_dir.mkdir()
        os.chmod(smb_dir, 0o755)
        samba = SambaServer(lab, hosts["files"], smb_dir)
        samba.prepare()
        samba.add_user(smb_user, smb_password)
        samba.start()
        stack.callback(samba.stop)
        for name, host in hosts.items():
            if name in ("web", "vault"):
                _wait_listening(lab, host, WEB_PORTS if name == "web" else (22, 80, 443))
        say("targets: sshd on app1, app2 and legacy (10.77.0.10-12), Samba on files (10.77.0.13), "
            "a web server on web (10.77.0.14), vault (10.77.0.15) drops everything")

        # The knowledge base, from this machine's dpkg.
        release = os_release()
        ecosystem = debian_ecosystem(release)
        packages = installed_packages()
        kb_records, kb_findings = knowledge_base(packages, ecosystem)
        kb_version = f"{KB_VERSION_PREFIX}.{time.strftime('%Y%m%d')}.{secrets.token_hex(2)}"
        platform.publish_signatures(kb_records, version=kb_version)
        say(f"knowledge base {kb_version}: {len(kb_records)} OSV records for {' and '.join(kb_findings)}; "
            f"the Linux targets run this machine's {len(packages)} packages, and "
            f"{', '.join(OTHER_OS_HOSTS)} claims to be {_release_name(OTHER_OS_RELEASE)} in its os-release")

        records: list[dict[str, Any]] = [
            {"type": "unix", "id": "rec-linux", "title": "Linux fleet", "username": SCAN_USER, "password": None,
             "private_keys": [{"pem": key_pem, "passphrase": None, "certificate": None}],
             "root_delegation": {"method": "sudo", "password": None}, "port": 22,
             "targets": [hosts[n].ip for n in ("app1", "app2", "legacy")]},
            {"type": "windows", "id": "rec-windows", "title": "Windows file servers", "domain": None,
             "username": smb_user, "password": smb_password, "nt_hash": None, "protocols": ["ntlmv2"],
             "targets": [hosts["files"].ip]},
        ]

        expected = _ground_truth(lab, hosts, truth, metadata, release, ecosystem, len(packages), kb_findings)

        config_path = workdir / "appliance.toml"
        state_dir = workdir / "state"
        config_path.write_text(
            "[platform]\n"
            f'url = "{platform_url}"\n'
            f'ca_file = "{platform.ca_file}"\n'
            "[state]\n"
            f'dir = "{state_dir}"\n'
            "[signatures]\n"
            f'public_key = "{platform.signing_public_key()}"\n'
        )
        fleet = Fleet(lab=lab, workdir=workdir, platform=platform, platform_url=platform_url, moto_url=moto_url,
                      mqtt_url=mqtt_url, perscode=perscode, hosts=expected, auth_records=records,
                      kb_records=kb_records, kb_version=kb_version, config_path=config_path,
                      daemon_log=workdir / "daemon.log")
        stack.callback(fleet.stop_daemon)
        yield fleet


def _wait_tcp(pool: concurrent.futures.ThreadPoolExecutor, ip: str, port: int, what: str) -> None:
    """Wait until ``ip:port`` accepts a connection from inside the hub."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if pool.submit(_connects, ip, port).result():
            return
        time.sleep(0.1)
    raise LabError(f"{what} did not listen on {ip}:{port} within {READY_TIMEOUT_S:g} s")


def _connects(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((ip, port)) == 0


def _listening(lab: NetnsLab, host: Host) -> set[int]:
    """TCP ports listening on the host's lab address (or any address) in its namespace."""
    out = lab.host_run(host, "ss", "-Htln", check=False).stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        if address in (host.ip, "0.0.0.0", "*", "[::]"):
            ports.add(int(port))
    return ports


def _wait_listening(lab: NetnsLab, host: Host, ports: tuple[int, ...]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not set(ports) <= _listening(lab, host):
        if time.monotonic() > deadline:
            raise LabError(f"listeners on {host.ip} did not come up: wanted {sorted(ports)}")
        time.sleep(0.05)


def _seed_ec2(moto_url: str, scanner_ip: str) -> dict[str, dict[str, Any]]:
    """Create the VPC, subnet and instances in moto (from a hub thread); moto's view of each, by name."""
    port = int(moto_url.rsplit(":", 1)[1])
    seeder = Ec2Seeder(MotoServer(port=port))
    vpc = seeder.vpc(REGION, VPC_CIDR)
    subnet = seeder.subnet(REGION, vpc, SUBNET)
    net = ipaddress.ip_network(SUBNET)
    ids: dict[str, str] = {}
    for name, octet, role, itype, tags in TARGETS + NOT_SCANNED:
        all_tags = {"Name": name, **({"env": "demo"} if role not in ("terminated", "small", "outside") else {}),
                    **tags}
        (ids[name],) = seeder.launch(subnet, instance_type=itype, tags=all_tags,
                                     private_ip=str(net.network_address + int(octet)))
    seeder.terminate(REGION, [ids["old-batch"]])
    ec2 = seeder.client(REGION)
    described: dict[str, dict[str, Any]] = {}
    for reservation in ec2.describe_instances(InstanceIds=list(ids.values()))["Reservations"]:
        for inst in reservation["Instances"]:
            name = next(n for n, i in ids.items() if i == inst["InstanceId"])
            inst = dict(inst)
            inst["Tags"] = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            described[name] = inst
    return described


def _imds_data(inst: Mapping[str, Any], host: Host) -> tuple[dict[str, str], dict[str, Any]]:
    """What a target's own IMDS serves (paths under /latest/), and what the appliance must read of it."""
    zone = inst.get("Placement", {}).get("AvailabilityZone") or f"{REGION}a"
    groups = [g["GroupName"] for g in inst.get("SecurityGroups", [])] or ["default"]
    document = {"accountId": "123456789012", "architecture": "x86_64", "availabilityZone": zone,
                "imageId": inst["ImageId"], "instanceId": inst["InstanceId"],
                "instanceType": inst["InstanceType"], "privateIp": inst["PrivateIpAddress"],
                "region": REGION, "version": "2017-09-30", "pendingTime": "2026-12-04T21:00:00Z"}
    hostname = inst.get("PrivateDnsName") or f"ip-{host.ip.replace('.', '-')}.ec2.internal"
    values = {"ami-id": inst["ImageId"], "instance-id": inst["InstanceId"], "instance-type": inst["InstanceType"],
              "local-ipv4": host.ip, "local-hostname": hostname, "mac": host.mac or "",
              "availability-zone": zone}
    data = {f"meta-data/{k}": v for k, v in values.items() if k != "availability-zone"}
    data["meta-data/placement/availability-zone"] = zone
    data["meta-data/security-groups"] = "\n".join(groups)
    data["dynamic/instance-identity/document"] = json.dumps(document, indent=2)
    client = "curl" if shutil.which("curl") else "wget" if shutil.which("wget") else "python3"
    expected = {"client": client, "imds_version": "v2", **values, "security-groups": groups,
                "identity-document": document}
    return data, expected


def _target(inst: Mapping[str, Any], ip: str) -> dict[str, Any]:
    """The HostResult ``target`` object moto's facts call for."""
    return {"ip": ip, "hostname": None, "instance_id": inst["InstanceId"], "region": REGION,
            "vpc_id": inst.get("VpcId"), "subnet_id": inst.get("SubnetId"), "instance_type": inst["InstanceType"],
            "image_id": inst.get("ImageId"), "state": inst["State"]["Name"],
            "private_dns": inst.get("PrivateDnsName") or None, "public_dns": inst.get("PublicDnsName") or None,
            "public_ip": inst.get("PublicIpAddress") or None, "tags": dict(inst["Tags"])}


def _ground_truth(lab: NetnsLab, hosts: Mapping[str, Host], truth: Mapping[str, Mapping[str, Any]],
                  metadata: Mapping[str, dict[str, Any]], release: Mapping[str, str], ecosystem: str,
                  package_count: int, kb_findings: Mapping[str, list[ExpectedFinding]]) -> dict[str, ExpectedHost]:
    net = ipaddress.ip_network(SUBNET)
    scanned_ports = set(expand_tcp_ports(TCP_PORTS))
    uname = os.uname()
    linux_os = {"family": "linux", "name": release.get("NAME") or release.get("ID"),
                "version": release.get("VERSION_ID"), "kernel": uname.release,
                "arch": pyplatform.machine(), "source": "ssh"}
    ssh_ident = openssh_identification()
    known_ports = {
        22: ExpectedPort(22, "ssh", "OpenSSH", ssh_ident.split("_", 1)[1].split()[0], f"SSH-2.0-{ssh_ident}"),
        80: ExpectedPort(80, "http", "nginx", HTTP_SERVER.split("/")[1], None, (f"Server: {HTTP_SERVER}",)),
        443: ExpectedPort(443, "https", "nginx", HTTP_SERVER.split("/")[1], None,
                          (f"CN={TLS_SUBJECT_CN}", f"Server: {HTTP_SERVER}")),
        445: ExpectedPort(445, "microsoft-ds", None, None, None),
    }
    na_unix = ExpectedAuth(None, "unix", "not_applicable", False)
    na_windows = ExpectedAuth(None, "windows", "not_applicable", False)
    expected: dict[str, ExpectedHost] = {}
    for name, octet, role, _type, _tags in TARGETS + NOT_SCANNED:
        inst = truth[name]
        ip = str(net.network_address + int(octet))
        host = ExpectedHost(name=name, ip=ip, role=role, targeted=role != "outside", status=None, reason=None,
                            instance_id=inst["InstanceId"], target=_target(inst, ip),
                            netns=hosts[name].netns if name in hosts else None)
        if role == "terminated":
            host.status, host.reason = "excluded", "terminated"
        elif role == "small":
            host.status, host.reason = "excluded", "small_instance_type"
        elif role == "drop":
            host.status = "down"
        elif role != "outside":
            host.status = "scanned"
            host.tcp_ports = tuple(sorted(_listening(lab, hosts[name]) & scanned_ports))
            host.ports = tuple(known_ports.get(p, ExpectedPort(p, None, None, None, None)) for p in host.tcp_ports)
        if role == "ssh":
            host.auth = (ExpectedAuth("rec-linux", "unix", "success", True), na_windows)
            host_release, host_ecosystem = release, ecosystem
            if name in OTHER_OS_HOSTS:
                host_release = _parse_release(OTHER_OS_RELEASE)
                host_ecosystem = debian_ecosystem(host_release)
            host.os = {**linux_os, "name": host_release.get("NAME") or host_release.get("ID"),
                       "version": host_release.get("VERSION_ID")}
            host.packages_manager, host.packages_ecosystem, host.package_count = "dpkg", host_ecosystem, package_count
            host.findings = tuple(kb_findings[host_ecosystem])
            host.instance_metadata = metadata[name]
        elif role == "ssh-denied":
            host.auth = (ExpectedAuth("rec-linux", "unix", "failed", False), na_windows)
        elif role == "smb":
            host.auth = (na_unix, ExpectedAuth("rec-windows", "windows", "success", False))
            host.os = {"family": "unix", "name": "Samba", "version": samba_version(), "kernel": None, "arch": None,
                       "source": "smb"}
            # Samba serves little of the Windows registry (LAB-NOTES): the checker says what it missed.
            host.errors_prefix, host.errors_include = "smb: ", ("the server is Samba",)
            # Samba's defaults: signing offered but not required (VSA-SMB-0002); SMB3 on, SMB1 and NTLMv1 off.
            host.findings = (ExpectedFinding("VSA-SMB-0002", 3, None, None, None, None, source="vsa",
                                             detection="network"),)
        elif role == "web":
            host.auth = (na_unix, na_windows)
        expected[name] = host
    return expected
