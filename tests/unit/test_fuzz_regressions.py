"""The crashes the hostile-input fuzzing found (issue 11), each pinned to the clear error it now gives."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from appliance.authrecords import AuthRecordError, parse_auth_record
from appliance.aws.ec2 import Ec2ApiProxy as AwsEc2ApiProxy
from appliance.aws.ec2 import Ec2Error
from appliance.errors import VsaError
from appliance.kb.bundle import resolve_bundle_url
from appliance.kb.errors import BundleRefused, KbFormatError
from appliance.kb.match import KnowledgeBase
from appliance.kb.versions import VersionError, key_function
from appliance.platform.http import decode_json
from appliance.platform.messages import MessageError, PollResponse, RegisterResponse
from appliance.results import Package, Packages
from appliance.scan import smbnegotiate, winversion

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
BROKEN_URLS = ["http://[::1", "http://[zz]:3128/", "https://[10.0.0.1]:1/"]


@pytest.mark.parametrize("keys", [True, 7, 1.5])
def test_auth_record_with_private_keys_not_a_list(keys: object) -> None:
    # Was: TypeError ("'bool' object is not iterable") while registering secrets.
    with pytest.raises(AuthRecordError, match="private_keys must be a list"):
        parse_auth_record({"type": "unix", "id": "r1", "username": "u", "password": "pw-regress-1",
                           "targets": ["10.0.0.1"], "private_keys": keys})


@pytest.mark.parametrize("password", [True, ["x"], {"a": 1}, 5])
def test_ec2_api_proxy_with_a_password_that_is_not_text(password: object) -> None:
    # Was: AttributeError/TypeError inside register_secret.
    with pytest.raises(Ec2Error, match="password must be a string or null"):
        AwsEc2ApiProxy.from_wire({"url": "http://10.0.0.5:3128", "password": password})


@pytest.mark.parametrize("url", BROKEN_URLS)
def test_ec2_api_proxy_with_broken_brackets(url: str) -> None:
    # Was: ValueError ("Invalid IPv6 URL") from urlsplit / .hostname.
    with pytest.raises(Ec2Error, match="must be an http:// URL with a host"):
        AwsEc2ApiProxy.from_wire({"url": url})


@pytest.mark.parametrize("url", BROKEN_URLS)
def test_poll_response_proxy_and_signatures_urls_with_broken_brackets(url: str) -> None:
    with pytest.raises(MessageError) as proxy_error:
        PollResponse.parse({"poll_interval_s": 60, "ec2_api_proxy": {"url": url}})
    assert proxy_error.value.field == "ec2_api_proxy.url"
    refused = PollResponse.parse({"poll_interval_s": 60, "signatures": {
        "version": "1", "url": url, "sha256": "a" * 64, "signature": "c2ln"}}, origin="https://p.example"
    ).signatures_refused
    assert refused is not None and refused.error.field == "signatures.url"
    assert "not a path on the platform's own origin" in str(refused.error)


def test_bundle_line_nesting_too_deeply(tmp_path: Path) -> None:
    # Was: RecursionError out of json.loads, through KnowledgeBase.load.
    path = tmp_path / "bundle.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": "A", "affected": []}\n' + b"[" * 100_000 + b"\n"))
    with pytest.raises(KbFormatError, match="line 2 of the bundle nests too deeply"):
        KnowledgeBase.load(path)


def test_platform_body_nesting_too_deeply_is_not_json() -> None:
    # Was: RecursionError out of read_json, past the client's "not JSON" handling (ValueError).
    with pytest.raises(ValueError, match="nests too deeply"):
        decode_json(b"[" * 1_000_000)
    assert decode_json(b"") is None and decode_json(b'{"a": [1]}') == {"a": [1]}


def test_negotiate_parse_error_is_a_vsa_error() -> None:
    # Was a bare ValueError; it stays one for the callers that catch ValueError.
    with pytest.raises(smbnegotiate.NegotiateParseError) as caught:
        smbnegotiate.parse_smb2_negotiate_response(b"\xfeSMB")
    assert isinstance(caught.value, VsaError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("severity", [True, 7, {"type": "CVSS_V3"}])
def test_osv_severity_that_is_not_a_list(severity: object) -> None:
    # Was: TypeError at match time ("'bool' object is not iterable"), computing the finding's severity.
    kb = KnowledgeBase.from_records([{
        "id": "DSA-9-1", "severity": severity,
        "affected": [{"package": {"ecosystem": "Debian:12", "name": "openssl"}, "severity": severity,
                      "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.0.11-1"}]}]}],
    }])
    findings = kb.match(Packages("dpkg", "Debian:12", (Package("openssl", "3.0.9-1"),)))
    assert [(f.id, f.severity) for f in findings] == [("DSA-9-1", 3)]


@pytest.mark.parametrize("junk", [1.5, 7, True, {"a": 1}])
def test_osv_ranges_events_and_versions_that_are_not_lists(junk: object) -> None:
    # Was: TypeError while indexing ("'float' object is not iterable").
    good = {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.0.11-1"}]}
    kb = KnowledgeBase.from_records([
        {"id": "A-1", "affected": [{"package": {"ecosystem": "Debian:12", "name": "openssl"}, "ranges": junk}]},
        {"id": "A-2", "affected": [{"package": {"ecosystem": "Debian:12", "name": "openssl"},
                                    "ranges": [{"type": "ECOSYSTEM", "events": junk}]}]},
        {"id": "A-3", "affected": [{"package": {"ecosystem": "Debian:12", "name": "openssl"},
                                    "ranges": [good], "versions": junk}]},
    ])
    findings = kb.match(Packages("dpkg", "Debian:12", (Package("openssl", "3.0.9-1"),)))
    assert [f.id for f in findings] == ["A-3"]


@pytest.mark.parametrize("url", ["HTTP://[][H@", "https://[][x@/b", "https://[zz]/b", "https://h:99999/b"])
def test_bundle_url_that_yarl_cannot_parse_is_refused(url: str) -> None:
    # Was: IndexError out of yarl.URL for an empty bracketed host.
    with pytest.raises(BundleRefused, match="not on the platform's own origin"):
        resolve_bundle_url("https://platform.example:8443", url)


def test_register_response_mqtt_url_with_broken_brackets() -> None:
    # Was: ValueError out of urlsplit(...).hostname.
    with pytest.raises(MessageError) as caught:
        RegisterResponse.parse({"appliance_id": "a", "certificate_pem": CERT, "ca_pem": None, "poll_interval_s": 60,
                                "mqtt": {"url": "ftp://h]:u:p@[u:p@99999", "wake_topic": "w", "events_topic": "e"}})
    assert caught.value.field == "mqtt.url"


def test_registry_numbers_that_int_cannot_read() -> None:
    # Was: ValueError from int("7²") (str.isdigit accepts superscripts) and from 5,000-digit numbers.
    version = winversion.parse_current_version({
        "CurrentMajorVersionNumber": (winversion.REG_SZ, "7²"), "BuildLabEx": (winversion.REG_SZ, "²³.1.amd64"),
        "UBR": (winversion.REG_SZ, "9" * 5000)})
    assert version.major is None and version.build is None and version.ubr is None
    huge = "9" * 5000
    states = {f"Package_for_RollupFix~31bf3856ad364e35~amd64~~{huge}.1.1.5": None,
              f"Package_{huge}_for_KB5034441~31bf3856ad364e35~amd64~~1.0": 112,
              "Package_for_RollupFix~31bf3856ad364e35~amd64~~22621.3007.1.5": 112}
    assert winversion.latest_rollup(states) == (22621, 3007)
    assert winversion.parse_updates(states) == ()


def test_osv_version_with_a_lone_surrogate() -> None:
    # Was: UnicodeEncodeError out of rpmvercmp_key for "1\ud800" (JSON may carry lone surrogates).
    kb = KnowledgeBase.from_records([{"id": "ALSA-1", "affected": [{
        "package": {"ecosystem": "AlmaLinux:9", "name": "openssl"}, "versions": ["1\ud800"],
        "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1:3.0.7-25.el9\ud800"}]}]}]}])
    findings = kb.match(Packages("rpm", "AlmaLinux:9", (Package("openssl", "1:3.0.7-24.el9"),)))
    assert [f.id for f in findings] == ["ALSA-1"]


@pytest.mark.parametrize("scheme", ["dpkg", "rpm", "apk"])
def test_version_keys_of_lone_surrogates(scheme: str) -> None:
    for text in ("1\ud800", "\udfff", "1.0-1\ud800x"):
        try:
            key_function(scheme)(text)
        except VersionError:
            pass  # refusing the version is fine; a UnicodeEncodeError is not
