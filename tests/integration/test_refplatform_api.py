"""The reference platform over real TLS: every endpoint and error of PROTOCOL.md.

The server runs on 127.0.0.1, port 0, with its own CA; the tests play appliances
with real P-256 keys, CSRs and client certificates (LabAppliance).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from joserfc import jwe

from appliance.lab.platform import Platform, PlatformServer
from appliance.lab.platform.client import LabAppliance, host_result, poll_body, register_body
from appliance.lab.platform.server import REGISTER_LIMIT_BYTES

I1 = "i-0aaaaaaaaaaaaaaa1"
I2 = "i-0bbbbbbbbbbbbbbb2"
UNIX_RECORD = {"type": "unix", "id": "rec-1", "title": "Linux fleet", "username": "scanner",
               "password": "Sup3r-secret-pw", "private_keys": [], "root_delegation": {"method": "sudo",
               "password": None}, "port": 22, "targets": ["10.77.0.0/24"]}


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    p = Platform.init(tmp_path / "platform", poll_interval_s=45)
    yield p
    p.close()


@pytest.fixture
async def server(platform: Platform) -> AsyncIterator[PlatformServer]:
    async with PlatformServer(platform, host="127.0.0.1", port=0) as srv:
        yield srv


def appliance(server: PlatformServer, platform: Platform, instance_id: str = I1) -> LabAppliance:
    return LabAppliance(server.url, platform.ca_file, instance_id)


async def registered(server: PlatformServer, platform: Platform, instance_id: str = I1) -> LabAppliance:
    a = appliance(server, platform, instance_id)
    reply = await a.register(platform.create_perscode())
    assert reply.status == 201, reply.body
    return a


# -- register ----------------------------------------------------------------------------


async def test_register_issues_a_client_certificate(server: PlatformServer, platform: Platform) -> None:
    a = appliance(server, platform)
    reply = await a.register(platform.create_perscode())
    assert reply.status == 201
    body = reply.body
    assert set(body) == {"appliance_id", "certificate_pem", "ca_pem", "poll_interval_s", "mqtt"}
    assert body["ca_pem"] == platform.ca_pem
    assert body["poll_interval_s"] == 45
    assert body["mqtt"] is None
    cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    ca = x509.load_pem_x509_certificate(platform.ca_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == body["appliance_id"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    own_public = serialization.load_pem_private_key(a.key_pem, None).public_key()
    assert cert.public_key() == own_public
    listed = platform.list_appliances()
    assert [x["appliance_id"] for x in listed] == [body["appliance_id"]]
    assert listed[0]["instance_id"] == I1
    logged = platform.requests(path="/vsa/v1/register")
    assert [(r["status"], r["appliance_id"]) for r in logged] == [(201, body["appliance_id"])]


async def test_register_announces_mqtt_when_configured(server: PlatformServer, platform: Platform) -> None:
    platform.set_mqtt("mqtts://127.0.0.1:8883")
    a = appliance(server, platform)
    reply = await a.register(platform.create_perscode())
    aid = reply.body["appliance_id"]
    assert reply.body["mqtt"] == {"url": "mqtts://127.0.0.1:8883", "wake_topic": f"vsa/{aid}/wake",
                                  "events_topic": f"vsa/{aid}/events"}


async def test_register_ignores_unknown_fields(server: PlatformServer, platform: Platform) -> None:
    a = appliance(server, platform)
    reply = await a.register(platform.create_perscode(), future_field={"x": 1})
    assert reply.status == 201


def _csr(key: object) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b.pop("perscode"), "invalid_request"),
        (lambda b: b.pop("csr_pem"), "invalid_request"),
        (lambda b: b.pop("instance"), "invalid_request"),
        (lambda b: b["instance"].update(instance_id=42), "invalid_request"),
        (lambda b: b.update(perscode="short"), "invalid_request"),
        (lambda b: b.update(software_version=None), "invalid_request"),
        (lambda b: b.update(capabilities={"cpus": "two"}), "invalid_request"),
        (lambda b: b.update(csr_pem="not a csr"), "invalid_csr"),
        (lambda b: b.update(csr_pem=_csr(rsa.generate_private_key(65537, 2048))), "invalid_csr"),
        (lambda b: b.update(csr_pem=_csr(ec.generate_private_key(ec.SECP384R1()))), "invalid_csr"),
        (lambda b: b.update(identity_document=json.dumps({"instanceId": I2})), "identity_mismatch"),
    ],
)
async def test_register_refuses_malformed_requests(
    server: PlatformServer, platform: Platform, mutate: object, code: str
) -> None:
    a = appliance(server, platform)
    body = register_body(platform.create_perscode(), a.csr_pem, I1)
    mutate(body)  # type: ignore[operator]
    reply = await a.request("POST", "/vsa/v1/register", body, with_cert=False)
    assert reply.status == 400
    assert reply.body["error"] == code and reply.body["message"]
    assert platform.list_appliances() == []


async def test_register_error_messages_never_echo_the_perscode(
    server: PlatformServer, platform: Platform
) -> None:
    a = appliance(server, platform)
    body = register_body("bad code with spaces!", a.csr_pem, I1)
    reply = await a.request("POST", "/vsa/v1/register", body, with_cert=False)
    assert reply.status == 400
    assert "bad code" not in reply.body["message"]


async def test_register_body_syntax_media_type_and_size(server: PlatformServer, platform: Platform) -> None:
    a = appliance(server, platform)
    reply = await a.request("POST", "/vsa/v1/register", raw_body=b"{not json",
                            headers={"Content-Type": "application/json"}, with_cert=False)
    assert (reply.status, reply.body["error"]) == (400, "invalid_json")
    reply = await a.request("POST", "/vsa/v1/register", raw_body=b"[1, 2]",
                            headers={"Content-Type": "application/json"}, with_cert=False)
    assert (reply.status, reply.body["error"]) == (400, "invalid_request")
    reply = await a.request("POST", "/vsa/v1/register", raw_body=b"{}",
                            headers={"Content-Type": "text/plain"}, with_cert=False)
    assert (reply.status, reply.body["error"]) == (415, "unsupported_media_type")
    huge = json.dumps(register_body("12345678", a.csr_pem, I1, padding="x" * REGISTER_LIMIT_BYTES))
    reply = await a.request("POST", "/vsa/v1/register", raw_body=huge.encode(),
                            headers={"Content-Type": "application/json"}, with_cert=False)
    assert (reply.status, reply.body["error"]) == (413, "payload_too_large")


async def test_register_unknown_or_revoked_code_is_403(server: PlatformServer, platform: Platform) -> None:
    a = appliance(server, platform)
    reply = await a.register("99999999999999")
    assert (reply.status, reply.body["error"]) == (403, "invalid_perscode")
    code = platform.create_perscode()
    platform.revoke_perscode(code)
    reply = await a.register(code)
    assert (reply.status, reply.body["error"]) == (403, "invalid_perscode")


async def test_code_bound_to_another_instance_is_409(server: PlatformServer, platform: Platform) -> None:
    code = platform.create_perscode()
    first = appliance(server, platform, I1)
    assert (await first.register(code)).status == 201
    clone = appliance(server, platform, I2)
    reply = await clone.register(code)
    assert (reply.status, reply.body["error"]) == (409, "perscode_in_use")
    assert I1 in reply.body["message"] and I2 in reply.body["message"]
    # The original keeps working.
    assert (await first.poll()).status == 200


async def test_reregistration_supersedes_the_old_certificate(server: PlatformServer, platform: Platform) -> None:
    code = platform.create_perscode()
    old = appliance(server, platform, I1)
    assert (await old.register(code)).status == 201
    assert (await old.poll()).status == 200
    new = appliance(server, platform, I1)  # same instance, fresh key (after vsa reset)
    reply = await new.register(code)
    assert reply.status == 201
    assert new.appliance_id == old.appliance_id  # its jobs stay its own
    stale = await old.poll()
    assert (stale.status, stale.body["error"]) == (401, "unknown_appliance")
    assert (await new.poll()).status == 200
    assert platform.list_appliances()[0]["registrations"] == 2


async def test_mtls_endpoints_without_certificate_are_401(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    for method, path, body in (
        ("POST", "/vsa/v1/poll", poll_body(a.appliance_id, I1)),
        ("POST", "/vsa/v1/jobs/j-1/accept", {}),
        ("PUT", "/vsa/v1/jobs/j-1/hosts/10.0.0.1", host_result("10.0.0.1")),
        ("POST", "/vsa/v1/jobs/j-1/progress", {"phase": "scanning", "hosts_total": 1, "hosts_done": 0}),
        ("POST", "/vsa/v1/jobs/j-1/complete", {}),
        ("GET", "/vsa/v1/signatures/1", None),
    ):
        reply = await a.request(method, path, body, with_cert=False)
        assert (reply.status, reply.body["error"]) == (401, "unknown_appliance"), path


async def test_certificate_from_another_ca_fails_the_handshake(
    server: PlatformServer, platform: Platform, tmp_path: Path
) -> None:
    other = Platform.init(tmp_path / "other")
    try:
        stranger = LabAppliance(server.url, platform.ca_file, I2)
        stranger.certificate_pem = other.ca.sign_csr(stranger.csr_pem, "vsa-evil").pem
        stranger.cert_file.write_text(stranger.certificate_pem)
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await stranger.poll()
    finally:
        other.close()


async def test_forgotten_appliance_gets_401_then_registers_again(
    server: PlatformServer, platform: Platform
) -> None:
    code = platform.create_perscode()
    a = appliance(server, platform)
    await a.register(code)
    aid = a.appliance_id
    platform.forget_appliance(aid)
    reply = await a.poll()
    assert (reply.status, reply.body["error"]) == (401, "unknown_appliance")
    a.new_key()
    assert (await a.register(code)).status == 201
    assert a.appliance_id == aid
    assert (await a.poll()).status == 200


# -- poll --------------------------------------------------------------------------------


async def test_poll_records_the_heartbeat_and_answers_settings(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    platform.set_ec2_api_proxy("http://10.90.2.28:3129", "scanner", "proxy-pw")
    reply = await a.poll(status="scanning", signatures_version="2026.12.01.1", spool_pending=3,
                         running_jobs=[{"job_id": "j-9", "hosts_total": 4, "hosts_done": 1}])
    assert reply.status == 200
    assert reply.body == {"poll_interval_s": 45, "jobs": [], "cancel_jobs": [],
                          "ec2_api_proxy": {"url": "http://10.90.2.28:3129", "username": "scanner",
                                            "password": "proxy-pw"},
                          "signatures": None}
    seen = platform.appliance(a.appliance_id)
    assert seen["polls"] == 1 and seen["last_poll_at"]
    assert seen["heartbeat"]["status"] == "scanning"
    assert seen["heartbeat"]["spool_pending"] == 3
    assert seen["heartbeat"]["running_jobs"] == [{"job_id": "j-9", "hosts_total": 4, "hosts_done": 1}]
    platform.set_poll_interval(600, appliance_id=a.appliance_id)
    assert (await a.poll()).body["poll_interval_s"] == 600


@pytest.mark.parametrize("field", ["status", "running_jobs", "spool_pending", "software_version"])
async def test_poll_missing_required_field_is_400(server: PlatformServer, platform: Platform, field: str) -> None:
    a = await registered(server, platform)
    body = poll_body(a.appliance_id, I1)
    del body[field]
    reply = await a.request("POST", "/vsa/v1/poll", body)
    assert (reply.status, reply.body["error"]) == (400, "invalid_request")
    assert field in reply.body["message"]


async def test_poll_wrong_type_is_400(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    reply = await a.poll(status="busy")
    assert reply.status == 400
    reply = await a.poll(spool_pending="3")
    assert reply.status == 400


# -- jobs, accept ----------------------------------------------------------------------------


async def test_accept_race_first_wins(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform, I1)
    b = await registered(server, platform, I2)
    job_id = platform.submit_job({"targets": {"ips": ["10.77.0.10"]}})
    offers_a = (await a.poll()).body["jobs"]
    offers_b = (await b.poll()).body["jobs"]
    assert [j["job_id"] for j in offers_a] == [job_id] == [j["job_id"] for j in offers_b]
    ra, rb = await asyncio.gather(a.accept(job_id), b.accept(job_id))
    statuses = sorted([ra.status, rb.status])
    assert statuses == [200, 409]
    winner, loser = (a, b) if ra.status == 200 else (b, a)
    lost = rb if ra.status == 200 else ra
    assert lost.body["error"] == "job_taken"
    again = await winner.accept(job_id)
    assert again.status == 200 and again.body["job"]["job_id"] == job_id
    assert (await loser.accept(job_id)).body["error"] == "job_taken"
    # A held job is offered to nobody.
    assert (await a.poll()).body["jobs"] == [] and (await b.poll()).body["jobs"] == []
    put = await loser.put_host(job_id, host_result("10.77.0.10"))
    assert (put.status, put.body["error"]) == (409, "job_not_accepted")
    assert platform.results(job_id)["holder"] == winner.appliance_id


async def test_accept_unknown_job_404_and_empty_body(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    reply = await a.accept("j-nope")
    assert (reply.status, reply.body["error"]) == (404, "unknown_job")
    job_id = platform.submit_job({"targets": {"ips": ["10.77.0.10"]}})
    reply = await a.request("POST", f"/vsa/v1/jobs/{job_id}/accept")  # no body at all
    assert reply.status == 200


async def test_job_for_other_appliances_is_not_offered(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform, I1)
    b = await registered(server, platform, I2)
    job_id = platform.submit_job({"targets": {"ips": ["10.77.0.10"]}}, appliances=[a.appliance_id])
    assert [j["job_id"] for j in (await a.poll()).body["jobs"]] == [job_id]
    assert (await b.poll()).body["jobs"] == []
    assert (await b.accept(job_id)).body["error"] == "job_taken"


async def test_offered_jobspec_is_complete_and_auth_records_are_jwe(
    server: PlatformServer, platform: Platform
) -> None:
    a = await registered(server, platform, I1)
    b = await registered(server, platform, I2)
    job_id = platform.submit_job({"title": "t", "targets": {"ips": ["10.77.0.0/28"]},
                                  "auth_records": [UNIX_RECORD]})
    job_a = (await a.poll()).body["jobs"][0]
    job_b = (await b.poll()).body["jobs"][0]
    assert set(job_a) == {"job_id", "type", "title", "targets", "exclude", "options", "auth_records"}
    assert job_a["options"]["tcp_ports"] == "standard"
    token_a, token_b = job_a["auth_records"][0], job_b["auth_records"][0]
    assert token_a != token_b
    for token in (token_a, token_b):
        header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
        assert header["alg"] == "ECDH-ES" and header["enc"] == "A256GCM"
        assert token.split(".")[1] == ""  # ECDH-ES direct: empty encrypted key
    assert a.decrypt(token_a) == UNIX_RECORD
    assert b.decrypt(token_b) == UNIX_RECORD
    with pytest.raises(Exception):  # noqa: B017 - joserfc raises its own error types
        a.decrypt(token_b)
    # The offer's copy is the accepted copy; the same appliance gets the same JWE.
    assert (await a.poll()).body["jobs"][0]["auth_records"] == [token_a]
    accepted = await a.accept(job_id)
    assert accepted.body["job"] == job_a
    # joserfc's own decrypt with the appliance's key, as the daemon does it.
    from joserfc.jwk import ECKey

    plain = jwe.decrypt_compact(token_a, ECKey.import_key(a.key_pem)).plaintext
    assert json.loads(plain) == UNIX_RECORD


async def test_offer_is_reencrypted_after_reregistration(server: PlatformServer, platform: Platform) -> None:
    code = platform.create_perscode()
    a = appliance(server, platform)
    await a.register(code)
    platform.submit_job({"targets": {"ips": ["10.77.0.10"]}, "auth_records": [UNIX_RECORD]})
    first = (await a.poll()).body["jobs"][0]["auth_records"][0]
    a.new_key()
    await a.register(code)
    second = (await a.poll()).body["jobs"][0]["auth_records"][0]
    assert second != first
    assert a.decrypt(second) == UNIX_RECORD


# -- host results, progress, complete -------------------------------------------------------


async def accepted_job(server: PlatformServer, platform: Platform, ips: list[str]) -> tuple[LabAppliance, str]:
    a = await registered(server, platform)
    job_id = platform.submit_job({"targets": {"ips": ips}})
    assert (await a.accept(job_id)).status == 200
    return a, job_id


async def test_put_host_is_idempotent(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])
    first = await a.put_host(job_id, host_result("10.77.0.10"))
    assert first.status == 201
    assert first.body["job_id"] == job_id and first.body["host_key"] == "10.77.0.10"
    changed = host_result("10.77.0.10", status="down")
    second = await a.put_host(job_id, changed)
    assert second.status == 200
    report = platform.results(job_id)
    assert report["hosts"]["10.77.0.10"]["status"] == "down"
    assert report["host_puts"] == {"10.77.0.10": 2}
    path = f"/vsa/v1/jobs/{job_id}/hosts/10.77.0.10"
    assert platform.count_requests(method="PUT", path=path) == 2


async def test_put_host_instance_id_key(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])
    result = host_result("i-0123456789abcdef0", ip="10.77.0.10")
    assert (await a.put_host(job_id, result)).status == 201


@pytest.mark.parametrize(
    ("path_key", "mutate", "code"),
    [
        ("10.77.0.10", lambda r: r.pop("status"), "invalid_request"),
        ("10.77.0.10", lambda r: r.update(status="fine"), "invalid_request"),
        ("10.77.0.10", lambda r: r.update(ports=[{"proto": "tcp", "port": 70000, "state": "open"}]),
         "invalid_request"),
        ("10.77.0.10", lambda r: r.update(findings=[{"id": "CVE-1", "source": "osv", "severity": 9,
                                                     "title": "x"}]), "invalid_request"),
        ("10.77.0.11", lambda r: None, "host_key_mismatch"),
        ("not-a-host", lambda r: r.update(host_key="not-a-host"), "invalid_host_key"),
    ],
)
async def test_put_host_refuses_malformed_results(
    server: PlatformServer, platform: Platform, path_key: str, mutate: object, code: str
) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])
    result = host_result("10.77.0.10")
    mutate(result)  # type: ignore[operator]
    reply = await a.request("PUT", f"/vsa/v1/jobs/{job_id}/hosts/{path_key}", result)
    assert (reply.status, reply.body["error"]) == (400, code)
    assert platform.results(job_id)["hosts"] == {}


async def test_job_endpoints_unknown_and_not_accepted(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    reply = await a.put_host("j-unknown", host_result("10.77.0.10"))
    assert (reply.status, reply.body["error"]) == (404, "unknown_job")
    reply = await a.complete("j-unknown", [])
    assert (reply.status, reply.body["error"]) == (404, "unknown_job")
    reply = await a.progress("j-unknown", "scanning", 1, 0)
    assert (reply.status, reply.body["error"]) == (404, "unknown_job")
    job_id = platform.submit_job({"targets": {"ips": ["10.77.0.10"]}})
    reply = await a.put_host(job_id, host_result("10.77.0.10"))
    assert (reply.status, reply.body["error"]) == (409, "job_not_accepted")
    reply = await a.complete(job_id, [])
    assert (reply.status, reply.body["error"]) == (409, "job_not_accepted")


async def test_progress_is_recorded(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])
    reply = await a.progress(job_id, "scanning", 120, 37)
    assert reply.status == 204 and reply.raw == b""
    assert platform.results(job_id)["progress"]["hosts_done"] == 37
    reply = await a.progress(job_id, "scanning", 1, 2)
    assert reply.status == 400
    reply = await a.progress(job_id, "sleeping", 1, 0)
    assert reply.status == 400


async def test_complete_reports_missing_hosts_then_succeeds(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10-10.77.0.12"])
    keys = ["10.77.0.10", "10.77.0.11", "10.77.0.12"]
    await a.put_host(job_id, host_result(keys[0]))
    reply = await a.complete(job_id, keys)
    assert reply.status == 409
    assert reply.body["error"] == "missing_hosts"
    assert reply.body["host_keys"] == keys[1:]
    assert platform.results(job_id)["state"] == "accepted"
    for key in keys[1:]:
        assert (await a.put_host(job_id, host_result(key))).status == 201
    reply = await a.complete(job_id, keys)
    assert reply.status == 200
    assert reply.body == {"job_id": job_id, "status": "finished", "hosts_received": 3}
    report = platform.results(job_id)
    assert report["state"] == "completed"
    assert report["completion"]["host_keys"] == keys
    assert set(report["hosts"]) == set(keys)
    # A retried completion (the 200 was lost) is answered 200 again.
    assert (await a.complete(job_id, keys)).status == 200
    assert (await a.accept(job_id)).status == 200


async def test_complete_failed_with_reason(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])
    reply = await a.complete(job_id, [], status="failed", reason="target_resolution_failed")
    assert reply.status == 200
    assert platform.results(job_id)["completion"]["reason"] == "target_resolution_failed"
    bad = await a.complete(job_id, [], status="failed", reason="bored")
    assert bad.status == 400


async def test_lose_hosts_fault_forces_one_missing_hosts(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10", "10.77.0.11"])
    keys = ["10.77.0.10", "10.77.0.11"]
    for key in keys:
        await a.put_host(job_id, host_result(key))
    platform.lose_hosts(job_id, count=1)
    reply = await a.complete(job_id, keys)
    assert (reply.status, reply.body["host_keys"]) == (409, ["10.77.0.10"])
    assert (await a.put_host(job_id, host_result("10.77.0.10"))).status == 201
    assert (await a.complete(job_id, keys)).status == 200


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_of_a_held_job(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])
    platform.cancel_job(job_id)
    running = [{"job_id": job_id, "hosts_total": 1, "hosts_done": 0}]
    assert (await a.poll(running_jobs=running)).body["cancel_jobs"] == [job_id]
    # Repeated while the appliance still says it runs the job, not after.
    assert (await a.poll(running_jobs=running)).body["cancel_jobs"] == [job_id]
    assert (await a.poll()).body["cancel_jobs"] == []
    for reply in (await a.put_host(job_id, host_result("10.77.0.10")),
                  await a.complete(job_id, ["10.77.0.10"]),
                  await a.progress(job_id, "scanning", 1, 0),
                  await a.accept(job_id)):
        assert (reply.status, reply.body["error"]) == (410, "job_canceled")


async def test_cancel_of_an_offered_job(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform, I1)
    b = await registered(server, platform, I2)
    job_id = platform.submit_job({"targets": {"ips": ["10.77.0.10"]}})
    assert (await a.poll()).body["jobs"]
    platform.cancel_job(job_id)
    first = (await a.poll()).body
    assert first["jobs"] == [] and first["cancel_jobs"] == [job_id]
    assert (await a.poll()).body["cancel_jobs"] == []  # told once
    assert (await b.poll()).body["cancel_jobs"] == []  # never offered: nothing to cancel
    assert (await b.accept(job_id)).status == 410


# -- signatures ---------------------------------------------------------------------------------


async def test_signatures_offer_and_download(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    records = [{"id": "DEBIAN-CVE-2024-0001", "affected": []}, {"id": "CVE-2024-0002"}]
    published = platform.publish_signatures(records, version="2026.12.04.1")
    offer = (await a.poll()).body["signatures"]
    assert offer == {k: published[k] for k in ("version", "url", "sha256", "signature")}
    assert offer["url"] == "/vsa/v1/signatures/2026.12.04.1"
    reply = await a.request("GET", offer["url"])
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/gzip"
    assert "Content-Encoding" not in reply.headers
    assert hashlib.sha256(reply.raw).hexdigest() == offer["sha256"]
    public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(platform.signing_public_key()))
    public.verify(base64.b64decode(offer["signature"]), reply.raw)  # raises when invalid
    lines = gzip.decompress(reply.raw).decode().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["DEBIAN-CVE-2024-0001", "CVE-2024-0002"]
    missing = await a.request("GET", "/vsa/v1/signatures/1999.01.01.1")
    assert (missing.status, missing.body["error"]) == (404, "unknown_signatures")
    newer = platform.publish_signatures(records[:1])
    assert (await a.poll()).body["signatures"]["version"] == newer["version"]


# -- faults and the request log -----------------------------------------------------------------


async def test_fault_503_for_the_next_requests(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    platform.fail_next(2, retry_after_s=7, path_re=r"^/vsa/v1/poll$")
    for _ in range(2):
        reply = await a.poll()
        assert (reply.status, reply.headers["Retry-After"], reply.body["error"]) == (503, "7", "unavailable")
    assert (await a.poll()).status == 200
    assert platform.count_requests(path="/vsa/v1/poll", status=503, appliance_id=a.appliance_id) == 2
    assert platform.count_requests(path="/vsa/v1/poll", status=200) == 1


async def test_fault_for_a_duration_and_429(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    platform.fail_next(duration_s=0.5, status=429, retry_after_s=1)
    reply = await a.poll()
    assert (reply.status, reply.body["error"]) == (429, "rate_limited")
    await asyncio.sleep(0.6)
    assert (await a.poll()).status == 200


async def test_fault_drop_and_delay(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    platform.drop_next(1)
    with pytest.raises(aiohttp.ClientError):
        await a.poll()
    assert platform.requests(path="/vsa/v1/poll")[-1]["status"] == 0
    platform.delay_next(0.3, 1)
    started = time.monotonic()
    assert (await a.poll()).status == 200
    assert time.monotonic() - started >= 0.3
    platform.fail_next(5)
    platform.clear_faults()
    assert (await a.poll()).status == 200


async def test_routing_errors_use_the_error_shape(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    reply = await a.request("GET", "/vsa/v1/nothing")
    assert (reply.status, reply.body["error"]) == (404, "not_found")
    reply = await a.request("GET", "/vsa/v1/poll")
    assert (reply.status, reply.body["error"]) == (405, "method_not_allowed")
    assert reply.headers["Allow"] == "POST"


async def test_secrets_never_reach_the_database_in_clear(server: PlatformServer, platform: Platform) -> None:
    code = platform.create_perscode()
    a = appliance(server, platform)
    await a.register(code)
    platform.set_ec2_api_proxy("http://10.90.2.28:3129", "scanner", "Ec2-proxy-pw")
    job_id = platform.submit_job({"targets": {"ips": ["10.77.0.10"]}, "auth_records": [UNIX_RECORD]})
    await a.poll()
    await a.accept(job_id)
    blob = b"".join(p.read_bytes() for p in platform.data_dir.glob("platform.db*"))
    for secret in (code, UNIX_RECORD["password"], "Ec2-proxy-pw"):
        assert secret.encode() not in blob
    assert oct(platform.data_dir.stat().st_mode & 0o777) == "0o700"
    for name in ("ca.key", "server.key", "signing.key", "vault.key", "pepper.key", "platform.db"):
        assert oct((platform.data_dir / name).stat().st_mode & 0o777) == "0o600", name


async def test_corrupt_bundles_for_appliance_tests(server: PlatformServer, platform: Platform) -> None:
    a = await registered(server, platform)
    public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(platform.signing_public_key()))
    for corrupt, sha_ok, sig_ok in (("signature", True, False), ("sha256", False, True),
                                    ("bytes", False, False)):
        offer = platform.publish_signatures([{"id": "CVE-1"}], version=f"bad-{corrupt}", corrupt=corrupt)
        data = (await a.request("GET", offer["url"])).raw
        assert (hashlib.sha256(data).hexdigest() == offer["sha256"]) is sha_ok
        try:
            public.verify(base64.b64decode(offer["signature"]), data)
            verified = True
        except Exception:  # cryptography's InvalidSignature
            verified = False
        assert verified is sig_ok, corrupt
    platform.publish_signatures([{"id": "CVE-1"}], version="elsewhere", url="https://evil.example/kb.gz")
    assert (await a.poll()).body["signatures"]["url"] == "https://evil.example/kb.gz"


async def test_unknown_fields_are_ignored_everywhere(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])
    assert (await a.poll(future={"a": 1})).status == 200
    result = host_result("10.77.0.10") | {"future": [1]}
    result["target"]["future"] = True
    assert (await a.put_host(job_id, result)).status == 201
    body = {"status": "finished", "reason": None, "message": "1 host", "future": 1,
            "summary": {"hosts_targeted": 1, "hosts_alive": 1, "hosts_excluded": 0,
                        "hosts_scanned": 1, "findings": 0, "future": 2},
            "host_keys": ["10.77.0.10"]}
    assert (await a.request("POST", f"/vsa/v1/jobs/{job_id}/complete", body)).status == 200
    assert (await a.request("POST", f"/vsa/v1/jobs/{job_id}/accept", {"future": 1})).status == 200


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_names_and_minimum_version(server: PlatformServer, platform: Platform) -> None:
    by_name = LabAppliance(f"https://localhost:{server.port}", platform.ca_file, I1)
    assert (await by_name.register(platform.create_perscode())).status == 201
    old = appliance(server, platform, I2)
    ctx = ssl.create_default_context(cafile=str(platform.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    connector = aiohttp.TCPConnector(ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await session.post(old.base_url + "/vsa/v1/register", json={},
                               timeout=aiohttp.ClientTimeout(total=10))


async def test_wait_helpers(server: PlatformServer, platform: Platform) -> None:
    a, job_id = await accepted_job(server, platform, ["10.77.0.10"])

    async def finish() -> None:
        await asyncio.sleep(0.2)
        await a.put_host(job_id, host_result("10.77.0.10"))
        await a.complete(job_id, ["10.77.0.10"])

    task = asyncio.create_task(finish())
    report = await asyncio.to_thread(platform.wait_for_job, job_id, timeout_s=10)
    await task
    assert report["state"] == "completed"
    rows = await asyncio.to_thread(platform.wait_for_requests, 1, method="PUT", timeout_s=5)
    assert rows[0]["status"] == 201 and rows[0]["user_agent"].startswith("vsa/")
    with pytest.raises(Exception, match="waited"):
        await asyncio.to_thread(platform.wait_for_requests, 5, method="DELETE", timeout_s=0.2)
