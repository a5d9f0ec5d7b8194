"""Typed protocol messages: unknown fields ignored, missing/wrong fields named precisely."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from appliance.console import redact
from appliance.platform.messages import (
    JobSpec,
    MessageError,
    PollRequest,
    PollResponse,
    RegisterResponse,
    RunningJob,
)

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
JWE = "eyJhbGciOiJFQ0RILUVTIn0..aXY.Y2lwaGVy.dGFn"

JOB: dict[str, Any] = {
    "job_id": "j-42",
    "type": "vm_scan",
    "title": "Nightly VPC scan",
    "targets": {
        "ips": ["10.77.0.10", "10.77.0.0/28", "10.77.0.20-10.77.0.30"],
        "hostnames": ["web-1.corp.example"],
        "ec2": {
            "role_arn": "arn:aws:iam::111122223333:role/VsaConnector",
            "external_id": "f0d1c2",
            "regions": ["us-east-1"],
            "platform": "vpc_all",
            "vpc_ids": [],
            "instance_ids": None,
            "tags_include": [{"key": "env", "value": "prod"}],
            "tags_exclude": [],
            "include_small_types": False,
            "address": "private",
        },
    },
    "exclude": ["10.77.0.13"],
    "options": {
        "tcp_ports": "standard", "udp_ports": "none", "host_discovery": "default",
        "service_detection": "banner", "rate_pps": 10000, "max_parallel_hosts": 16,
        "host_timeout_s": 900, "authentication": True,
    },
    "auth_records": [JWE],
}


def job(**changes: Any) -> dict[str, Any]:
    """A copy of JOB with dotted-path changes (value None deletes... use DELETE)."""
    spec = copy.deepcopy(JOB)
    for path, value in changes.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return spec


DELETE = object()


def test_register_response_parses_and_ignores_unknown_fields() -> None:
    r = RegisterResponse.parse({"appliance_id": "vsa-7f3c2a", "certificate_pem": CERT, "ca_pem": CERT,
                                "poll_interval_s": 180, "mqtt": None, "future_field": {"x": 1}})
    assert r.appliance_id == "vsa-7f3c2a" and r.poll_interval_s == 180 and r.mqtt is None


def test_register_response_with_mqtt() -> None:
    r = RegisterResponse.parse({"appliance_id": "a", "certificate_pem": CERT, "ca_pem": None, "poll_interval_s": 60,
                                "mqtt": {"url": "mqtts://h:8883", "wake_topic": "vsa/a/wake", "events_topic": "vsa/a/events"}})
    assert r.mqtt is not None and r.mqtt.wake_topic == "vsa/a/wake"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"certificate_pem": CERT, "poll_interval_s": 1}, "appliance_id", "is missing"),
        ({"appliance_id": 5, "certificate_pem": CERT, "poll_interval_s": 1}, "appliance_id", "must be a string"),
        ({"appliance_id": "a", "certificate_pem": "nope", "poll_interval_s": 1}, "certificate_pem", "not a PEM"),
        ({"appliance_id": "a", "certificate_pem": CERT, "poll_interval_s": "180"}, "poll_interval_s", "whole number"),
        ({"appliance_id": "a", "certificate_pem": CERT, "poll_interval_s": True}, "poll_interval_s", "whole number"),
        ({"appliance_id": "a", "certificate_pem": CERT, "poll_interval_s": 1, "mqtt": {"url": "http://x"}}, "mqtt.url", "mqtts"),
    ],
)
def test_register_response_errors_name_the_field(body: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(MessageError) as info:
        RegisterResponse.parse(body)
    assert info.value.field == field
    assert words in str(info.value)


def test_register_response_must_be_an_object() -> None:
    with pytest.raises(MessageError, match="must be a JSON object"):
        RegisterResponse.parse([1, 2])


def test_job_spec_parses_the_protocol_example() -> None:
    spec = JobSpec.parse(JOB)
    assert spec.job_id == "j-42" and spec.type == "vm_scan"
    assert spec.targets.ips[1] == "10.77.0.0/28"
    assert spec.targets.ec2 is not None and spec.targets.ec2.tags_include[0].key == "env"
    assert spec.options.rate_pps == 10000 and spec.options.max_parallel_hosts == 16
    assert spec.auth_records == (JWE,)
    assert "f0d1c2" not in repr(spec)  # the external ID stays out of logs


def test_job_spec_defaults_for_absent_options() -> None:
    spec = JobSpec.parse(job(options=DELETE, exclude=DELETE, auth_records=DELETE, title=DELETE))
    assert spec.options.tcp_ports == "standard" and spec.options.udp_ports == "none"
    assert spec.options.max_parallel_hosts is None and spec.exclude == () and spec.title is None


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"job_id": "j 42"}, "job.job_id", "1-64 characters"),
        ({"job_id": "x" * 65}, "job.job_id", "1-64 characters"),
        ({"job_id": DELETE}, "job.job_id", "is missing"),
        ({"type": "pentest"}, "job.type", "vm_scan, discovery"),
        ({"targets__ips": ["10.77.0.10", "10.77.0.300"]}, "job.targets.ips[1]", "not an IP address"),
        ({"targets__ips": ["10.0.0.0/8"]}, "job.targets.ips[0]", "more than the 65,536"),
        ({"targets__ips": "10.0.0.1"}, "job.targets.ips", "must be a list"),
        ({"targets__hostnames": ["bad host"]}, "job.targets.hostnames[0]", "not a valid host name"),
        ({"targets__ec2__role_arn": "role/x"}, "job.targets.ec2.role_arn", "IAM role ARN"),
        ({"targets__ec2__regions": []}, "job.targets.ec2.regions", "is empty"),
        ({"targets__ec2__regions": ["Mars"]}, "job.targets.ec2.regions[0]", "not an AWS region"),
        ({"targets__ec2__platform": "vpc_selected"}, "job.targets.ec2.vpc_ids", "vpc_selected"),
        ({"targets__ec2__instance_ids": ["x-1"]}, "job.targets.ec2.instance_ids[0]", "not an instance ID"),
        ({"targets__ec2__tags_include": [{"key": "env"}]}, "job.targets.ec2.tags_include[0].value", "is missing"),
        ({"targets__ec2__address": "elastic"}, "job.targets.ec2.address", "private, public"),
        ({"exclude": ["nope"]}, "job.exclude[0]", "not an IP address"),
        ({"options__tcp_ports": "22,99999"}, "job.options.tcp_ports", "outside 1-65535"),
        ({"options__udp_ports": "x"}, "job.options.udp_ports", "neither a port"),
        ({"options__rate_pps": 0}, "job.options.rate_pps", "between 1 and"),
        ({"options__rate_pps": "fast"}, "job.options.rate_pps", "whole number"),
        ({"options__max_parallel_hosts": 1000}, "job.options.max_parallel_hosts", "between 1 and 256"),
        ({"options__host_timeout_s": -1}, "job.options.host_timeout_s", "between 1 and"),
        ({"options__authentication": "yes"}, "job.options.authentication", "true or false"),
        ({"options__host_discovery": "ping"}, "job.options.host_discovery", "default, none"),
        ({"options__service_detection": "deep"}, "job.options.service_detection", "banner, nmap"),
        ({"auth_records": ["plain text"]}, "job.auth_records[0]", "compact serialization"),
        ({"auth_records": [7]}, "job.auth_records[0]", "must be a string"),
    ],
)
def test_job_spec_errors_name_the_field(changes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(MessageError) as info:
        JobSpec.parse(job(**changes))
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)


def test_job_without_any_target_is_refused() -> None:
    with pytest.raises(MessageError, match="no targets"):
        JobSpec.parse(job(targets={"ips": [], "hostnames": [], "ec2": None}))


def test_poll_response_keeps_good_jobs_and_sets_bad_ones_apart() -> None:
    bad = job(job_id="j-43", options__rate_pps=-5)
    nameless = {"type": "vm_scan"}
    r = PollResponse.parse({"poll_interval_s": 60, "jobs": [JOB, bad, nameless], "cancel_jobs": ["j-41"],
                            "ec2_api_proxy": None, "signatures": None, "new": True})
    assert [j.job_id for j in r.jobs] == ["j-42"]
    assert [i.job_id for i in r.invalid_jobs] == ["j-43", None]
    assert "jobs[1].options.rate_pps" in r.invalid_jobs[0].message
    assert r.cancel_jobs == ("j-41",)


def test_poll_response_minimal_and_errors() -> None:
    assert PollResponse.parse({"poll_interval_s": 180}).jobs == ()
    with pytest.raises(MessageError, match="poll_interval_s is missing"):
        PollResponse.parse({"jobs": []})
    with pytest.raises(MessageError, match=r"cancel_jobs\[0\]"):
        PollResponse.parse({"poll_interval_s": 1, "cancel_jobs": ["bad id"]})


def test_ec2_api_proxy_password_is_a_secret() -> None:
    r = PollResponse.parse({"poll_interval_s": 60, "ec2_api_proxy": {
        "url": "http://10.90.2.28:3129", "username": "scanner", "password": "Proxy-Secret-99"}})
    assert r.ec2_api_proxy is not None
    assert "Proxy-Secret-99" not in repr(r.ec2_api_proxy)
    assert r.ec2_api_proxy.display() == "http://scanner:***@10.90.2.28:3129"
    assert redact("pw Proxy-Secret-99") == "pw ***"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("/vsa/v1/signatures/2026.12.04.1", True),
        ("https://platform.example:8443/vsa/v1/signatures/1", True),
        ("https://evil.example/vsa/v1/signatures/1", False),
        ("//evil.example/x", False),
        ("signatures/1", False),
    ],
)
def test_signatures_url_must_be_on_the_platform_origin(url: str, ok: bool) -> None:
    body = {"poll_interval_s": 60, "signatures": {"version": "2026.12.04.1", "url": url, "sha256": "ab" * 32,
                                                  "signature": "c2ln"}}
    if ok:
        offer = PollResponse.parse(body, origin="https://platform.example:8443").signatures
        assert offer is not None and offer.url.startswith("/vsa/v1/signatures/")
    else:
        # Only the offer is refused (the jobs of the same poll still run): said with the field.
        body["jobs"] = [{"job_id": "j-1", "type": "discovery", "targets": {"ips": ["10.77.0.10"]}}]
        response = PollResponse.parse(body, origin="https://platform.example:8443")
        assert response.signatures is None and [j.job_id for j in response.jobs] == ["j-1"]
        assert response.signatures_refused is not None
        assert response.signatures_refused.error.field == "signatures.url"
        assert response.signatures_refused.message.startswith("signatures 2026.12.04.1 refused: ")
        assert response.signatures_refused.message.endswith("the installed bundle stays in use")


def test_poll_request_wire_form() -> None:
    req = PollRequest(appliance_id="vsa-1", instance_id="i-0abc", software_version="0.1.0", signatures_version=None,
                      lan_ip="10.0.0.5", status="scanning",
                      running_jobs=(RunningJob("j-42", 120, 37),), spool_pending=3)
    assert req.to_json() == {
        "appliance_id": "vsa-1", "instance_id": "i-0abc", "software_version": "0.1.0", "signatures_version": None,
        "lan_ip": "10.0.0.5", "status": "scanning",
        "running_jobs": [{"job_id": "j-42", "hosts_total": 120, "hosts_done": 37}], "spool_pending": 3,
    }
