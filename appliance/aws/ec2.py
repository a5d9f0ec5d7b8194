"""EC2 target resolution: a job's ``targets.ec2`` selection → the hosts to scan.

The way a scanner inside a customer's VPC must do it (PROTOCOL.md, JobSpec):
credentials from the instance profile (botocore's default chain, which reads
IMDS), STS ``AssumeRole`` into the connector role (with ``ExternalId`` when the
job gives one), then ``DescribeInstances`` in each region with those
credentials, paginated, with the filters EC2 applies server-side. Everything
else is decided by pure functions of this module (:func:`parse_ec2_selection`,
:func:`server_filters`, :func:`select_instances`), tested without any I/O.

Network rules (PROTOCOL.md, Transport): AWS traffic never goes through the
platform proxy ``PROXY_URL``. It goes direct, or through the ``ec2_api_proxy``
of a poll response. Every client built here carries an explicit ``proxies``
mapping (empty when direct), so botocore never consults ``HTTP_PROXY`` /
``HTTPS_PROXY`` / ``NO_PROXY`` from the environment; the instance-metadata
credential fetcher is likewise built without environment proxies (the metadata
address is link-local and must never be proxied).

Failures are values (:class:`Ec2Failure`) that name the endpoint or the denial
and say what to fix; :attr:`Ec2Resolution.message` puts them in one sentence for
the job's completion (reason ``target_resolution_failed``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import aioboto3
import aiohttp
import botocore.exceptions as bx
from aiobotocore.utils import AioInstanceMetadataFetcher
from botocore.config import Config as BotoConfig
from botocore.parsers import ResponseParserError

from appliance import __version__
from appliance.config import Config
from appliance.console import register_secret
from appliance.errors import VsaError
from appliance.results import HostResult, Target

_log = logging.getLogger(__name__)

# --- constants -------------------------------------------------------------------------------

FIELD = "targets.ec2"
Platform = Literal["vpc_all", "vpc_selected", "classic"]
AddressKind = Literal["private", "public"]
PLATFORMS: tuple[str, ...] = ("vpc_all", "vpc_selected", "classic")
ADDRESS_KINDS: tuple[str, ...] = ("private", "public")
# PROTOCOL.md, JobSpec: never scanned unless include_small_types.
SMALL_INSTANCE_TYPES = frozenset({"t1.micro", "m1.small", "t2.nano", "t3.nano"})
# EC2 instance state names; the gone ones are targets reported `excluded`, reason `terminated`.
GONE_STATES = frozenset({"shutting-down", "terminated"})

REASON_TERMINATED = "terminated"
REASON_SMALL = "small_instance_type"
REASON_OVERLAP = "overlapping_address"
REASON_NO_PUBLIC = "no_public_address"
REASON_NO_PRIVATE = "no_private_address"
COMPLETION_REASON = "target_resolution_failed"

# DescribeInstances accepts 5..1000 for MaxResults; a filter takes at most 200 values.
MAX_PAGE_SIZE = 1000
MIN_PAGE_SIZE = 5
MAX_FILTER_VALUES = 200
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
# Bound on a whole region (all its pages, retries included): resolution never hangs a job.
REGION_TIMEOUT_S = 300.0
ASSUME_ROLE_DURATION_S = 3600
ROLE_SESSION_NAME = "vsa-appliance"
# botocore's "standard" retry mode retries throttling (Throttling, RequestLimitExceeded, ...)
# and transient network errors with exponential backoff and full jitter, capped at 20 s.
DEFAULT_MAX_ATTEMPTS = 4
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
    }
)

# https://docs.aws.amazon.com/IAM/latest/APIReference/API_Role.html (RoleName chars, path)
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
# https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRole.html (ExternalId)
_EXTERNAL_ID_RE = re.compile(r"^[\w+=,.@:/-]{2,1224}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
_VPC_ID_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")


# --- errors ----------------------------------------------------------------------------------


class Ec2Error(VsaError):
    """The EC2 side of the appliance (selection, STS, EC2) failed."""


class Ec2SelectionError(Ec2Error):
    """A job's ``targets.ec2`` is malformed; ``field`` names the offending key."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        self.problem = problem
        super().__init__(f"{field_name} {problem}")


# --- the selection (parsed at the edge) -------------------------------------------------------


@dataclass(frozen=True)
class TagFilter:
    """One tag condition; ``value`` None matches any value of ``key``."""

    key: str
    value: str | None = None

    def matches(self, tags: Mapping[str, str]) -> bool:
        """Whether an instance with these tags carries this tag (and value)."""
        if self.key not in tags:
            return False
        return self.value is None or tags[self.key] == self.value


@dataclass(frozen=True)
class Ec2Selection:
    """A job's ``targets.ec2``, typed and validated (PROTOCOL.md, JobSpec)."""

    regions: tuple[str, ...]
    role_arn: str | None = None
    external_id: str | None = None
    platform: Platform = "vpc_all"
    vpc_ids: tuple[str, ...] = ()
    instance_ids: tuple[str, ...] | None = None
    tags_include: tuple[TagFilter, ...] = ()
    tags_exclude: tuple[TagFilter, ...] = ()
    include_small_types: bool = False
    address: AddressKind = "private"


def parse_ec2_selection(raw: Any) -> Ec2Selection | None:
    """Parse ``targets.ec2`` (None for null) or raise :class:`Ec2SelectionError` naming the field.

    Optional keys take the protocol's defaults when absent: ``role_arn`` and
    ``external_id`` null, ``platform`` vpc_all, ``vpc_ids``/tags empty,
    ``instance_ids`` null, ``include_small_types`` false, ``address`` private.
    ``regions`` is required. ``vpc_ids`` only narrow with ``vpc_selected``
    (with the other platforms they are ignored, as the protocol defines them).
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise Ec2SelectionError(FIELD, f"must be an object or null, not {_kind(raw)}")

    def key(name: str) -> str:
        return f"{FIELD}.{name}"

    role_arn = _opt_str(raw.get("role_arn"), key("role_arn"))
    if role_arn is not None and not _ROLE_ARN_RE.match(role_arn):
        raise Ec2SelectionError(
            key("role_arn"),
            f"must be an IAM role ARN such as arn:aws:iam::111122223333:role/VsaConnector, "
            f"not {role_arn!r}",
        )
    external_id = _opt_str(raw.get("external_id"), key("external_id"))
    if external_id is not None:
        if role_arn is None:
            raise Ec2SelectionError(
                key("external_id"), "is given but role_arn is null (an ExternalId needs a role)"
            )
        if not _EXTERNAL_ID_RE.match(external_id):
            raise Ec2SelectionError(
                key("external_id"),
                "must be 2 to 1224 characters of letters, digits and +=,.@:/-_ (AWS's rule)",
            )

    if "regions" not in raw:
        raise Ec2SelectionError(key("regions"), "is missing (name at least one region)")
    regions = _str_list(raw["regions"], key("regions"))
    if not regions:
        raise Ec2SelectionError(key("regions"), "is empty (name at least one region)")
    for region in regions:
        if not _REGION_RE.match(region):
            raise Ec2SelectionError(
                key("regions"), f"has {region!r}, which is not a region name such as us-east-1"
            )

    platform = raw.get("platform", "vpc_all")
    if platform not in PLATFORMS:
        raise Ec2SelectionError(
            key("platform"), f"must be one of {', '.join(PLATFORMS)}, not {platform!r}"
        )
    vpc_ids = _str_list(raw.get("vpc_ids") or [], key("vpc_ids"))
    for vpc_id in vpc_ids:
        if not _VPC_ID_RE.match(vpc_id):
            raise Ec2SelectionError(key("vpc_ids"), f"has {vpc_id!r}, which is not a VPC ID")
    if platform == "vpc_selected" and not vpc_ids:
        raise Ec2SelectionError(key("vpc_ids"), "is empty but platform is vpc_selected")

    instance_ids: tuple[str, ...] | None = None
    if raw.get("instance_ids") is not None:
        id_list = _str_list(raw["instance_ids"], key("instance_ids"))
        for instance_id in id_list:
            if not _INSTANCE_ID_RE.match(instance_id):
                raise Ec2SelectionError(
                    key("instance_ids"), f"has {instance_id!r}, which is not an instance ID"
                )
        instance_ids = tuple(dict.fromkeys(id_list))

    include_small = raw.get("include_small_types", False)
    if not isinstance(include_small, bool):
        raise Ec2SelectionError(
            key("include_small_types"), f"must be true or false, not {_kind(include_small)}"
        )
    address = raw.get("address", "private")
    if address not in ADDRESS_KINDS:
        raise Ec2SelectionError(key("address"), f"must be private or public, not {address!r}")

    return Ec2Selection(
        regions=tuple(dict.fromkeys(regions)),
        role_arn=role_arn,
        external_id=external_id,
        platform=platform,
        vpc_ids=tuple(dict.fromkeys(vpc_ids)),
        instance_ids=instance_ids,
        tags_include=_tag_list(raw.get("tags_include") or [], key("tags_include")),
        tags_exclude=_tag_list(raw.get("tags_exclude") or [], key("tags_exclude")),
        include_small_types=include_small,
        address=address,
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _opt_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise Ec2SelectionError(name, f"must be a non-empty string or null, not {_kind(value)}")
    return value.strip()


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise Ec2SelectionError(name, f"must be a list of strings, not {_kind(value)}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise Ec2SelectionError(name, f"must hold non-empty strings, but has {item!r}")
    return [item.strip() for item in value]


def _tag_list(value: Any, name: str) -> tuple[TagFilter, ...]:
    if not isinstance(value, list):
        raise Ec2SelectionError(name, f"must be a list of {{key, value}} objects, not {_kind(value)}")
    tags = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, Mapping):
            raise Ec2SelectionError(where, f"must be an object {{key, value}}, not {_kind(item)}")
        tag_key = item.get("key")
        if not isinstance(tag_key, str) or not tag_key:
            raise Ec2SelectionError(f"{where}.key", "must be a non-empty string")
        tag_value = item.get("value")
        if tag_value is not None and not isinstance(tag_value, str):
            raise Ec2SelectionError(f"{where}.value", f"must be a string or null, not {_kind(tag_value)}")
        tags.append(TagFilter(tag_key, tag_value))
    return tuple(dict.fromkeys(tags))


# --- endpoints and the EC2 API proxy -----------------------------------------------------------


@dataclass(frozen=True)
class AwsEndpoints:
    """STS and EC2 endpoint URLs; None means botocore's AWS default for the region."""

    sts: str | None = None
    ec2: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> AwsEndpoints:
        """From ``aws.sts_endpoint``/``aws.ec2_endpoint`` (``AWS_ENDPOINT_URL_STS``/``_EC2``)."""
        return cls(sts=config.sts_endpoint, ec2=config.ec2_endpoint)


@dataclass(frozen=True)
class Ec2ApiProxy:
    """PROTOCOL.md's ``ec2_api_proxy``: an HTTP proxy used for STS and EC2 only.

    The password is registered as a secret on construction and never shown by
    ``repr`` or :attr:`display_url`.
    """

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.url)
            # .hostname is parsed lazily: "[zz]" fails only there.
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # "http://[::1" and other broken brackets
            usable = False
        if not usable:
            raise Ec2Error(f"ec2_api_proxy.url must be an http:// URL with a host, not {self.url!r}")
        if parts.username or parts.password:
            raise Ec2Error("ec2_api_proxy.url must not carry credentials (use username/password)")
        register_secret(self.password)

    @classmethod
    def from_wire(cls, raw: Any) -> Ec2ApiProxy | None:
        """Parse the poll response's ``ec2_api_proxy`` (None for null)."""
        if raw is None:
            return None
        if not isinstance(raw, Mapping) or not isinstance(raw.get("url"), str):
            raise Ec2Error("ec2_api_proxy must be null or an object with a url")
        # Register before validating, so that no error message can carry it (a hostile
        # non-string password is refused below; register_secret only takes text).
        if isinstance(raw.get("password"), str):
            register_secret(raw["password"])
        for name in ("username", "password"):
            if raw.get(name) is not None and not isinstance(raw.get(name), str):
                raise Ec2Error(f"ec2_api_proxy.{name} must be a string or null")
        return cls(url=raw["url"], username=raw.get("username"), password=raw.get("password"))

    @property
    def display_url(self) -> str:
        """The proxy URL as it may be shown: no credentials."""
        return self.url

    def botocore_url(self) -> str:
        """The proxy URL with percent-encoded credentials, as botocore and aiohttp take them."""
        if self.username is None:
            return self.url
        parts = urlsplit(self.url)
        userinfo = quote(self.username, safe="")
        if self.password is not None:
            userinfo += ":" + quote(self.password, safe="")
        netloc = f"{userinfo}@{parts.netloc}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def boto_config(
    proxy: Ec2ApiProxy | None, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> BotoConfig:
    """The botocore client configuration for every STS and EC2 client.

    ``proxies`` is always an explicit mapping: empty when direct, so botocore
    never falls back to the environment's ``HTTP(S)_PROXY`` (which may hold
    the platform proxy, PROXY_URL); the EC2 API proxy for both schemes otherwise.
    """
    proxies: dict[str, str] = {}
    if proxy is not None:
        url = proxy.botocore_url()
        proxies = {"http": url, "https": url}
    return BotoConfig(
        proxies=proxies,
        # total_max_attempts counts the first attempt too (plain max_attempts would not).
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        user_agent_extra=f"vsa/{__version__}",
    )


# --- the result ------------------------------------------------------------------------------

FailureKind = Literal[
    "no_credentials",
    "sts_unreachable",
    "assume_role_denied",
    "sts_error",
    "proxy_unreachable",
    "proxy_denied",
    "ec2_unreachable",
    "ec2_denied",
    "ec2_auth_failed",
    "region_unavailable",
    "throttled",
    "timeout",
    "ec2_error",
]


@dataclass(frozen=True)
class Ec2Failure:
    """One thing that kept part of the selection from being resolved, in words."""

    kind: FailureKind
    message: str  # what failed and what to fix; names the endpoint, region or role
    region: str | None = None  # None: every region (STS, credentials)
    endpoint: str | None = None


@dataclass(frozen=True)
class NotScanned:
    """A target of the selection that gets a result without being scanned."""

    target: Target
    status: Literal["excluded", "unreachable"]
    reason: str

    def host_result(self) -> HostResult:
        """The HostResult the job engine sends for it as is."""
        return HostResult(target=self.target, status=self.status, reason=self.reason)


@dataclass(frozen=True)
class Ec2Resolution:
    """What a selection resolved to: targets to scan, targets not to scan, and failures.

    A failed region does not hide the regions that answered: their targets are
    here, and :attr:`failures` says what could not be resolved.
    """

    targets: tuple[Target, ...] = ()
    not_scanned: tuple[NotScanned, ...] = ()
    failures: tuple[Ec2Failure, ...] = ()
    regions_resolved: tuple[str, ...] = ()
    api_calls: int = 0  # HTTP requests sent to STS and EC2, retries included

    @property
    def ok(self) -> bool:
        """True when every region was resolved."""
        return not self.failures

    @property
    def excluded(self) -> tuple[NotScanned, ...]:
        """Targets reported ``excluded`` (terminated, small instance types)."""
        return tuple(n for n in self.not_scanned if n.status == "excluded")

    @property
    def unreachable(self) -> tuple[NotScanned, ...]:
        """Targets reported ``unreachable`` (overlapping address, no public address)."""
        return tuple(n for n in self.not_scanned if n.status == "unreachable")

    @property
    def completion_reason(self) -> str | None:
        """``target_resolution_failed`` when anything failed, else None."""
        return COMPLETION_REASON if self.failures else None

    @property
    def message(self) -> str | None:
        """The failures in words for the job's completion message, or None when all went well."""
        if not self.failures:
            return None
        words = "; ".join(f.message for f in self.failures)
        return f"EC2 targets could not be resolved: {words}"


# --- pure selection logic --------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceFacts:
    """What DescribeInstances says of one instance, typed."""

    instance_id: str
    region: str
    state: str
    instance_type: str | None
    vpc_id: str | None
    subnet_id: str | None
    image_id: str | None
    private_ip: str | None
    public_ip: str | None
    private_dns: str | None
    public_dns: str | None
    tags: dict[str, str]


def instance_facts(raw: Mapping[str, Any], region: str) -> InstanceFacts:
    """Parse one ``Instances[]`` element of DescribeInstances (empty strings become None)."""

    def text(name: str) -> str | None:
        value = raw.get(name)
        return value if isinstance(value, str) and value else None

    state = raw.get("State") or {}
    return InstanceFacts(
        instance_id=str(raw["InstanceId"]),
        region=region,
        state=str(state.get("Name") or "unknown"),
        instance_type=text("InstanceType"),
        vpc_id=text("VpcId"),
        subnet_id=text("SubnetId"),
        image_id=text("ImageId"),
        private_ip=text("PrivateIpAddress"),
        public_ip=text("PublicIpAddress"),
        private_dns=text("PrivateDnsName"),
        public_dns=text("PublicDnsName"),
        tags={
            str(t["Key"]): str(t.get("Value", ""))
            for t in raw.get("Tags") or []
            if isinstance(t, Mapping) and "Key" in t
        },
    )


def server_filters(selection: Ec2Selection) -> list[list[dict[str, Any]]]:
    """The DescribeInstances ``Filters`` to send, one list per paginated call.

    EC2 ANDs different filters and ORs the values of one filter, so only what
    keeps the meaning is sent: instance IDs (filter ``instance-id``, which,
    unlike ``InstanceIds``, neither fails on an unknown ID nor forbids
    ``MaxResults``; chunked by 200 values), VPC IDs for ``vpc_selected``, and
    the include tags when they form a single OR (one key, or keys only).
    No state filter: terminated instances of the selection must be reported.
    :func:`select_instances` applies every rule again in code.
    """
    base: list[dict[str, Any]] = []
    if selection.platform == "vpc_selected":
        base.append({"Name": "vpc-id", "Values": list(selection.vpc_ids)})
    include = selection.tags_include
    if include:
        keys = {t.key for t in include}
        if all(t.value is not None for t in include) and len(keys) == 1:
            base.append({"Name": f"tag:{include[0].key}", "Values": [t.value for t in include]})
        elif all(t.value is None for t in include):
            base.append({"Name": "tag-key", "Values": sorted(keys)})
    if selection.instance_ids is None:
        return [base]
    ids = list(selection.instance_ids)
    if not ids:
        return []  # an empty list of IDs selects nothing: no call at all
    return [
        base + [{"Name": "instance-id", "Values": ids[i : i + MAX_FILTER_VALUES]}]
        for i in range(0, len(ids), MAX_FILTER_VALUES)
    ]


def in_selection(facts: InstanceFacts, selection: Ec2Selection) -> bool:
    """Whether an instance is a target of the selection (platform, IDs, tags)."""
    if selection.platform == "classic" and facts.vpc_id is not None:
        return False
    if selection.platform == "vpc_all" and facts.vpc_id is None:
        return False
    if selection.platform == "vpc_selected" and facts.vpc_id not in selection.vpc_ids:
        return False
    if selection.instance_ids is not None and facts.instance_id not in selection.instance_ids:
        return False
    if selection.tags_include and not any(t.matches(facts.tags) for t in selection.tags_include):
        return False
    return not any(t.matches(facts.tags) for t in selection.tags_exclude)


def to_target(facts: InstanceFacts, address: AddressKind) -> Target:
    """The Target of an instance: ``ip`` is the address to scan (may be empty when none)."""
    if address == "public":
        ip = facts.public_dns or facts.public_ip or ""
    else:
        ip = facts.private_ip or ""
    return Target(
        ip=ip,
        instance_id=facts.instance_id,
        region=facts.region,
        vpc_id=facts.vpc_id,
        subnet_id=facts.subnet_id,
        instance_type=facts.instance_type,
        image_id=facts.image_id,
        state=facts.state,
        private_dns=facts.private_dns,
        public_dns=facts.public_dns,
        public_ip=facts.public_ip,
        tags=dict(facts.tags),
    )


def select_instances(
    instances: Iterable[InstanceFacts],
    selection: Ec2Selection,
    *,
    own_vpc_ids: Iterable[str] = (),
    own_addresses: Iterable[str] = (),
) -> tuple[list[Target], list[NotScanned]]:
    """Apply the JobSpec rules to described instances: (targets to scan, targets not scanned).

    In order: instances outside the selection are dropped (no result);
    terminated and shutting-down ones are ``excluded``/``terminated``; small
    types are ``excluded``/``small_instance_type`` unless included; one with no
    address of the kind asked is ``unreachable``; and instances that resolve to
    the same address, or to one of the appliance's own addresses, from outside
    the appliance's own VPC are ``unreachable``/``overlapping_address`` (the
    scanner's packets would reach another host). When none of a group of
    same-address instances sits in the appliance's VPC, none can be told apart
    and all are unreachable.
    """
    own_vpcs = set(own_vpc_ids)
    own_ips = {_normal_ip(a) for a in own_addresses}
    seen: set[str] = set()
    candidates: list[tuple[InstanceFacts, Target]] = []
    not_scanned: list[NotScanned] = []
    for facts in instances:
        if facts.instance_id in seen or not in_selection(facts, selection):
            continue
        seen.add(facts.instance_id)
        target = to_target(facts, selection.address)
        if facts.state in GONE_STATES:
            not_scanned.append(NotScanned(target, "excluded", REASON_TERMINATED))
        elif not selection.include_small_types and facts.instance_type in SMALL_INSTANCE_TYPES:
            not_scanned.append(NotScanned(target, "excluded", REASON_SMALL))
        elif not target.ip:
            reason = REASON_NO_PUBLIC if selection.address == "public" else REASON_NO_PRIVATE
            not_scanned.append(NotScanned(target, "unreachable", reason))
        else:
            candidates.append((facts, target))

    by_ip: dict[str, list[tuple[InstanceFacts, Target]]] = {}
    for facts, target in candidates:
        by_ip.setdefault(_normal_ip(target.ip), []).append((facts, target))
    targets: list[Target] = []
    for facts, target in candidates:
        group = by_ip[_normal_ip(target.ip)]
        inside = facts.vpc_id is not None and facts.vpc_id in own_vpcs
        clash_with_self = _normal_ip(target.ip) in own_ips and not inside
        others_inside = any(
            f.vpc_id in own_vpcs for f, _ in group if f.instance_id != facts.instance_id
        )
        if clash_with_self or (len(group) > 1 and (not inside or others_inside)):
            not_scanned.append(NotScanned(target, "unreachable", REASON_OVERLAP))
        else:
            targets.append(target)
    return targets, not_scanned


def _normal_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.lower()  # a DNS name (address "public")


# --- failures in words (pure) ----------------------------------------------------------------


def describe_failure(
    exc: BaseException,
    *,
    service: Literal["sts", "ec2"],
    endpoint: str,
    region: str | None,
    selection: Ec2Selection,
    proxy: Ec2ApiProxy | None,
) -> Ec2Failure:
    """Turn a botocore/aiohttp exception into an :class:`Ec2Failure` with what to fix."""
    where = f"in {region} " if region and service == "ec2" else ""
    via = f" through the EC2 API proxy {proxy.display_url}" if proxy else " directly"
    name = "STS" if service == "sts" else "EC2"
    setting = "aws.sts_endpoint / AWS_ENDPOINT_URL_STS" if service == "sts" else (
        "aws.ec2_endpoint / AWS_ENDPOINT_URL_EC2"
    )

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return Ec2Failure(
            "no_credentials",
            "the appliance has no AWS credentials of its own: attach an IAM instance profile "
            "to the appliance's instance (IMDS must be reachable) "
            f"({type(exc).__name__}: {exc})",
            endpoint=endpoint,
        )
    if proxy is not None and _proxy_refused_credentials(exc):
        return Ec2Failure(
            "proxy_denied",
            f"the EC2 API proxy {proxy.display_url} refused the request for {name} {where}"
            "(407 Proxy Authentication Required): check the ec2_api_proxy username and "
            "password the platform sends",
            region=region if service == "ec2" else None,
            endpoint=endpoint,
        )
    if isinstance(exc, ResponseParserError):
        return Ec2Failure(
            "sts_error" if service == "sts" else "ec2_error",
            f"{name} {where}at {endpoint} answered something that is not an AWS response"
            f"{via} (a proxy or gateway in the way?): {_short(exc)[:160]}",
            region=region if service == "ec2" else None,
            endpoint=endpoint,
        )
    if isinstance(exc, bx.ProxyConnectionError) and proxy is not None:
        return Ec2Failure(
            "proxy_unreachable",
            f"the EC2 API proxy {proxy.display_url} could not be reached for {name} {where}"
            f"({_short(exc)}): check the ec2_api_proxy the platform sends",
            region=region if service == "ec2" else None,
            endpoint=endpoint,
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                        bx.ReadTimeoutError, bx.HTTPClientError, bx.SSLError)):
        kind: FailureKind = "sts_unreachable" if service == "sts" else "ec2_unreachable"
        return Ec2Failure(
            kind,
            f"the {name} endpoint {endpoint} {where}could not be reached{via} "
            f"({_network_cause(exc)}): "
            f"check the appliance's route, security group and DNS for {endpoint}, "
            f"or the setting {setting}",
            region=region if service == "ec2" else None,
            endpoint=endpoint,
        )
    if isinstance(exc, TimeoutError):
        return Ec2Failure(
            "timeout",
            f"{name} {where}at {endpoint} did not finish within {REGION_TIMEOUT_S:.0f} s",
            region=region,
            endpoint=endpoint,
        )
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        aws_message = str(error.get("Message") or "")
        meta = exc.response.get("ResponseMetadata", {})
        attempts = int(meta.get("RetryAttempts", 0)) + 1
        said = f"{code}: {aws_message}".strip(": ")
        if code in THROTTLING_CODES:
            return Ec2Failure(
                "throttled",
                f"{name} {where}at {endpoint} kept throttling ({code}) after {attempts} attempts "
                "with backoff: the account's API rate limit is used up by other callers; "
                "run the job again later",
                region=region if service == "ec2" else None,
                endpoint=endpoint,
            )
        if service == "sts":
            if code == "AccessDenied":
                return Ec2Failure(
                    "assume_role_denied",
                    _assume_role_advice(selection, aws_message),
                    endpoint=endpoint,
                )
            if code in ("InvalidClientTokenId", "ExpiredToken", "SignatureDoesNotMatch"):
                return Ec2Failure(
                    "no_credentials",
                    f"STS at {endpoint} refused the appliance's own credentials ({said}): "
                    "check the instance profile attached to the appliance's instance",
                    endpoint=endpoint,
                )
            if code == "RegionDisabledException":
                return Ec2Failure(
                    "region_unavailable",
                    f"STS at {endpoint} is not activated for this account ({said}): activate "
                    "the region's STS endpoint in IAM account settings",
                    endpoint=endpoint,
                )
            return Ec2Failure("sts_error", f"STS at {endpoint} answered {said}", endpoint=endpoint)
        if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
            principal = f"the role {selection.role_arn}" if selection.role_arn else (
                "the appliance's instance profile role"
            )
            return Ec2Failure(
                "ec2_denied",
                f"EC2 {where}denied DescribeInstances ({code}): give {principal} "
                "the permission ec2:DescribeInstances",
                region=region,
                endpoint=endpoint,
            )
        if code in ("AuthFailure", "InvalidClientTokenId", "ExpiredToken"):
            return Ec2Failure(
                "ec2_auth_failed",
                f"EC2 {where}at {endpoint} refused the credentials ({said})",
                region=region,
                endpoint=endpoint,
            )
        if code in ("OptInRequired", "UnrecognizedClientException", "InvalidRegion"):
            return Ec2Failure(
                "region_unavailable",
                f"EC2 region {region} is not enabled for the account ({said}): enable the "
                "region or remove it from the job",
                region=region,
                endpoint=endpoint,
            )
        return Ec2Failure(
            "ec2_error", f"EC2 {where}at {endpoint} answered {said}", region=region, endpoint=endpoint
        )
    return Ec2Failure(
        "ec2_error" if service == "ec2" else "sts_error",
        f"{name} {where}at {endpoint} failed: {type(exc).__name__}: {_short(exc)}",
        region=region if service == "ec2" else None,
        endpoint=endpoint,
    )


def _assume_role_advice(selection: Ec2Selection, aws_message: str) -> str:
    # AWS answers the same AccessDenied for an untrusted caller and for a wrong or
    # missing ExternalId, so the advice names both (IAM User Guide, "external ID").
    role = selection.role_arn
    if selection.external_id is not None:
        fix = (
            f"the role's trust policy must allow sts:AssumeRole by this appliance's instance "
            f"role, and its sts:ExternalId condition must equal the job's external_id "
            f"{selection.external_id!r} (an ExternalId mismatch is denied exactly like this)"
        )
    else:
        fix = (
            "the role's trust policy must allow sts:AssumeRole by this appliance's instance "
            "role; if it requires an sts:ExternalId, set external_id in the job "
            "(targets.ec2.external_id is null)"
        )
    said = f" (AWS said: {aws_message})" if aws_message else ""
    return f"AssumeRole on {role} was denied (AccessDenied){said}: {fix}"


def _proxy_refused_credentials(exc: BaseException) -> bool:
    """Whether a proxy answered 407: as an HTTP answer (plain http endpoints are forwarded,
    so botocore parses the proxy's page) or on CONNECT (https endpoints: aiohttp's error)."""
    if isinstance(exc, bx.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 407
    if isinstance(exc, ResponseParserError):
        text = str(exc)
        return "Proxy Authentication Required" in text or "ERR_CACHE_ACCESS_DENIED" in text
    cause = exc.kwargs.get("error") if isinstance(exc, bx.BotoCoreError) else exc
    return isinstance(cause, aiohttp.ClientHttpProxyError) and cause.status == 407


def _network_cause(exc: BaseException) -> str:
    """The cause of a network failure in a few words (refused, timed out, name, TLS)."""
    cause = exc.kwargs.get("error") if isinstance(exc, bx.BotoCoreError) else None
    text = f"{cause!r} {exc}".lower()
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)) or "timeout" in text:
        return "connection timed out"
    if "refused" in text or "connect call failed" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename" in text or "getaddrinfo" in text:
        return "the name does not resolve"
    if isinstance(exc, bx.SSLError) or "certificate" in text or "ssl" in type(cause).__name__.lower():
        return "TLS handshake failed"
    if isinstance(exc, bx.ConnectionClosedError):
        return "the connection was closed"
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --- I/O: STS and EC2 -------------------------------------------------------------------------


# What an STS/EC2 call can fail with; anything else is a bug and propagates.
_AWS_FAILURES = (
    bx.BotoCoreError, bx.ClientError, ResponseParserError, aiohttp.ClientError, TimeoutError,
)


class _CallCounter:
    """Counts HTTP requests (attempts) sent by the clients it is attached to."""

    def __init__(self) -> None:
        self.count = 0

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-send", self._on_send)

    def _on_send(self, **_: Any) -> None:
        self.count += 1
        return None  # None: botocore sends the request as usual


def _session_without_env_proxies() -> aioboto3.Session:
    """An aioboto3 session on botocore's default credential chain, IMDS fetched unproxied.

    botocore's instance-metadata fetcher takes ``HTTP_PROXY`` from the
    environment; the metadata address must never go through a proxy, so its
    fetcher is replaced by one with no proxies (same endpoint, timeout, attempts).
    """
    session = aioboto3.Session()
    try:
        core = session._session  # aioboto3 keeps its AioSession here
        resolver = core.get_component("credential_provider")
        for provider in resolver.providers:
            if getattr(provider, "METHOD", None) == "iam-role":
                old = provider._role_fetcher
                provider._role_fetcher = AioInstanceMetadataFetcher(
                    timeout=old._timeout,
                    num_attempts=old._num_attempts,
                    base_url=old._base_url,
                    user_agent=old._user_agent,
                    config=old._config,
                    session=_unproxied_http_session(old._timeout),
                )
    except AttributeError as exc:
        # Private attributes of aiobotocore moved: keep its own fetcher, and say so
        # (tests/integration/test_ec2_proxy.py catches this on upgrade).
        _log.warning("IMDS credential fetcher left as is (aiobotocore changed: %s); "
                     "HTTP_PROXY in the environment would apply to it", exc)
    return session


def _unproxied_http_session(timeout: float) -> Any:
    from aiobotocore.utils import _RefCountedSession  # the session type the fetcher expects

    return _RefCountedSession(timeout=timeout, proxies={})


def role_session_name_for(job_id: str) -> str:
    """``vsa-<job_id>``: the AssumeRole session name that ties CloudTrail entries to a job."""
    # AWS: 2..64 characters of [\w+=,.@-]; job IDs are [A-Za-z0-9._-]{1,64}.
    cleaned = re.sub(r"[^\w+=,.@-]", "-", job_id)
    return f"{ROLE_SESSION_NAME[:3]}-{cleaned}"[:64]


async def resolve_ec2_targets(
    selection: Ec2Selection,
    *,
    endpoints: AwsEndpoints | None = None,
    proxy: Ec2ApiProxy | None = None,
    own_vpc_ids: Sequence[str] = (),
    own_addresses: Sequence[str] = (),
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    page_size: int = MAX_PAGE_SIZE,
    session: aioboto3.Session | None = None,
    role_session_name: str = ROLE_SESSION_NAME,
) -> Ec2Resolution:
    """Resolve a selection into targets through STS and EC2; never raises for AWS failures.

    ``endpoints`` None uses AWS's defaults; ``proxy`` is the poll response's
    ``ec2_api_proxy`` (None: direct); ``own_vpc_ids``/``own_addresses`` are the
    appliance's own VPC and addresses (for ``overlapping_address``);
    ``max_attempts`` bounds botocore's standard retries (throttling, network);
    ``page_size`` is DescribeInstances' MaxResults (5..1000); ``session`` lets
    a caller supply credentials (tests); by default the instance profile;
    ``role_session_name`` shows in the customer's CloudTrail (see
    :func:`role_session_name_for`).
    Regions are resolved concurrently; a failed region leaves the others' targets.
    """
    endpoints = endpoints or AwsEndpoints()
    page_size = max(MIN_PAGE_SIZE, min(MAX_PAGE_SIZE, page_size))
    session = session or _session_without_env_proxies()
    config = boto_config(proxy, max_attempts=max_attempts)
    counter = _CallCounter()

    creds: dict[str, str] | None = None
    if selection.role_arn is not None:
        assumed = await _assume_role(
            session, selection, endpoints, config, counter, proxy, role_session_name
        )
        if isinstance(assumed, Ec2Failure):
            return Ec2Resolution(failures=(assumed,), api_calls=counter.count)
        creds = assumed

    results = await asyncio.gather(
        *(
            _describe_region(session, region, selection, endpoints, config, counter, proxy,
                             creds, page_size)
            for region in selection.regions
        )
    )
    facts: list[InstanceFacts] = []
    failures: list[Ec2Failure] = []
    resolved: list[str] = []
    for region, result in zip(selection.regions, results, strict=True):
        if isinstance(result, Ec2Failure):
            failures.append(result)
        else:
            resolved.append(region)
            facts.extend(result)
    targets, not_scanned = select_instances(
        facts, selection, own_vpc_ids=own_vpc_ids, own_addresses=own_addresses
    )
    return Ec2Resolution(
        targets=tuple(targets),
        not_scanned=tuple(not_scanned),
        failures=tuple(failures),
        regions_resolved=tuple(resolved),
        api_calls=counter.count,
    )


async def _assume_role(
    session: aioboto3.Session,
    selection: Ec2Selection,
    endpoints: AwsEndpoints,
    config: BotoConfig,
    counter: _CallCounter,
    proxy: Ec2ApiProxy | None,
    role_session_name: str,
) -> dict[str, str] | Ec2Failure:
    """STS AssumeRole into the connector role: temporary credentials, or the failure in words."""
    assert selection.role_arn is not None
    endpoint = endpoints.sts or f"https://sts.{selection.regions[0]}.amazonaws.com"
    kwargs: dict[str, Any] = {
        "RoleArn": selection.role_arn,
        "RoleSessionName": role_session_name,
        "DurationSeconds": ASSUME_ROLE_DURATION_S,
    }
    if selection.external_id is not None:
        kwargs["ExternalId"] = selection.external_id
    try:
        async with asyncio.timeout(REGION_TIMEOUT_S):
            async with session.client(
                "sts", region_name=selection.regions[0], endpoint_url=endpoints.sts, config=config
            ) as sts:
                endpoint = sts.meta.endpoint_url
                counter.attach(sts)
                response = await sts.assume_role(**kwargs)
    except _AWS_FAILURES as exc:
        return describe_failure(
            exc, service="sts", endpoint=endpoint, region=None, selection=selection, proxy=proxy
        )
    credentials = response["Credentials"]
    return {
        "aws_access_key_id": credentials["AccessKeyId"],
        "aws_secret_access_key": credentials["SecretAccessKey"],
        "aws_session_token": credentials["SessionToken"],
    }


async def _describe_region(
    session: aioboto3.Session,
    region: str,
    selection: Ec2Selection,
    endpoints: AwsEndpoints,
    config: BotoConfig,
    counter: _CallCounter,
    proxy: Ec2ApiProxy | None,
    creds: dict[str, str] | None,
    page_size: int,
) -> list[InstanceFacts] | Ec2Failure:
    """Every instance of one region that the server-side filters let through, all pages."""
    endpoint = endpoints.ec2 or f"https://ec2.{region}.amazonaws.com"
    facts: list[InstanceFacts] = []
    try:
        async with asyncio.timeout(REGION_TIMEOUT_S):
            async with session.client(
                "ec2", region_name=region, endpoint_url=endpoints.ec2, config=config,
                **(creds or {}),
            ) as ec2:
                endpoint = ec2.meta.endpoint_url
                counter.attach(ec2)
                paginator = ec2.get_paginator("describe_instances")
                for filters in server_filters(selection):
                    pages = paginator.paginate(
                        Filters=filters, PaginationConfig={"PageSize": page_size}
                    )
                    async for page in pages:
                        for reservation in page.get("Reservations", []):
                            for raw in reservation.get("Instances", []):
                                facts.append(instance_facts(raw, region))
    except _AWS_FAILURES as exc:
        return describe_failure(
            exc, service="ec2", endpoint=endpoint, region=region, selection=selection, proxy=proxy
        )
    return facts
