"""The reference platform's logic without HTTP: store decisions, jobs, keys, bundles, schemas."""

from __future__ import annotations

import base64
import gzip
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from openapi_spec_validator import validate

from appliance.lab.platform import LabPlatformError, Platform
from appliance.lab.platform.admin import DEFAULT_OPTIONS, normalize_job
from appliance.lab.platform.ca import CsrError, generate_client_key_and_csr, load_csr
from appliance.lab.platform.schemas import is_host_key, openapi_document, schema_errors
from appliance.lab.platform.secrets import Vault, decrypt_auth_record, encrypt_auth_record
from appliance.lab.platform.server import PlatformApp
from appliance.lab.platform.store import CallerCert, ProtocolRefusal

I1, I2 = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2"


@pytest.fixture
def platform(tmp_path: Path) -> Platform:
    p = Platform.init(tmp_path / "p")
    yield p
    p.close()


def register(platform: Platform, code: str, instance_id: str) -> tuple[str, CallerCert, bytes]:
    key_pem, csr_pem = generate_client_key_and_csr()
    issued: list = []

    def sign(aid: str):
        issued.append(platform.ca.sign_csr(csr_pem, aid))
        return issued[-1]

    aid, _ = platform.store.register(perscode=code, instance_id=instance_id, sign=sign,
                                     instance={"instance_id": instance_id}, capabilities=None,
                                     software_version="0.1.0")
    caller = platform.store.caller(issued[-1].fingerprint_sha256)
    assert caller is not None
    return aid, caller, key_pem


# -- the OpenAPI document --------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_31() -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_is_documented_and_every_documented_path_is_served(platform: Platform) -> None:
    app = PlatformApp(platform).build()
    served = {(r.method, r.resource.canonical) for r in app.router.routes()}
    documented = {(m.upper(), path) for path, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented


def test_schema_errors_name_the_field_but_never_the_value() -> None:
    problem = schema_errors("RegisterRequest", {"perscode": "secret code!", "csr_pem": "x",
                                                "instance": {"instance_id": "i-1"},
                                                "software_version": "1"})
    assert problem is not None and problem.startswith("perscode:")
    assert "secret code" not in problem
    assert "required" in (schema_errors("Progress", {"phase": "scanning"}) or "")


def test_host_keys() -> None:
    assert is_host_key("i-0123456789abcdef0") and is_host_key("10.0.0.1") and is_host_key("fd00::1")
    assert not is_host_key("i-XYZ") and not is_host_key("host.example") and not is_host_key("10.0.0.256")


# -- jobs ----------------------------------------------------------------------------------


def test_normalize_job_fills_defaults_and_keeps_unknown_fields() -> None:
    job = normalize_job({"targets": {"ips": ["10.77.0.0/28"]}, "x_future": 1})
    assert job["job_id"].startswith("j-") and job["title"] == job["job_id"]
    assert job["type"] == "vm_scan" and job["exclude"] == []
    assert job["options"] == DEFAULT_OPTIONS
    assert job["targets"] == {"ips": ["10.77.0.0/28"], "hostnames": [], "ec2": None}
    assert job["x_future"] == 1
    ec2 = normalize_job({"targets": {"ec2": {"regions": ["eu-west-1"]}}})["targets"]["ec2"]
    assert ec2["platform"] == "vpc_all" and ec2["address"] == "private" and ec2["instance_ids"] is None


@pytest.mark.parametrize(
    "spec",
    [
        {"targets": {}},
        {"targets": {"ips": ["10.0.0.300"]}},
        {"targets": {"ips": ["10.0.0.9-10.0.0.1"]}},
        {"targets": {"ips": ["10.0.0.1"]}, "exclude": ["nope"]},
        {"targets": {"ips": ["10.0.0.1"]}, "options": {"tcp_ports": "22,70000"}},
        {"targets": {"ips": ["10.0.0.1"]}, "options": {"tcp_ports": "90-80"}},
        {"targets": {"ips": ["10.0.0.1"]}, "options": {"rate_pps": 0}},
        {"targets": {"ips": ["10.0.0.1"]}, "type": "deep_scan"},
        {"targets": {"ips": ["10.0.0.1"]}, "job_id": "bad id!"},
        {"targets": {"ec2": {"regions": []}}},
    ],
)
def test_normalize_job_refuses_what_an_appliance_would_fail(spec: dict) -> None:
    with pytest.raises(LabPlatformError, match="job refused"):
        normalize_job(spec)


def test_submit_job_checks_auth_records(platform: Platform) -> None:
    with pytest.raises(LabPlatformError, match="auth record"):
        platform.submit_job({"targets": {"ips": ["10.0.0.1"]},
                             "auth_records": [{"type": "unix", "id": "r", "username": "u"}]})
    with pytest.raises(LabPlatformError, match="plaintext"):
        platform.submit_job({"targets": {"ips": ["10.0.0.1"]}, "auth_records": ["eyJ..."]})
    raw = platform.submit_job({"job_id": "j-raw", "targets": {"ips": "not a list"}}, validate=False)
    assert platform.results(raw)["spec"]["targets"] == {"ips": "not a list"}
    with pytest.raises(LabPlatformError, match="exists already"):
        platform.submit_job({"job_id": "j-raw", "targets": {"ips": ["10.0.0.1"]}})


def test_auth_records_are_encrypted_per_appliance_and_sealed_at_rest(platform: Platform) -> None:
    record = {"type": "windows", "id": "rec-2", "username": "scanner", "password": "W1n-pass",
              "domain": None, "nt_hash": None, "protocols": ["ntlmv2"], "targets": ["10.0.0.0/24"]}
    _, a, key_a = register(platform, platform.create_perscode(), I1)
    _, b, key_b = register(platform, platform.create_perscode(), I2)
    job_id = platform.submit_job({"targets": {"ips": ["10.0.0.1"]}, "auth_records": [record]})
    assert b"W1n-pass" not in platform.store.job_row(job_id)["auth_sealed"]
    token_a = platform.job_spec_for(job_id, a)["auth_records"][0]
    token_b = platform.job_spec_for(job_id, b)["auth_records"][0]
    assert decrypt_auth_record(token_a, key_a) == record
    assert decrypt_auth_record(token_b, key_b) == record
    assert platform.job_spec_for(job_id, a)["auth_records"][0] == token_a  # cached per certificate
    header = json.loads(base64.urlsafe_b64decode(token_a.split(".")[0] + "=="))
    assert (header["alg"], header["enc"], header["cty"]) == ("ECDH-ES", "A256GCM", "application/json")


def test_jwe_roundtrip_and_wrong_key() -> None:
    key_pem, csr_pem = generate_client_key_and_csr()
    public = load_csr(csr_pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    token = encrypt_auth_record({"type": "unix", "id": "r"}, public)
    assert decrypt_auth_record(token, key_pem) == {"type": "unix", "id": "r"}
    other, _ = generate_client_key_and_csr()
    with pytest.raises(Exception):  # noqa: B017 - joserfc's decryption error
        decrypt_auth_record(token, other)


def test_vault_roundtrip_and_tamper(tmp_path: Path) -> None:
    vault = Vault(tmp_path / "k")
    vault.create()
    blob = vault.seal({"password": "x"})
    assert vault.open(blob) == {"password": "x"}
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidTag
        vault.open(blob[:-1] + bytes([blob[-1] ^ 1]))


# -- registration and the store ----------------------------------------------------------------


def test_codes_are_stored_hashed_and_bound_to_the_first_instance(platform: Platform) -> None:
    code = platform.create_perscode(label="lab")
    assert len(code) == 14 and code.isdigit()
    listed = platform.list_perscodes()
    assert listed[0]["code"] == "****" + code[-4:]
    assert code not in json.dumps(listed)
    aid, _, _ = register(platform, code, I1)
    with pytest.raises(ProtocolRefusal) as refused:
        register(platform, code, I2)
    assert (refused.value.status, refused.value.code) == (409, "perscode_in_use")
    again, caller, _ = register(platform, code, I1)
    assert again == aid and caller.state == "active"
    states = [r["state"] for r in platform.store._all("SELECT state FROM certificates")]
    assert sorted(states) == ["active", "superseded"]
    with pytest.raises(ProtocolRefusal) as refused:
        register(platform, "unknown-code-1", I1)
    assert refused.value.status == 403
    with pytest.raises(LabPlatformError):
        platform.create_perscode("bad code")


def test_accept_and_job_states(platform: Platform) -> None:
    a, _, _ = register(platform, platform.create_perscode(), I1)
    b, _, _ = register(platform, platform.create_perscode(), I2)
    job_id = platform.submit_job({"targets": {"ips": ["10.0.0.1"]}})
    assert [r["job_id"] for r in platform.store.queued_jobs_for(a)] == [job_id]
    platform.store.accept(job_id, a)
    assert platform.store.queued_jobs_for(a) == [] and platform.store.queued_jobs_for(b) == []
    platform.store.accept(job_id, a)  # the holder again: fine
    with pytest.raises(ProtocolRefusal) as refused:
        platform.store.accept(job_id, b)
    assert refused.value.code == "job_taken"
    with pytest.raises(ProtocolRefusal) as refused:
        platform.store.held_job(job_id, b)
    assert refused.value.code == "job_not_accepted"
    platform.cancel_job(job_id)
    with pytest.raises(ProtocolRefusal) as refused:
        platform.store.accept(job_id, a)
    assert refused.value.status == 410
    with pytest.raises(LabPlatformError):
        platform.cancel_job(job_id)


def test_faults_are_consumed_by_count_and_expire_by_time(platform: Platform) -> None:
    platform.fail_next(2, path_re=r"/poll$")
    assert platform.store.take_fault(("status",), "POST", "/vsa/v1/register") is None
    assert platform.store.take_fault(("status",), "POST", "/vsa/v1/poll") is not None
    assert platform.store.take_fault(("status",), "POST", "/vsa/v1/poll") is not None
    assert platform.store.take_fault(("status",), "POST", "/vsa/v1/poll") is None
    platform.drop_next(duration_s=0.2, method="GET")
    assert platform.store.take_fault(("drop",), "POST", "/x") is None
    assert platform.store.take_fault(("drop",), "GET", "/x") is not None
    assert platform.store.take_fault(("drop",), "GET", "/x") is not None  # unlimited while it lasts
    time.sleep(0.25)
    assert platform.store.take_fault(("drop",), "GET", "/x") is None
    assert platform.list_faults() == []


# -- certificates ----------------------------------------------------------------------------


def _csr_with(key: object) -> str:
    return x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    ).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_load_csr_accepts_only_p256() -> None:
    _, good = generate_client_key_and_csr()
    load_csr(good)
    for bad in (_csr_with(rsa.generate_private_key(65537, 2048)),
                _csr_with(ec.generate_private_key(ec.SECP384R1())),
                good + good, "garbage",
                good.replace(good.splitlines()[3], "A" * len(good.splitlines()[3]))):
        with pytest.raises(CsrError):
            load_csr(bad)


def test_server_certificate_names_and_reissue(tmp_path: Path) -> None:
    p = Platform.init(tmp_path / "p", server_names=["platform.lab", "10.77.0.1"])
    assert p.server_names() == ["platform.lab", "10.77.0.1"]
    ca_before = p.ca_pem
    p.close()
    p = Platform.init(tmp_path / "p", server_names=["127.0.0.1"])
    assert p.server_names() == ["127.0.0.1"] and p.ca_pem == ca_before  # same CA, new server cert
    p.close()
    with pytest.raises(LabPlatformError, match="init"):
        Platform(tmp_path / "nothing")


# -- signatures ------------------------------------------------------------------------------


def test_publish_signatures_signs_the_raw_bundle(platform: Platform, tmp_path: Path) -> None:
    records = [{"id": "CVE-2024-0001"}, {"id": "CVE-2024-0002", "database_specific": {"severity": 5}}]
    first = platform.publish_signatures(records)
    assert first["version"].endswith(".1")
    data = platform.signatures_file(first["version"]).read_bytes()
    public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(platform.keygen()))
    public.verify(base64.b64decode(first["signature"]), data)
    assert [json.loads(x)["id"] for x in gzip.decompress(data).splitlines()] == ["CVE-2024-0001", "CVE-2024-0002"]
    jsonl = tmp_path / "kb.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    second = platform.publish_signatures(jsonl)
    assert second["version"].endswith(".2") and second["sha256"] == first["sha256"]  # deterministic
    gz = tmp_path / "kb.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b" + gzip.compress(b'{"id": "X"}\n')[2:])
    third = platform.publish_signatures(gz, version="custom-1")
    assert platform.signatures_file("custom-1").read_bytes() == gz.read_bytes()
    assert platform.signatures_offer()["version"] == third["version"] == "custom-1"
    with pytest.raises(LabPlatformError):
        platform.publish_signatures([{"no_id": 1}])
    with pytest.raises(LabPlatformError):
        platform.publish_signatures(records, version="custom-1")


@pytest.mark.parametrize(
    "spec",
    [
        {"targets": {"ips": ["10.0.0.0/8"]}},  # more than 65,536 addresses in one block
        {"targets": {"hostnames": ["bad_host!"]}},
        {"targets": {"ec2": {"regions": ["mars-1"]}}},
        {"targets": {"ec2": {"regions": ["us-east-1"], "platform": "vpc_selected"}}},
        {"targets": {"ec2": {"regions": ["us-east-1"], "role_arn": "arn:nope"}}},
        {"targets": {"ips": ["10.0.0.1"]}, "options": {"max_parallel_hosts": 100000}},
    ],
)
def test_normalize_job_refuses_what_the_appliance_parser_refuses(spec: dict) -> None:
    with pytest.raises(LabPlatformError, match="job refused"):
        normalize_job(spec)


def test_normalized_jobs_parse_with_the_appliance_messages() -> None:
    from appliance.platform.messages import JobSpec

    job = normalize_job({"targets": {"ips": ["10.77.0.0/28"], "hostnames": ["web.lab"],
                                     "ec2": {"regions": ["us-east-1"], "vpc_ids": ["vpc-0abc1234"],
                                             "platform": "vpc_selected"}},
                         "exclude": ["10.77.0.13"], "options": {"tcp_ports": "22,80,8000-8100"}})
    parsed = JobSpec.parse(job | {"auth_records": []})
    assert parsed.job_id == job["job_id"]
