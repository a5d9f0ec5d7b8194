"""Typed protocol messages, parsed and validated at the edge (PROTOCOL.md).

Every message from the platform becomes a frozen dataclass here; code past this
module never sees raw dicts. Unknown fields are ignored (forward
compatibility); a missing required field or a wrong type raises
:class:`MessageError`, whose text names the field by its path
(``jobs[0].options.rate_pps``) and says what is wrong.

A malformed job does not spoil the poll that carried it: PROTOCOL.md wants such
a job failed fast (``failed``/``internal_error`` with a message naming the
field) while the daemon keeps running, so :class:`PollResponse` keeps the jobs
it could parse and, separately, the ones it could not (:class:`InvalidJob`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from appliance.console import register_secret
from appliance.errors import PlatformError
from appliance.scan.portlists import PortSpecError, tcp_ports, udp_ports
from appliance.scan.targets import TargetError, parse_entry

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
HOSTNAME_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d{1,2}$")
VPC_ID_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
SIGNATURES_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
JWE_COMPACT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
MAX_JOBS_PER_POLL = 1000
MAX_TARGET_ENTRIES = 100_000
MAX_AUTH_RECORDS = 1000
MAX_RATE_PPS = 1_000_000
MAX_PARALLEL_HOSTS = 256
MAX_HOST_TIMEOUT_S = 86_400
MAX_POLL_INTERVAL_WIRE_S = 86_400 * 365  # anything is clamped later; this only bounds absurd input


class MessageError(PlatformError):
    """A platform message is malformed; ``field`` is the path of the offending field."""

    def __init__(self, message_name: str, field_path: str, problem: str) -> None:
        self.message_name = message_name
        self.field = field_path
        self.problem = problem
        super().__init__(f"{message_name}: {field_path} {problem}")


# --- a small typed reader over a JSON object: every accessor names the field ---


class _Reader:
    """Reads fields of one JSON object, raising :class:`MessageError` with the field's path."""

    def __init__(self, message: str, data: Any, path: str = "") -> None:
        self.message = message
        self.path = path
        if not isinstance(data, Mapping):
            raise MessageError(message, path or "the body", f"must be a JSON object, not {_kind(data)}")
        self.data = data

    def name(self, key: str) -> str:
        """The path of ``key`` within this object."""
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> MessageError:
        """An error naming ``key`` within this object."""
        return MessageError(self.message, self.name(key), problem)

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.data:
            if required:
                raise self.fail(key, "is missing")
            return None
        return self.data[key]

    def text(self, key: str, *, required: bool = True, nullable: bool = False, default: str | None = None) -> Any:
        """A string field (None allowed only when ``nullable``; ``default`` when absent)."""
        if key not in self.data and not required:
            return default
        value = self._get(key, required)
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_kind(value)}")
        return value

    def integer(self, key: str, *, required: bool = True, default: int | None = None, nullable: bool = False,
            minimum: int | None = None, maximum: int | None = None) -> Any:
        """An integer field, optionally bounded (booleans are not integers)."""
        if key not in self.data and not required:
            return default
        value = self._get(key, required)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise self.fail(key, f"must be a whole number, not {_kind(value)}")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            raise self.fail(key, f"is {value}; it must be between {minimum} and {maximum}")
        return value

    def boolean(self, key: str, *, required: bool = True, default: bool = False) -> bool:
        """A boolean field."""
        if key not in self.data and not required:
            return default
        value = self._get(key, required)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def array(self, key: str, *, required: bool = True, nullable: bool = False, max_items: int | None = None) -> Any:
        """A list field (None when absent and optional, or null and ``nullable``)."""
        if key not in self.data and not required:
            return None
        value = self._get(key, required)
        if value is None and nullable:
            return None
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, not {_kind(value)}")
        if max_items is not None and len(value) > max_items:
            raise self.fail(key, f"has {len(value)} items; at most {max_items} are accepted")
        return value

    def strings(self, key: str, *, required: bool = True, nullable: bool = False, max_items: int | None = None) -> Any:
        """A list of strings."""
        items = self.array(key, required=required, nullable=nullable, max_items=max_items)
        if items is None:
            return None
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise MessageError(self.message, f"{self.name(key)}[{index}]", f"must be a string, not {_kind(item)}")
        return tuple(items)

    def obj(self, key: str, *, required: bool = True, nullable: bool = False) -> _Reader | None:
        """A nested object, as a reader."""
        if key not in self.data and not required:
            return None
        value = self._get(key, required)
        if value is None and nullable:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be an object, not {_kind(value)}")
        return _Reader(self.message, value, self.name(key))

    def choice(self, key: str, choices: Sequence[str], *, required: bool = True, default: str | None = None) -> Any:
        """A string that must be one of ``choices``."""
        value = self.text(key, required=required, default=default)
        if value not in choices:
            raise self.fail(key, f"is {value!r}; it must be one of {', '.join(choices)}")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# --- register ---


@dataclass(frozen=True)
class MqttSettings:
    """Where the optional MQTT broker is (PROTOCOL.md, MQTT)."""

    url: str
    wake_topic: str
    events_topic: str

    def to_json(self) -> dict[str, str]:
        """The wire form."""
        return {"url": self.url, "wake_topic": self.wake_topic, "events_topic": self.events_topic}


def _parse_mqtt(reader: _Reader | None) -> MqttSettings | None:
    if reader is None:
        return None
    url = reader.text("url")
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("mqtts", "mqtt") and bool(parts.hostname)  # .hostname may raise too
    except ValueError:  # "mqtts://[::1" and other broken brackets
        usable = False
    if not usable:
        raise reader.fail("url", f"is {url!r}; it must be an mqtts://host:port URL")
    return MqttSettings(url=url, wake_topic=reader.text("wake_topic"), events_topic=reader.text("events_topic"))


@dataclass(frozen=True)
class RegisterResponse:
    """The ``201`` answer of ``POST /vsa/v1/register``."""

    appliance_id: str
    certificate_pem: str
    ca_pem: str | None
    poll_interval_s: int
    mqtt: MqttSettings | None

    @classmethod
    def parse(cls, data: Any) -> RegisterResponse:
        """Validate a register response body."""
        r = _Reader("register response", data)
        appliance_id = r.text("appliance_id")
        if not appliance_id or len(appliance_id) > 128:
            raise r.fail("appliance_id", "must be 1 to 128 characters")
        cert = r.text("certificate_pem")
        if "-----BEGIN CERTIFICATE-----" not in cert:
            raise r.fail("certificate_pem", "is not a PEM certificate")
        ca = r.text("ca_pem", required=False, nullable=True)
        interval = r.integer("poll_interval_s", minimum=0, maximum=MAX_POLL_INTERVAL_WIRE_S)
        mqtt = _parse_mqtt(r.obj("mqtt", required=False, nullable=True))
        return cls(appliance_id, cert, ca, interval, mqtt)


@dataclass(frozen=True)
class Capabilities:
    """What the appliance can do (register request ``capabilities``)."""

    raw_sockets: bool
    cpus: int
    memory_mb: int
    arch: str
    max_parallel_hosts: int

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        return {"raw_sockets": self.raw_sockets, "cpus": self.cpus, "memory_mb": self.memory_mb,
                "arch": self.arch, "max_parallel_hosts": self.max_parallel_hosts}


@dataclass(frozen=True)
class RegisterRequest:
    """The body of ``POST /vsa/v1/register`` (PROTOCOL.md): exactly these fields."""

    perscode: str = field(repr=False)
    csr_pem: str
    instance: Mapping[str, str | None]
    identity_document: str | None
    identity_pkcs7: str | None
    software_version: str
    capabilities: Capabilities

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "perscode": self.perscode,
            "csr_pem": self.csr_pem,
            "instance": dict(self.instance),
            "identity_document": self.identity_document,
            "identity_pkcs7": self.identity_pkcs7,
            "software_version": self.software_version,
            "capabilities": self.capabilities.to_json(),
        }


# --- poll ---


@dataclass(frozen=True)
class RunningJob:
    """One job in progress, as the poll request reports it."""

    job_id: str
    hosts_total: int
    hosts_done: int

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        return {"job_id": self.job_id, "hosts_total": self.hosts_total, "hosts_done": self.hosts_done}


@dataclass(frozen=True)
class PollRequest:
    """The body of ``POST /vsa/v1/poll``."""

    appliance_id: str
    instance_id: str | None
    software_version: str
    signatures_version: str | None
    lan_ip: str | None
    status: Literal["idle", "scanning"]
    running_jobs: tuple[RunningJob, ...] = ()
    spool_pending: int = 0

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "appliance_id": self.appliance_id,
            "instance_id": self.instance_id,
            "software_version": self.software_version,
            "signatures_version": self.signatures_version,
            "lan_ip": self.lan_ip,
            "status": self.status,
            "running_jobs": [job.to_json() for job in self.running_jobs],
            "spool_pending": self.spool_pending,
        }


@dataclass(frozen=True)
class Ec2ApiProxy:
    """The proxy for STS and EC2 calls the platform sends in a poll response."""

    url: str
    username: str | None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, r: _Reader) -> Ec2ApiProxy:
        """Validate ``ec2_api_proxy`` (the password is registered as a secret at once)."""
        password = r.text("password", required=False, nullable=True)
        register_secret(password)
        url = r.text("url")
        try:
            parts = urlsplit(url)
            hostname = parts.hostname  # parsed lazily: "[zz]" fails only here
        except ValueError:  # "http://[::1" and other broken brackets
            raise r.fail("url", "must be an http://host:port URL") from None
        if parts.scheme not in ("http", "https") or not hostname:
            raise r.fail("url", "must be an http://host:port URL")
        if parts.username or parts.password:
            raise r.fail("url", "must not carry credentials (use username and password)")
        return cls(url=url, username=r.text("username", required=False, nullable=True), password=password)

    def display(self) -> str:
        """How it may be shown: the password as ``***``."""
        user = f"{self.username}:***@" if self.username else ""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{user}{parts.netloc}"


@dataclass(frozen=True)
class SignaturesOffer:
    """A knowledge-base bundle the platform offers (``signatures`` of a poll response)."""

    version: str
    url: str  # always a path on the platform's own origin
    sha256: str
    signature: str

    @classmethod
    def parse(cls, r: _Reader, *, origin: str | None = None) -> SignaturesOffer:
        """Validate ``signatures``; a URL off the platform's origin is refused."""
        version = r.text("version")
        if not SIGNATURES_VERSION_RE.match(version):
            raise r.fail("version", "must be 1-64 characters of letters, digits, '.', '_' and '-'")
        url = r.text("url")
        try:
            parts = urlsplit(url)
        except ValueError:  # "http://[::1" and other broken brackets
            raise r.fail("url", f"is {url!r}, which is not a path on the platform's own origin") from None
        if parts.scheme or parts.netloc:
            if origin is None or f"{parts.scheme}://{parts.netloc}".lower() != origin.lower().rstrip("/"):
                raise r.fail("url", f"is {url!r}, which is not a path on the platform's own origin")
            url = parts.path + (f"?{parts.query}" if parts.query else "")
        if not url.startswith("/") or url.startswith("//"):
            raise r.fail("url", f"is {url!r}, which is not a path on the platform's own origin")
        sha = r.text("sha256")
        if not SHA256_HEX_RE.match(sha):
            raise r.fail("sha256", "must be 64 hexadecimal digits")
        signature = r.text("signature")
        if not signature:
            raise r.fail("signature", "is empty")
        return cls(version=version, url=url, sha256=sha.lower(), signature=signature)


@dataclass(frozen=True)
class RefusedSignatures:
    """A signatures offer refused as malformed or off the platform's origin."""

    version: str | None  # as offered, when it was a string at all (for the console's words only)
    error: MessageError

    @property
    def message(self) -> str:
        """The console's words: which offer, and why it was refused."""
        name = f"signatures {self.version[:64]}" if self.version else "a signatures offer"
        return f"{name} refused: {self.error}; the installed bundle stays in use"


@dataclass(frozen=True)
class InvalidJob:
    """A job offered in a malformed form: to be failed fast with ``internal_error``."""

    job_id: str | None  # None when even the job ID is unusable (it cannot be failed then)
    error: MessageError

    @property
    def message(self) -> str:
        """The words for the job's failure message (names the field)."""
        return f"invalid job specification: {self.error.field} {self.error.problem}"


@dataclass(frozen=True)
class PollResponse:
    """The ``200`` answer of ``POST /vsa/v1/poll``."""

    poll_interval_s: int
    jobs: tuple[JobSpec, ...] = ()
    invalid_jobs: tuple[InvalidJob, ...] = ()
    cancel_jobs: tuple[str, ...] = ()
    ec2_api_proxy: Ec2ApiProxy | None = None
    signatures: SignaturesOffer | None = None
    # A malformed or foreign-origin offer is refused on its own (the old bundle stays in use),
    # so that it does not hold back the jobs of the same poll.
    signatures_refused: RefusedSignatures | None = None

    @classmethod
    def parse(cls, data: Any, *, origin: str | None = None) -> PollResponse:
        """Validate a poll response; malformed jobs are set apart, not fatal."""
        r = _Reader("poll response", data)
        interval = r.integer("poll_interval_s", minimum=0, maximum=MAX_POLL_INTERVAL_WIRE_S)
        raw_jobs = r.array("jobs", required=False, nullable=True, max_items=MAX_JOBS_PER_POLL) or []
        jobs: list[JobSpec] = []
        invalid: list[InvalidJob] = []
        for index, raw in enumerate(raw_jobs):
            try:
                jobs.append(JobSpec.parse(raw, path=f"jobs[{index}]"))
            except MessageError as exc:
                job_id = raw.get("job_id") if isinstance(raw, Mapping) else None
                usable = job_id if isinstance(job_id, str) and JOB_ID_RE.match(job_id) else None
                invalid.append(InvalidJob(job_id=usable, error=exc))
        cancel = r.strings("cancel_jobs", required=False, nullable=True) or ()
        for index, job_id in enumerate(cancel):
            if not JOB_ID_RE.match(job_id):
                raise MessageError("poll response", f"cancel_jobs[{index}]", "is not a valid job ID")
        proxy_reader = r.obj("ec2_api_proxy", required=False, nullable=True)
        sig_reader = r.obj("signatures", required=False, nullable=True)
        signatures: SignaturesOffer | None = None
        refused: RefusedSignatures | None = None
        if sig_reader:
            try:
                signatures = SignaturesOffer.parse(sig_reader, origin=origin)
            except MessageError as exc:
                version = data["signatures"].get("version")
                refused = RefusedSignatures(version if isinstance(version, str) else None, exc)
        return cls(
            poll_interval_s=interval,
            jobs=tuple(jobs),
            invalid_jobs=tuple(invalid),
            cancel_jobs=tuple(cancel),
            ec2_api_proxy=Ec2ApiProxy.parse(proxy_reader) if proxy_reader else None,
            signatures=signatures,
            signatures_refused=refused,
        )


# --- JobSpec ---


@dataclass(frozen=True)
class Tag:
    """An EC2 tag filter."""

    key: str
    value: str


@dataclass(frozen=True)
class Ec2Selection:
    """``targets.ec2``: which EC2 instances are targets."""

    role_arn: str | None
    external_id: str | None = field(repr=False)
    regions: tuple[str, ...]
    platform: Literal["vpc_all", "vpc_selected", "classic"]
    vpc_ids: tuple[str, ...]
    instance_ids: tuple[str, ...] | None
    tags_include: tuple[Tag, ...]
    tags_exclude: tuple[Tag, ...]
    include_small_types: bool
    address: Literal["private", "public"]


@dataclass(frozen=True)
class JobTargets:
    """``targets``: addresses, host names and an optional EC2 selection."""

    ips: tuple[str, ...]
    hostnames: tuple[str, ...]
    ec2: Ec2Selection | None


@dataclass(frozen=True)
class JobOptions:
    """``options`` of a job, with the defaults a careful designer would pick for absent ones."""

    tcp_ports: str = "standard"
    udp_ports: str = "none"
    host_discovery: Literal["default", "none"] = "default"
    service_detection: Literal["banner", "nmap"] = "banner"
    rate_pps: int = 10_000
    max_parallel_hosts: int | None = None  # None: the appliance's own bound
    host_timeout_s: int = 900
    authentication: bool = True


@dataclass(frozen=True)
class JobSpec:
    """One job, validated (PROTOCOL.md, JobSpec)."""

    job_id: str
    type: Literal["vm_scan", "discovery"]
    title: str | None
    targets: JobTargets
    exclude: tuple[str, ...]
    options: JobOptions
    auth_records: tuple[str, ...] = field(repr=False)
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def parse(cls, data: Any, *, path: str = "job") -> JobSpec:
        """Validate one JobSpec; every error names the field (``jobs[0].targets.ips[2]``)."""
        r = _Reader("job", data, path)
        job_id = r.text("job_id")
        if not JOB_ID_RE.match(job_id):
            raise r.fail("job_id", "must be 1-64 characters of letters, digits, '.', '_' and '-'")
        job_type = r.choice("type", ("vm_scan", "discovery"))
        title = r.text("title", required=False, nullable=True)
        if title is not None and len(title) > 1024:
            raise r.fail("title", "is longer than 1024 characters")
        targets = _parse_targets(r.obj("targets"))  # type: ignore[arg-type]
        exclude = r.strings("exclude", required=False, nullable=True, max_items=MAX_TARGET_ENTRIES) or ()
        for index, entry in enumerate(exclude):
            _check_address_entry(r, f"exclude[{index}]", entry, limit=None)
        options_reader = r.obj("options", required=False, nullable=True)
        options = _parse_options(options_reader) if options_reader else JobOptions()
        records = r.strings("auth_records", required=False, nullable=True, max_items=MAX_AUTH_RECORDS) or ()
        for index, record in enumerate(records):
            if not JWE_COMPACT_RE.match(record):
                raise MessageError("job", f"{r.name('auth_records')}[{index}]",
                                   "is not a JWE in compact serialization (five base64url parts)")
        return cls(job_id, job_type, title, targets, tuple(exclude), options, tuple(records), dict(data))


def _check_address_entry(r: _Reader, name: str, entry: str, *, limit: int | None = 65_536) -> None:
    path = f"{r.path}.{name}" if r.path else name
    try:
        parse_entry(entry, field=path, limit=limit)
    except TargetError as exc:
        raise MessageError("job", path, exc.problem) from None


def _check_hostname(r: _Reader, name: str, host: str) -> None:
    text = host.removesuffix(".")
    if not text or len(text) > 253 or not all(HOSTNAME_LABEL_RE.match(label) for label in text.split(".")):
        raise MessageError("job", f"{r.path}.{name}", f"is {host!r}, which is not a valid host name")


def _parse_targets(r: _Reader) -> JobTargets:
    ips = r.strings("ips", required=False, nullable=True, max_items=MAX_TARGET_ENTRIES) or ()
    for index, entry in enumerate(ips):
        _check_address_entry(r, f"ips[{index}]", entry)
    hostnames = r.strings("hostnames", required=False, nullable=True, max_items=MAX_TARGET_ENTRIES) or ()
    for index, host in enumerate(hostnames):
        _check_hostname(r, f"hostnames[{index}]", host)
    ec2_reader = r.obj("ec2", required=False, nullable=True)
    ec2 = _parse_ec2(ec2_reader) if ec2_reader else None
    if not ips and not hostnames and ec2 is None:
        raise MessageError("job", r.path, "has no targets: ips, hostnames and ec2 are all empty")
    return JobTargets(tuple(ips), tuple(hostnames), ec2)


def _parse_tags(r: _Reader, key: str) -> tuple[Tag, ...]:
    items = r.array(key, required=False, nullable=True) or []
    tags = []
    for index, item in enumerate(items):
        tr = _Reader("job", item, f"{r.name(key)}[{index}]")
        tags.append(Tag(tr.text("key"), tr.text("value")))
    return tuple(tags)


def _parse_ec2(r: _Reader) -> Ec2Selection:
    role_arn = r.text("role_arn", required=False, nullable=True)
    if role_arn is not None and not ROLE_ARN_RE.match(role_arn):
        raise r.fail("role_arn", f"is {role_arn!r}, which is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    external_id = r.text("external_id", required=False, nullable=True)
    regions = r.strings("regions")
    if not regions:
        raise r.fail("regions", "is empty; name at least one region")
    for index, region in enumerate(regions):
        if not REGION_RE.match(region):
            raise MessageError("job", f"{r.name('regions')}[{index}]", f"is {region!r}, which is not an AWS region name")
    platform = r.choice("platform", ("vpc_all", "vpc_selected", "classic"), required=False, default="vpc_all")
    vpc_ids = r.strings("vpc_ids", required=False, nullable=True) or ()
    for index, vpc in enumerate(vpc_ids):
        if not VPC_ID_RE.match(vpc):
            raise MessageError("job", f"{r.name('vpc_ids')}[{index}]", f"is {vpc!r}, which is not a VPC ID")
    if platform == "vpc_selected" and not vpc_ids:
        raise r.fail("vpc_ids", "is empty, but platform is vpc_selected")
    instance_ids = r.strings("instance_ids", required=False, nullable=True)
    for index, iid in enumerate(instance_ids or ()):
        if not INSTANCE_ID_RE.match(iid):
            raise MessageError("job", f"{r.name('instance_ids')}[{index}]", f"is {iid!r}, which is not an instance ID")
    return Ec2Selection(
        role_arn=role_arn,
        external_id=external_id,
        regions=tuple(regions),
        platform=platform,
        vpc_ids=tuple(vpc_ids),
        instance_ids=tuple(instance_ids) if instance_ids is not None else None,
        tags_include=_parse_tags(r, "tags_include"),
        tags_exclude=_parse_tags(r, "tags_exclude"),
        include_small_types=r.boolean("include_small_types", required=False, default=False),
        address=r.choice("address", ("private", "public"), required=False, default="private"),
    )


def _parse_options(r: _Reader) -> JobOptions:
    defaults = JobOptions()
    tcp = r.text("tcp_ports", required=False, default=defaults.tcp_ports)
    udp = r.text("udp_ports", required=False, default=defaults.udp_ports)
    try:
        tcp_ports(tcp)
    except PortSpecError as exc:
        raise r.fail("tcp_ports", exc.problem) from None
    try:
        udp_ports(udp)
    except PortSpecError as exc:
        raise r.fail("udp_ports", exc.problem) from None
    return JobOptions(
        tcp_ports=tcp,
        udp_ports=udp,
        host_discovery=r.choice("host_discovery", ("default", "none"), required=False, default="default"),
        service_detection=r.choice("service_detection", ("banner", "nmap"), required=False, default="banner"),
        rate_pps=r.integer("rate_pps", required=False, default=defaults.rate_pps, minimum=1, maximum=MAX_RATE_PPS),
        max_parallel_hosts=r.integer("max_parallel_hosts", required=False, nullable=True, minimum=1, maximum=MAX_PARALLEL_HOSTS),
        host_timeout_s=r.integer("host_timeout_s", required=False, default=defaults.host_timeout_s, minimum=1, maximum=MAX_HOST_TIMEOUT_S),
        authentication=r.boolean("authentication", required=False, default=True),
    )


@dataclass(frozen=True)
class ErrorBody:
    """A platform error body ``{"error": code, "message": text}`` (tolerant: never raises)."""

    code: str | None
    message: str | None

    @classmethod
    def parse(cls, data: Any) -> ErrorBody:
        """Read what can be read of an error body."""
        if not isinstance(data, Mapping):
            return cls(None, None)
        code = data.get("error")
        message = data.get("message")
        return cls(code if isinstance(code, str) else None, message if isinstance(message, str) else None)
