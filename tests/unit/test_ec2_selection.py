"""Pure EC2 selection logic: parsing targets.ec2, server-side filters, the JobSpec rules, words."""

from __future__ import annotations

from typing import Any

import botocore.exceptions as bx
import pytest
from botocore.parsers import ResponseParserError

from appliance.aws.ec2 import (
    MAX_FILTER_VALUES,
    AwsEndpoints,
    Ec2ApiProxy,
    Ec2Error,
    Ec2Failure,
    Ec2Resolution,
    Ec2Selection,
    Ec2SelectionError,
    InstanceFacts,
    TagFilter,
    boto_config,
    describe_failure,
    instance_facts,
    parse_ec2_selection,
    role_session_name_for,
    select_instances,
    server_filters,
)
from appliance.config import Config
from appliance.console import redact

ROLE = "arn:aws:iam::111122223333:role/VsaConnector"


def spec(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "role_arn": ROLE,
        "external_id": "f0d1c2",
        "regions": ["us-east-1"],
        "platform": "vpc_all",
        "vpc_ids": [],
        "instance_ids": None,
        "tags_include": [{"key": "env", "value": "prod"}],
        "tags_exclude": [],
        "include_small_types": False,
        "address": "private",
    }
    raw.update(overrides)
    return raw


def sel(**overrides: Any) -> Ec2Selection:
    parsed = parse_ec2_selection(spec(**overrides))
    assert parsed is not None
    return parsed


# --- parsing ---------------------------------------------------------------------------------


def test_protocol_example_parses() -> None:
    s = sel()
    assert s.role_arn == ROLE and s.external_id == "f0d1c2" and s.regions == ("us-east-1",)
    assert s.platform == "vpc_all" and s.instance_ids is None and s.address == "private"
    assert s.tags_include == (TagFilter("env", "prod"),) and not s.include_small_types


def test_null_and_defaults() -> None:
    assert parse_ec2_selection(None) is None
    s = parse_ec2_selection({"regions": ["eu-west-1"]})
    assert s == Ec2Selection(regions=("eu-west-1",))


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"role_arn": "VsaConnector"}, "targets.ec2.role_arn", "IAM role ARN"),
        ({"role_arn": 7}, "targets.ec2.role_arn", "non-empty string"),
        ({"role_arn": None}, "targets.ec2.external_id", "needs a role"),
        ({"external_id": "x"}, "targets.ec2.external_id", "2 to 1224"),
        ({"external_id": "has space"}, "targets.ec2.external_id", "2 to 1224"),
        ({"regions": []}, "targets.ec2.regions", "at least one region"),
        ({"regions": "us-east-1"}, "targets.ec2.regions", "list of strings"),
        ({"regions": ["us-east-1", "Mars"]}, "targets.ec2.regions", "'Mars'"),
        ({"platform": "vpc"}, "targets.ec2.platform", "vpc_all, vpc_selected, classic"),
        ({"platform": "vpc_selected"}, "targets.ec2.vpc_ids", "is empty"),
        ({"vpc_ids": ["vpc-12"]}, "targets.ec2.vpc_ids", "not a VPC ID"),
        ({"instance_ids": ["i-zz"]}, "targets.ec2.instance_ids", "not an instance ID"),
        ({"instance_ids": "i-0123456789abcdef0"}, "targets.ec2.instance_ids", "list"),
        ({"tags_include": [{"value": "x"}]}, "targets.ec2.tags_include[0].key", "non-empty"),
        ({"tags_exclude": ["env"]}, "targets.ec2.tags_exclude[0]", "object"),
        ({"tags_exclude": [{"key": "a", "value": 3}]}, "targets.ec2.tags_exclude[0].value", "string"),
        ({"include_small_types": "yes"}, "targets.ec2.include_small_types", "true or false"),
        ({"address": "elastic"}, "targets.ec2.address", "private or public"),
    ],
)
def test_errors_name_the_field(overrides: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(Ec2SelectionError) as caught:
        parse_ec2_selection(spec(**overrides))
    assert caught.value.field == field
    assert str(caught.value).startswith(field) and words in str(caught.value)


def test_missing_regions_and_wrong_type() -> None:
    with pytest.raises(Ec2SelectionError, match=r"targets.ec2.regions is missing"):
        parse_ec2_selection({"role_arn": None})
    with pytest.raises(Ec2SelectionError, match=r"targets.ec2 must be an object or null"):
        parse_ec2_selection(["us-east-1"])


def test_duplicates_collapse_and_tag_without_value() -> None:
    s = sel(regions=["us-east-1", "us-east-1"], tags_include=[{"key": "env"}, {"key": "env"}])
    assert s.regions == ("us-east-1",) and s.tags_include == (TagFilter("env", None),)


# --- server-side filters ---------------------------------------------------------------------


def test_filters_vpc_selected_and_single_key_tags() -> None:
    s = sel(platform="vpc_selected", vpc_ids=["vpc-0123456789abcdef0"],
            tags_include=[{"key": "env", "value": "prod"}, {"key": "env", "value": "qa"}])
    assert server_filters(s) == [[
        {"Name": "vpc-id", "Values": ["vpc-0123456789abcdef0"]},
        {"Name": "tag:env", "Values": ["prod", "qa"]},
    ]]


def test_filters_keep_or_semantics_or_send_nothing() -> None:
    # Different keys with values: EC2 would AND them, the job means OR: filtered in code only.
    s = sel(tags_include=[{"key": "env", "value": "prod"}, {"key": "team", "value": "web"}])
    assert server_filters(s) == [[]]
    keys_only = sel(tags_include=[{"key": "team"}, {"key": "env"}])
    assert server_filters(keys_only) == [[{"Name": "tag-key", "Values": ["env", "team"]}]]


def test_filters_chunk_instance_ids_and_empty_list_calls_nothing() -> None:
    ids = [f"i-{n:017x}" for n in range(MAX_FILTER_VALUES + 1)]
    calls = server_filters(sel(tags_include=[], instance_ids=ids))
    assert [len(c[0]["Values"]) for c in calls] == [MAX_FILTER_VALUES, 1]
    assert all(c[0]["Name"] == "instance-id" for c in calls)
    assert server_filters(sel(instance_ids=[])) == []


# --- the JobSpec rules -----------------------------------------------------------------------


def facts(n: int, **kw: Any) -> InstanceFacts:
    base: dict[str, Any] = {
        "instance_id": f"i-{n:017x}", "region": "us-east-1", "state": "running",
        "instance_type": "t3.large", "vpc_id": "vpc-aaaaaaaa", "subnet_id": "subnet-1",
        "image_id": "ami-1", "private_ip": f"10.0.0.{n}", "public_ip": None,
        "private_dns": f"ip-10-0-0-{n}.ec2.internal", "public_dns": None, "tags": {},
    }
    base.update(kw)
    return InstanceFacts(**base)


def reasons(not_scanned: list[Any]) -> dict[str, str]:
    return {n.target.instance_id: f"{n.status}/{n.reason}" for n in not_scanned}


def test_terminated_small_and_flags() -> None:
    s = sel(tags_include=[])
    fleet = [facts(1), facts(2, state="terminated", private_ip=None), facts(3, state="shutting-down"),
             facts(4, instance_type="t3.nano"), facts(5, instance_type="m1.small"),
             facts(6, instance_type="t1.micro"), facts(7, instance_type="t2.nano"),
             facts(8, state="stopped")]
    targets, rest = select_instances(fleet, s)
    assert [t.instance_id for t in targets] == [facts(1).instance_id, facts(8).instance_id]
    assert reasons(rest) == {
        facts(2).instance_id: "excluded/terminated", facts(3).instance_id: "excluded/terminated",
        **{facts(n).instance_id: "excluded/small_instance_type" for n in (4, 5, 6, 7)},
    }
    # a terminated small instance is `terminated`; include_small_types scans the small ones
    targets, rest = select_instances(fleet, sel(tags_include=[], include_small_types=True))
    assert len(targets) == 6 and len(rest) == 2


def test_platforms_ids_and_tags() -> None:
    classic = facts(1, vpc_id=None)
    in_a, in_b = facts(2, vpc_id="vpc-aaaaaaaa"), facts(3, vpc_id="vpc-bbbbbbbb")
    fleet = [classic, in_a, in_b]

    def chosen(s: Ec2Selection) -> set[str | None]:
        targets, rest = select_instances(fleet, s)
        return {t.instance_id for t in targets} | {n.target.instance_id for n in rest}

    assert chosen(sel(tags_include=[])) == {in_a.instance_id, in_b.instance_id}
    assert chosen(sel(tags_include=[], platform="classic")) == {classic.instance_id}
    assert chosen(sel(tags_include=[], platform="vpc_selected", vpc_ids=["vpc-bbbbbbbb"])) == {
        in_b.instance_id}
    assert chosen(sel(tags_include=[], instance_ids=[in_a.instance_id])) == {in_a.instance_id}

    tagged = [facts(1, tags={"env": "prod"}), facts(2, tags={"team": "web", "env": "dev"}),
              facts(3, tags={"env": "prod", "keep": "no"}), facts(4, tags={})]
    s = sel(tags_include=[{"key": "env", "value": "prod"}, {"key": "team"}],
            tags_exclude=[{"key": "keep", "value": "no"}])
    targets, _ = select_instances(tagged, s)
    assert [t.instance_id for t in targets] == [tagged[0].instance_id, tagged[1].instance_id]


def test_address_public_prefers_dns_then_ip_else_unreachable() -> None:
    s = sel(tags_include=[], address="public")
    fleet = [facts(1, public_dns="ec2-54-1-1-1.compute-1.amazonaws.com", public_ip="54.1.1.1"),
             facts(2, public_ip="54.1.1.2"), facts(3)]
    targets, rest = select_instances(fleet, s)
    assert [t.ip for t in targets] == ["ec2-54-1-1-1.compute-1.amazonaws.com", "54.1.1.2"]
    assert reasons(rest) == {facts(3).instance_id: "unreachable/no_public_address"}


def test_overlapping_addresses() -> None:
    own = "vpc-aaaaaaaa"
    inside = facts(1, private_ip="10.0.0.9", vpc_id=own)
    outside = facts(2, private_ip="10.0.0.9", vpc_id="vpc-bbbbbbbb")
    other = facts(3, private_ip="10.0.0.9", vpc_id="vpc-cccccccc")
    s = sel(tags_include=[])
    targets, rest = select_instances([outside, inside], s, own_vpc_ids=[own])
    assert [t.instance_id for t in targets] == [inside.instance_id]
    assert reasons(rest) == {outside.instance_id: "unreachable/overlapping_address"}
    # neither in the appliance's VPC: which one answers cannot be known, so neither is scanned
    targets, rest = select_instances([outside, other], s, own_vpc_ids=[own])
    assert targets == [] and len(rest) == 2
    # an instance elsewhere carrying the appliance's own address
    clash = facts(4, private_ip="10.0.0.5", vpc_id="vpc-bbbbbbbb")
    mine = facts(5, private_ip="10.0.0.5", vpc_id=own)
    targets, rest = select_instances([clash], s, own_vpc_ids=[own], own_addresses=["10.0.0.5"])
    assert targets == [] and reasons(rest) == {clash.instance_id: "unreachable/overlapping_address"}
    targets, _ = select_instances([mine], s, own_vpc_ids=[own], own_addresses=["10.0.0.5"])
    assert [t.instance_id for t in targets] == [mine.instance_id]


def test_duplicate_instance_ids_counted_once() -> None:
    targets, rest = select_instances([facts(1), facts(1)], sel(tags_include=[]))
    assert len(targets) == 1 and rest == []


def test_instance_facts_from_describe_output() -> None:
    raw = {
        "InstanceId": "i-0abc0abc0abc0abc0", "State": {"Code": 16, "Name": "running"},
        "InstanceType": "c5.large", "VpcId": "vpc-1", "SubnetId": "subnet-1", "ImageId": "ami-1",
        "PrivateIpAddress": "10.0.0.7", "PrivateDnsName": "ip-10-0-0-7.ec2.internal",
        "PublicDnsName": "", "Tags": [{"Key": "Name", "Value": "web-1"}],
    }
    f = instance_facts(raw, "us-east-1")
    assert f.public_dns is None and f.public_ip is None and f.tags == {"Name": "web-1"}
    (target,), _ = select_instances([f], sel(tags_include=[]))
    assert target.to_wire() == {
        "ip": "10.0.0.7", "hostname": None, "instance_id": "i-0abc0abc0abc0abc0",
        "region": "us-east-1", "vpc_id": "vpc-1", "subnet_id": "subnet-1",
        "instance_type": "c5.large", "image_id": "ami-1", "state": "running",
        "private_dns": "ip-10-0-0-7.ec2.internal", "public_dns": None, "public_ip": None,
        "tags": {"Name": "web-1"},
    }


# --- endpoints, proxy, client configuration --------------------------------------------------


def test_endpoints_from_config() -> None:
    cfg = Config(sts_endpoint="http://127.0.0.1:5000", ec2_endpoint=None)
    assert AwsEndpoints.from_config(cfg) == AwsEndpoints(sts="http://127.0.0.1:5000", ec2=None)


def test_proxy_url_encoding_and_secret() -> None:
    proxy = Ec2ApiProxy.from_wire(
        {"url": "http://10.90.2.28:3129", "username": "scan ner", "password": "p@ss:w/rd"})
    assert proxy is not None
    assert proxy.botocore_url() == "http://scan%20ner:p%40ss%3Aw%2Frd@10.90.2.28:3129"
    assert "p@ss:w/rd" not in repr(proxy) and redact("p@ss:w/rd") == "***"
    assert Ec2ApiProxy.from_wire(None) is None
    with pytest.raises(Ec2Error, match="must not carry credentials"):
        Ec2ApiProxy(url="http://u:p@10.0.0.1:3128")
    with pytest.raises(Ec2Error, match="http:// URL"):
        Ec2ApiProxy(url="10.0.0.1:3128")


def test_boto_config_never_reads_environment_proxies() -> None:
    # An explicit mapping (even empty) stops botocore from calling get_environ_proxies().
    assert boto_config(None).proxies == {}
    proxied = boto_config(Ec2ApiProxy(url="http://10.0.0.1:3128")).proxies
    assert proxied == {"http": "http://10.0.0.1:3128", "https": "http://10.0.0.1:3128"}
    assert boto_config(None, max_attempts=3).retries == {"mode": "standard", "total_max_attempts": 3}


# --- failures in words -----------------------------------------------------------------------


def client_error(code: str, message: str = "", status: int = 400, retries: int = 0) -> bx.ClientError:
    return bx.ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": retries}},
        "DescribeInstances",
    )


def words(exc: BaseException, service: str = "ec2", **kw: Any) -> Ec2Failure:
    return describe_failure(
        exc, service=service, endpoint=kw.get("endpoint", "https://ec2.eu-west-1.amazonaws.com"),  # type: ignore[arg-type]
        region="eu-west-1", selection=kw.get("selection", sel()), proxy=kw.get("proxy"),
    )


def test_failure_words() -> None:
    f = words(client_error("AccessDenied", "not authorized"), "sts")
    assert f.kind == "assume_role_denied" and ROLE in f.message and "'f0d1c2'" in f.message
    f = words(client_error("AccessDenied"), "sts", selection=sel(external_id=None))
    assert "external_id is null" in f.message
    f = words(client_error("UnauthorizedOperation"))
    assert f.kind == "ec2_denied" and "ec2:DescribeInstances" in f.message and f.region == "eu-west-1"
    f = words(client_error("RequestLimitExceeded", status=503, retries=3))
    assert f.kind == "throttled" and "after 4 attempts" in f.message
    f = words(client_error("OptInRequired"))
    assert f.kind == "region_unavailable" and "enable the region" in f.message
    f = words(bx.NoCredentialsError())
    assert f.kind == "no_credentials" and "instance profile" in f.message
    f = words(bx.ConnectTimeoutError(endpoint_url="https://ec2.eu-west-1.amazonaws.com"))
    assert f.kind == "ec2_unreachable" and "connection timed out" in f.message
    assert "https://ec2.eu-west-1.amazonaws.com in eu-west-1 could not be reached directly" in f.message
    proxy = Ec2ApiProxy(url="http://10.0.0.1:3128")
    f = words(bx.EndpointConnectionError(endpoint_url="x", error=OSError("refused")), proxy=proxy)
    assert "through the EC2 API proxy http://10.0.0.1:3128" in f.message
    f = words(ResponseParserError("<html>Proxy Authentication Required</html>"), proxy=proxy)
    assert f.kind == "proxy_denied" and "username and password" in f.message
    f = words(ResponseParserError("<html>captive portal</html>"))
    assert f.kind == "ec2_error" and "not an AWS response" in f.message


def test_resolution_message_and_reason() -> None:
    ok = Ec2Resolution()
    assert ok.ok and ok.message is None and ok.completion_reason is None
    bad = Ec2Resolution(failures=(Ec2Failure("sts_unreachable", "the STS endpoint X could not be reached"),))
    assert bad.completion_reason == "target_resolution_failed"
    assert bad.message == "EC2 targets could not be resolved: the STS endpoint X could not be reached"


def test_role_session_name_for_job() -> None:
    assert role_session_name_for("j-42") == "vsa-j-42"
    assert len(role_session_name_for("x" * 64)) == 64
