"""EC2 target resolution against moto's real server process, denials from a real fault proxy.

One moto server per module, seeded once (resolution only reads): two regions,
four VPCs, tags, a terminated instance, a t3.nano, public and private subnets,
an address that overlaps across VPCs, and more instances than one page holds
(moto pages by reservation, so the paged VPC's instances are launched one per call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aioboto3
import pytest
from conftest import require

from appliance.aws.ec2 import (
    AwsEndpoints,
    Ec2ApiProxy,
    Ec2Resolution,
    parse_ec2_selection,
    resolve_ec2_targets,
)
from appliance.console import redact
from appliance.lab.awsfaults import AwsFaultProxy
from appliance.lab.moto import (
    LAB_ACCESS_KEY_ID,
    LAB_SECRET_ACCESS_KEY,
    Ec2Seeder,
    MotoServer,
    free_port,
)

ROLE = "arn:aws:iam::123456789012:role/VsaConnector"
EAST, WEST = "us-east-1", "eu-west-1"
PAGED_COUNT = 12
PAGE_SIZE = 5


@dataclass
class Fleet:
    """What the module's moto holds, by name."""

    server: MotoServer
    vpc_a: str = ""  # us-east-1, the appliance's own VPC, 10.1.0.0/16, paged instances
    vpc_b: str = ""  # us-east-1, public subnet, team=web
    vpc_c: str = ""  # eu-west-1, 10.3.0.0/16
    vpc_d: str = ""  # eu-west-1, 10.1.0.0/16 again: overlaps vpc_a
    paged: list[str] = field(default_factory=list)  # vpc_a, launched one per call
    prod: set[str] = field(default_factory=set)
    dev: set[str] = field(default_factory=set)
    keep_no: str = ""  # vpc_a, env=prod but keep=no
    nano: str = ""
    terminated: str = ""
    web: list[str] = field(default_factory=list)  # vpc_b, public
    west: list[str] = field(default_factory=list)  # vpc_c
    overlap_inside: str = ""  # vpc_a 10.1.0.100
    overlap_outside: str = ""  # vpc_d 10.1.0.100

    def all_in(self, *vpcs: str) -> set[str]:
        """Every instance ID the fleet launched in these VPCs."""
        by_vpc = {
            self.vpc_a: {*self.paged, self.keep_no, self.nano, self.terminated, self.overlap_inside},
            self.vpc_b: set(self.web),
            self.vpc_c: set(self.west),
            self.vpc_d: {self.overlap_outside},
        }
        return set().union(*(by_vpc[v] for v in vpcs))


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """moto_server seeded with the module's fleet, stopped at the end."""
    try:
        server = MotoServer().start()
    except Exception as exc:  # noqa: BLE001 - reported through require()
        require(False, f"moto_server cannot start: {exc}")
        raise
    try:
        seed = Ec2Seeder(server)
        f = Fleet(server)
        f.vpc_a = seed.vpc(EAST, "10.1.0.0/16")
        sub_a = seed.subnet(EAST, f.vpc_a, "10.1.0.0/20")
        for i in range(PAGED_COUNT):
            env = "prod" if i % 2 == 0 else "dev"
            (iid,) = seed.launch(sub_a, tags={"env": env, "Name": f"a-{i}"})
            f.paged.append(iid)
            (f.prod if env == "prod" else f.dev).add(iid)
        (f.keep_no,) = seed.launch(sub_a, tags={"env": "prod", "keep": "no"})
        (f.nano,) = seed.launch(sub_a, instance_type="t3.nano", tags={"env": "prod"})
        (f.terminated,) = seed.launch(sub_a, tags={"env": "prod"})
        seed.terminate(EAST, [f.terminated])
        (f.overlap_inside,) = seed.launch(sub_a, private_ip="10.1.0.100")

        f.vpc_b = seed.vpc(EAST, "10.2.0.0/16")
        sub_b = seed.subnet(EAST, f.vpc_b, "10.2.0.0/24", public=True)
        f.web = seed.launch(sub_b, count=3, tags={"team": "web"})

        f.vpc_c = seed.vpc(WEST, "10.3.0.0/16")
        sub_c = seed.subnet(WEST, f.vpc_c, "10.3.0.0/24")
        f.west = seed.launch(sub_c, count=2, tags={"env": "prod"})
        f.vpc_d = seed.vpc(WEST, "10.1.0.0/16")
        sub_d = seed.subnet(WEST, f.vpc_d, "10.1.0.0/24")
        (f.overlap_outside,) = seed.launch(sub_d, private_ip="10.1.0.100")
        yield f
    finally:
        server.stop()


@pytest.fixture
def lab_session() -> aioboto3.Session:
    """The appliance's 'own' credentials, as the instance profile would give them."""
    return aioboto3.Session(
        aws_access_key_id=LAB_ACCESS_KEY_ID, aws_secret_access_key=LAB_SECRET_ACCESS_KEY
    )


@pytest.fixture
async def faults(fleet: Fleet) -> AsyncIterator[AwsFaultProxy]:
    """A fresh fault proxy in front of the module's moto."""
    proxy = AwsFaultProxy(upstream=fleet.server.url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def selection(**overrides: object) -> object:
    raw: dict[str, object] = {
        "role_arn": None,
        "external_id": None,
        "regions": [EAST, WEST],
        "platform": "vpc_all",
        "vpc_ids": [],
        "instance_ids": None,
        "tags_include": [],
        "tags_exclude": [],
        "include_small_types": False,
        "address": "private",
    }
    raw.update(overrides)
    return parse_ec2_selection(raw)


async def resolve(endpoint: str, session: aioboto3.Session, **kw: object) -> Ec2Resolution:
    sel = kw.pop("sel")
    return await resolve_ec2_targets(
        sel,  # type: ignore[arg-type]
        endpoints=AwsEndpoints(sts=kw.pop("sts", endpoint), ec2=kw.pop("ec2", endpoint)),  # type: ignore[arg-type]
        session=session,
        **kw,  # type: ignore[arg-type]
    )


def ids(items: object) -> set[str]:
    return {getattr(t, "instance_id", None) or t.target.instance_id for t in items}  # type: ignore[attr-defined, union-attr]


def by_reason(res: Ec2Resolution, reason: str) -> set[str]:
    return {n.target.instance_id for n in res.not_scanned if n.reason == reason}  # type: ignore[misc]


# --- selection rules against real DescribeInstances answers -----------------------------------


async def test_vpc_all_two_regions_pages_excludes_and_overlap(
    fleet: Fleet, faults: AwsFaultProxy, lab_session: aioboto3.Session
) -> None:
    res = await resolve(
        faults.url, lab_session, sel=selection(), page_size=PAGE_SIZE, own_vpc_ids=[fleet.vpc_a]
    )
    assert res.ok and res.message is None and res.completion_reason is None
    assert set(res.regions_resolved) == {EAST, WEST}

    everything = fleet.all_in(fleet.vpc_a, fleet.vpc_b, fleet.vpc_c, fleet.vpc_d)
    assert by_reason(res, "terminated") == {fleet.terminated}
    assert by_reason(res, "small_instance_type") == {fleet.nano}
    # Same private address in two VPCs: the one outside the appliance's VPC is unreachable.
    assert by_reason(res, "overlapping_address") == {fleet.overlap_outside}
    assert {n.status for n in res.not_scanned if n.reason == "overlapping_address"} == {"unreachable"}
    assert fleet.overlap_inside in ids(res.targets)
    assert ids(res.targets) == everything - {fleet.terminated, fleet.nano, fleet.overlap_outside}
    # moto's default VPCs hold nothing; every instance is accounted for exactly once.
    assert len(res.targets) + len(res.not_scanned) == len(everything)

    # More instances than one page: us-east-1 took several DescribeInstances pages.
    east_pages = [r for r in faults.requests if r.action == "DescribeInstances" and r.region == EAST]
    assert len(east_pages) >= (PAGED_COUNT + 7) // PAGE_SIZE
    assert res.api_calls == len(faults.requests)

    target = next(t for t in res.targets if t.instance_id == fleet.paged[0])
    assert target.ip == "10.1.0.4" and target.region == EAST and target.vpc_id == fleet.vpc_a
    assert target.subnet_id and target.subnet_id.startswith("subnet-")
    assert target.instance_type == "t3.large" and target.image_id == "ami-12c6146b"
    assert target.state == "running" and target.private_dns == "ip-10-1-0-4.ec2.internal"
    assert target.tags == {"env": "prod", "Name": "a-0"}
    assert target.host_key == fleet.paged[0]
    wire = res.not_scanned[0].host_result().to_wire()
    assert wire["status"] in ("excluded", "unreachable") and wire["host_key"].startswith("i-")


async def test_overlap_without_knowing_own_vpc_marks_both(
    fleet: Fleet, lab_session: aioboto3.Session
) -> None:
    res = await resolve(fleet.server.url, lab_session, sel=selection())
    assert by_reason(res, "overlapping_address") == {fleet.overlap_inside, fleet.overlap_outside}


async def test_include_small_types(fleet: Fleet, lab_session: aioboto3.Session) -> None:
    res = await resolve(fleet.server.url, lab_session, sel=selection(include_small_types=True))
    assert fleet.nano in ids(res.targets)
    assert by_reason(res, "terminated") == {fleet.terminated}  # never scanned, whatever the flag


async def test_vpc_selected(fleet: Fleet, lab_session: aioboto3.Session) -> None:
    res = await resolve(
        fleet.server.url, lab_session,
        sel=selection(platform="vpc_selected", vpc_ids=[fleet.vpc_b, fleet.vpc_c]),
    )
    assert res.ok
    assert ids(res.targets) == set(fleet.web) | set(fleet.west)
    assert res.not_scanned == ()


async def test_classic_selects_only_instances_without_a_vpc(
    fleet: Fleet, lab_session: aioboto3.Session
) -> None:
    # moto, like AWS today, launches every instance into a VPC: classic selects none.
    res = await resolve(fleet.server.url, lab_session, sel=selection(platform="classic"))
    assert res.ok and res.targets == () and res.not_scanned == ()


async def test_instance_ids_narrow_across_regions(
    fleet: Fleet, lab_session: aioboto3.Session
) -> None:
    wanted = [fleet.paged[3], fleet.west[0], fleet.terminated, "i-0000000000000000a"]
    res = await resolve(fleet.server.url, lab_session, sel=selection(instance_ids=wanted))
    assert res.ok  # an unknown ID is not an error: it simply matches nothing
    assert ids(res.targets) == {fleet.paged[3], fleet.west[0]}
    assert by_reason(res, "terminated") == {fleet.terminated}


async def test_tags_include_and_exclude(fleet: Fleet, lab_session: aioboto3.Session) -> None:
    res = await resolve(
        fleet.server.url, lab_session,
        sel=selection(
            tags_include=[{"key": "env", "value": "prod"}, {"key": "team", "value": "web"}],
            tags_exclude=[{"key": "keep", "value": "no"}],
        ),
    )
    expected = fleet.prod | set(fleet.web) | set(fleet.west)
    assert ids(res.targets) == expected
    assert fleet.keep_no not in ids(res.targets) | ids(res.not_scanned)
    assert not (fleet.dev & (ids(res.targets) | ids(res.not_scanned)))
    assert by_reason(res, "small_instance_type") == {fleet.nano}


async def test_address_public_and_private(fleet: Fleet, lab_session: aioboto3.Session) -> None:
    sel = selection(platform="vpc_selected", vpc_ids=[fleet.vpc_b], address="public")
    res = await resolve(fleet.server.url, lab_session, sel=sel)
    assert ids(res.targets) == set(fleet.web)
    for t in res.targets:
        assert t.public_dns and t.ip == t.public_dns  # the public DNS name first
        assert t.public_ip and t.private_dns
    private = await resolve(
        fleet.server.url, lab_session,
        sel=selection(platform="vpc_selected", vpc_ids=[fleet.vpc_b], address="private"),
    )
    assert {t.ip for t in private.targets} <= {f"10.2.0.{i}" for i in range(4, 255)}


async def test_default_credential_chain(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # role_arn null: the appliance's own credentials from botocore's default chain.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LAB_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LAB_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    sel = selection(regions=[WEST], platform="vpc_selected", vpc_ids=[fleet.vpc_c])
    res = await resolve_ec2_targets(
        sel, endpoints=AwsEndpoints(sts=fleet.server.url, ec2=fleet.server.url)  # type: ignore[arg-type]
    )
    assert res.ok and ids(res.targets) == set(fleet.west)


# --- STS: AssumeRole, ExternalId, denials ------------------------------------------------------


async def test_assume_role_with_external_id(
    fleet: Fleet, faults: AwsFaultProxy, lab_session: aioboto3.Session
) -> None:
    faults.external_ids[ROLE] = "f0d1c2"
    res = await resolve(
        faults.url, lab_session,
        sel=selection(role_arn=ROLE, external_id="f0d1c2", regions=[WEST]),
    )
    assert res.ok and ids(res.targets) >= set(fleet.west)
    sts = [r for r in faults.requests if r.action == "AssumeRole"]
    assert [(r.role_arn, r.external_id, r.fault) for r in sts] == [(ROLE, "f0d1c2", None)]
    # EC2 was called with the assumed role's credentials, not the appliance's own.
    assert faults.count("DescribeInstances") >= 1


async def test_external_id_mismatch_is_denied_in_words(
    fleet: Fleet, faults: AwsFaultProxy, lab_session: aioboto3.Session
) -> None:
    faults.external_ids[ROLE] = "the-right-one"
    res = await resolve(
        faults.url, lab_session,
        sel=selection(role_arn=ROLE, external_id="a-wrong-one", regions=[EAST, WEST]),
    )
    assert not res.ok and res.completion_reason == "target_resolution_failed"
    assert res.targets == () and res.not_scanned == ()
    (failure,) = res.failures
    assert failure.kind == "assume_role_denied"
    message = res.message or ""
    assert ROLE in message and "AccessDenied" in message
    assert "trust policy" in message and "sts:ExternalId" in message and "'a-wrong-one'" in message
    assert faults.count("DescribeInstances") == 0  # nothing pretends to be resolved


async def test_untrusted_role_without_external_id(
    fleet: Fleet, faults: AwsFaultProxy, lab_session: aioboto3.Session
) -> None:
    faults.deny_roles.add(ROLE)
    res = await resolve(faults.url, lab_session, sel=selection(role_arn=ROLE))
    (failure,) = res.failures
    assert failure.kind == "assume_role_denied"
    assert "trust policy" in failure.message and "external_id" in failure.message
    assert "is not authorized to perform: sts:AssumeRole" in failure.message  # AWS's own words


async def test_sts_unreachable_names_the_endpoint(
    fleet: Fleet, lab_session: aioboto3.Session
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    res = await resolve(
        fleet.server.url, lab_session, sel=selection(role_arn=ROLE), sts=closed, max_attempts=2
    )
    (failure,) = res.failures
    assert failure.kind == "sts_unreachable" and failure.endpoint == closed
    assert f"STS endpoint {closed} could not be reached" in (res.message or "")
    assert "connection refused" in (res.message or "")


# --- EC2: unreachable, denied per region, throttled -------------------------------------------


async def test_ec2_endpoint_unreachable_says_so(
    fleet: Fleet, lab_session: aioboto3.Session
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    res = await resolve(
        fleet.server.url, lab_session, sel=selection(role_arn=ROLE, regions=[EAST]), ec2=closed,
        max_attempts=2,
    )
    assert res.completion_reason == "target_resolution_failed" and res.targets == ()
    (failure,) = res.failures
    assert failure.kind == "ec2_unreachable" and failure.region == EAST
    message = res.message or ""
    assert f"EC2 endpoint {closed} in {EAST} could not be reached directly" in message
    assert "connection refused" in message and "AWS_ENDPOINT_URL_EC2" in message
    assert res.api_calls == 1 + 2  # AssumeRole, then two bounded attempts


async def test_one_region_denied_keeps_the_other(
    fleet: Fleet, faults: AwsFaultProxy, lab_session: aioboto3.Session
) -> None:
    faults.deny_ec2_regions.add(WEST)
    res = await resolve(faults.url, lab_session, sel=selection(role_arn=ROLE))
    (failure,) = res.failures
    assert failure.kind == "ec2_denied" and failure.region == WEST
    assert "ec2:DescribeInstances" in failure.message and ROLE in failure.message
    assert res.regions_resolved == (EAST,)
    assert fleet.paged[0] in ids(res.targets) and not set(fleet.west) & ids(res.targets)


async def test_throttling_is_retried_with_backoff(
    fleet: Fleet, faults: AwsFaultProxy, lab_session: aioboto3.Session
) -> None:
    faults.throttle["DescribeInstances"] = 2
    faults.throttle["AssumeRole"] = 1
    res = await resolve(
        faults.url, lab_session, sel=selection(role_arn=ROLE, regions=[WEST]), max_attempts=4
    )
    assert res.ok and set(fleet.west) <= ids(res.targets)
    assert faults.count("DescribeInstances", fault=True) == 2
    assert faults.count("AssumeRole", fault=True) == 1


async def test_throttling_beyond_the_bound_fails_in_words(
    fleet: Fleet, faults: AwsFaultProxy, lab_session: aioboto3.Session
) -> None:
    faults.throttle["DescribeInstances"] = 100
    res = await resolve(faults.url, lab_session, sel=selection(regions=[WEST]), max_attempts=3)
    (failure,) = res.failures
    assert failure.kind == "throttled" and failure.region == WEST
    assert "RequestLimitExceeded" in failure.message and "after 3 attempts" in failure.message
    assert faults.count("DescribeInstances") == 3  # bounded


async def test_proxy_password_never_in_words(fleet: Fleet, lab_session: aioboto3.Session) -> None:
    password = "s3cr3t-proxy-pass"
    proxy = Ec2ApiProxy.from_wire(
        {"url": f"http://127.0.0.1:{free_port()}", "username": "scanner", "password": password}
    )
    assert proxy is not None and password not in repr(proxy)
    res = await resolve(
        fleet.server.url, lab_session, sel=selection(regions=[WEST]), proxy=proxy, max_attempts=1
    )
    (failure,) = res.failures
    assert failure.kind == "proxy_unreachable" and proxy.url in failure.message
    assert password not in (res.message or "") and password not in repr(res)
    assert redact(f"x {password} y") == "x *** y"  # registered as a secret
