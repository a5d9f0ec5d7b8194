"""Schemathesis against the reference platform, driven by docs/openapi.yaml.

Property-based requests (valid and invalid) to every operation, over mutual TLS
with a registered appliance's certificate; each response must not be a 5xx,
must have a documented status code and content type, and must match the
documented schema. Bounded examples keep the run well under a minute.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from appliance.lab.platform import Platform, PlatformThread
from appliance.lab.platform.client import LabAppliance, host_result

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
# Bounded for CI; raise by hand for a deeper search (VSA_SCHEMATHESIS_EXAMPLES=1000).
MAX_EXAMPLES = int(os.environ.get("VSA_SCHEMATHESIS_EXAMPLES", "60"))
SEED = int(os.environ.get("VSA_SCHEMATHESIS_SEED", "20261204"))
REQUEST_TIMEOUT_S = 10

CONFIG = SchemathesisConfig.from_dict({
    "seed": SEED,
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
    # 410 (canceled job) and 413 (body over the documented limit) are refusals too.
    "checks": {"negative_data_rejection": {"expected-statuses": [
        "400", "401", "403", "404", "405", "409", "410", "413", "415", "429", "503"]}},
})
schema = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


class Lab:
    """The platform thread, a registered appliance's TLS session, and a job it holds."""

    def __init__(self, root: Path) -> None:
        self.platform = Platform.init(root / "platform", poll_interval_s=60)
        self.thread = PlatformThread(self.platform.data_dir).start()
        self.appliance = LabAppliance(self.thread.url, self.platform.ca_file, "i-0123456789abcdef0",
                                      workdir=root)
        assert asyncio.run(self.appliance.register(self.platform.create_perscode())).status == 201
        self.platform.publish_signatures([{"id": "CVE-2024-0001"}], version="2026.12.04.1")
        self.job_id = self.platform.submit_job({"targets": {"ips": ["10.77.0.10"]}})
        assert asyncio.run(self.appliance.accept(self.job_id)).status == 200
        assert asyncio.run(self.appliance.put_host(self.job_id, host_result("10.77.0.10"))).status == 201
        self.session = requests.Session()
        self.session.verify = str(self.platform.ca_file)
        self.session.cert = (str(self.appliance.cert_file), str(self.appliance.key_file))

    def close(self) -> None:
        self.session.close()
        self.thread.stop()
        self.platform.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("schemathesis"))
    yield lab
    lab.close()


def _aim_at_known_state(case: schemathesis.Case, lab: Lab, rng: random.Random) -> None:
    """Half of the valid cases address the held job / published bundle, to reach the deep paths."""
    if rng.random() < 0.5:
        return
    params = case.path_parameters or {}
    if "job_id" in params:
        params["job_id"] = lab.job_id
    if "version" in params:
        params["version"] = "2026.12.04.1"
    if "host_key" in params and isinstance(case.body, dict):
        case.body["host_key"] = params["host_key"]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_platform_conforms_to_openapi(case: schemathesis.Case, lab: Lab) -> None:
    """No 5xx; documented status codes, content types, headers and bodies; invalid data refused."""
    checks = list(CHECKS)
    if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    else:
        _aim_at_known_state(case, lab, random.Random(repr(case.path_parameters) + repr(case.body)[:64]))
    # verify/cert are passed per call as well: schemathesis sets requests' verify
    # itself, which would override the session's.
    case.call_and_validate(base_url=lab.thread.url, session=lab.session, checks=checks,
                           timeout=REQUEST_TIMEOUT_S, verify=lab.session.verify, cert=lab.session.cert)


def _operation(method: str, path: str) -> str:
    parts = path.split("/")
    if len(parts) >= 5 and parts[3] == "jobs":
        return f"{method} jobs/{parts[-1] if parts[-2] != 'hosts' else 'hosts'}"
    return f"{method} {'/'.join(parts[3:4])}"


def test_schemathesis_reached_every_operation_and_deep_state(lab: Lab) -> None:
    """Runs after the property tests (file order): every operation answered, some past validation."""
    rows = lab.platform.requests()
    answered = {(_operation(r["method"], r["path"]), r["status"]) for r in rows}
    operations = {op for op, _ in answered}
    assert {"POST register", "POST poll", "GET signatures", "POST jobs/accept", "PUT jobs/hosts",
            "POST jobs/progress", "POST jobs/complete"} <= operations
    # Beyond validation: stored host results, downloads and accepts happened.
    assert ("PUT jobs/hosts", 201) in answered or ("PUT jobs/hosts", 200) in answered
    assert ("GET signatures", 200) in answered
    assert ("POST poll", 200) in answered
    assert not any(r["status"] >= 500 for r in rows)
