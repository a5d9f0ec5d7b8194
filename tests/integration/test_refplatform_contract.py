"""Contract: the appliance's own typed messages and the reference platform agree on the wire.

Request bodies built by ``appliance.platform.messages`` and ``appliance.results``
validate against docs/openapi.yaml and are accepted by the platform; every
response of the platform parses with the appliance's validators.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.lab.platform import Platform, PlatformServer
from appliance.lab.platform.client import LabAppliance
from appliance.lab.platform.schemas import schema_errors
from appliance.platform.messages import (
    Capabilities,
    JobSpec,
    PollRequest,
    PollResponse,
    RegisterRequest,
    RegisterResponse,
    RunningJob,
)
from appliance.results import (
    AuthOutcome,
    Finding,
    HostResult,
    OsInfo,
    Package,
    Packages,
    Port,
    Target,
)

INSTANCE = "i-0123456789abcdef0"


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[tuple[Platform, PlatformServer]]:
    platform = Platform.init(tmp_path / "p", poll_interval_s=60)
    async with PlatformServer(platform) as server:
        yield platform, server
    platform.close()


async def test_appliance_messages_and_platform_agree(lab: tuple[Platform, PlatformServer]) -> None:
    platform, server = lab
    a = LabAppliance(server.url, platform.ca_file, INSTANCE)
    register = RegisterRequest(
        perscode=platform.create_perscode(), csr_pem=a.csr_pem,
        instance={"instance_id": INSTANCE, "region": "us-east-1", "account_id": None,
                  "availability_zone": None, "image_id": None, "instance_type": None,
                  "private_ip": "10.0.0.5", "mac": None, "vpc_id": None, "subnet_id": None},
        identity_document=None, identity_pkcs7=None, software_version="0.1.0",
        capabilities=Capabilities(raw_sockets=False, cpus=2, memory_mb=2048, arch="x86_64",
                                  max_parallel_hosts=8),
    ).to_json()
    assert schema_errors("RegisterRequest", register) is None
    reply = await a.request("POST", "/vsa/v1/register", register, with_cert=False)
    assert reply.status == 201
    registered = RegisterResponse.parse(reply.body)
    a.appliance_id, a.certificate_pem = registered.appliance_id, registered.certificate_pem
    a.cert_file.write_text(a.certificate_pem)

    platform.set_ec2_api_proxy("http://10.90.2.28:3129", None, None)
    platform.publish_signatures([{"id": "CVE-2024-0001"}])
    job_id = platform.submit_job({
        "title": "contract", "targets": {"ips": ["10.77.0.10"], "hostnames": ["web.lab"],
                                         "ec2": {"regions": ["us-east-1"], "tags_include": [{"key": "env", "value": "prod"}]}},
        "auth_records": [{"type": "unix", "id": "rec-1", "username": "u", "password": "p4ssword",
                          "targets": ["10.77.0.0/24"]}],
    })
    poll = PollRequest(appliance_id=registered.appliance_id, instance_id=None, software_version="0.1.0",
                       signatures_version=None, lan_ip=None, status="scanning",
                       running_jobs=(RunningJob("j-other", 3, 1),), spool_pending=2).to_json()
    assert schema_errors("PollRequest", poll) is None
    reply = await a.request("POST", "/vsa/v1/poll", poll)
    assert reply.status == 200
    parsed = PollResponse.parse(reply.body, origin=server.url)
    assert [j.job_id for j in parsed.jobs] == [job_id] and parsed.invalid_jobs == ()
    assert parsed.signatures is not None and parsed.ec2_api_proxy is not None

    accepted = await a.accept(job_id)
    job = JobSpec.parse(accepted.body["job"])
    assert a.decrypt(job.auth_records[0])["password"] == "p4ssword"

    result = HostResult(
        target=Target(ip="10.77.0.10", instance_id=INSTANCE, region="us-east-1", tags={"Name": "web-1"}),
        status="scanned", started_at="2026-12-04T10:00:00Z", finished_at="2026-12-04T10:01:12Z",
        ports=[Port("tcp", 22, service="ssh", banner="SSH-2.0-OpenSSH_9.2p1")],
        os=OsInfo(family="linux", name="Debian GNU/Linux", version="12", source="ssh"),
        auth=[AuthOutcome("rec-1", "unix", "success", privileged=True)],
        packages=Packages("dpkg", "Debian:12", (Package("libssl3", "3.0.15-1~deb12u1", "amd64",
                                                         "openssl", "3.0.15-1~deb12u1"),)),
        findings=[Finding("CVE-2024-0001", "osv", 4, "t", package="libssl3", source_package="openssl",
                          installed="3.0.15-1~deb12u1", fixed="3.0.15-1~deb12u2")],
    ).to_wire()
    assert schema_errors("HostResult", result) is None
    assert (await a.put_host(job_id, result)).status == 201
    done = await a.complete(job_id, [INSTANCE])
    assert done.status == 200
