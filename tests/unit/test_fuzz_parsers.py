"""Hostile inputs (issue 11): every parser returns a typed value or raises its own error.

Each entry of :data:`TARGETS` names one parser, a hypothesis strategy that
produces hostile input for it (random JSON, random text and bytes, and valid
messages with one field mutated, so that the deep branches are reached), the
call, and the errors it may raise (its module's own ``VsaError`` subclass).
Anything else escaping (``KeyError``, ``TypeError``, ``RecursionError``, ...)
fails the test with the input that caused it.

CI runs a modest number of examples per parser; ``bench/fuzz`` runs the very same
targets with at least 100,000 cases each.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.authrecords import AuthRecordError, parse_auth_record
from appliance.aws.ec2 import Ec2ApiProxy as AwsEc2ApiProxy
from appliance.aws.ec2 import Ec2Error, parse_ec2_selection
from appliance.errors import UserDataError, VsaError
from appliance.kb.bundle import SignaturesOffer as BundleOffer
from appliance.kb.bundle import resolve_bundle_url
from appliance.kb.errors import BundleRefused, KbFormatError
from appliance.kb.match import KnowledgeBase
from appliance.platform.http import decode_json
from appliance.platform.messages import (
    ErrorBody,
    JobSpec,
    MessageError,
    PollResponse,
    RegisterResponse,
)
from appliance.results import Package, Packages
from appliance.scan import inventory as inv
from appliance.scan import services, smbnegotiate, winversion
from appliance.scan.portlists import PortSpecError, tcp_ports, udp_ports
from appliance.scan.targets import TargetError, expand_targets, parse_entry
from appliance.userdata import parse_proxy_url, parse_user_data

CI_EXAMPLES = int(os.environ.get("VSA_FUZZ_EXAMPLES", "150"))
# One parse of one hostile input: anything slower is a denial of service.
MAX_CASE_S = 2.0

# ---------------------------------------------------------------- strategies

_texty_pieces = st.sampled_from([
    "\n", "\r\n", "\t", " ", "=", ":", '"', "'", "\\", "@", "[", "]", "/", "-", ",", ".", "#",
    "PERSCODE=", "PROXY_URL=", "http://", "10.0.0.5", "3128", "::1", "user", "DOM\\", "%",
    "0", "65535", "65536", "\x00", "\ufeff", "é", "\ud7ff", "\u2028", "\x85",
])
texty = st.one_of(st.text(max_size=300), st.lists(_texty_pieces, max_size=60).map("".join))
# URL-like text: schemes, brackets, ports and user information in hostile orders.
urlish = st.builds(lambda scheme, rest: scheme + "".join(rest),
                   st.sampled_from(["http://", "https://", "mqtts://", "//", "/", "", "ftp://"]),
                   st.lists(st.sampled_from(["[", "]", "::1", "zz", "h", ":", "99999", "3128", "@", "u:p@",
                                             "/", "?", "#", "%", "%zz", "\\", " ", "\x00", ".", "platform.example",
                                             ":8443", "é"]), max_size=10))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), texty, urlish,
    st.sampled_from(["", " ", "0", "-1", "22", "none", "full", "http://[::1", "http://[zz]:3/", "10.0.0.1",
                     "::", "1e309", "\x00", "é", "\ud800", "a" * 300, "9" * 5000]),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=25,
)


def mutated(base: Any) -> st.SearchStrategy[Any]:
    """``base`` (a valid message) with a few fields replaced, deleted or added at random paths."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        value = copy.deepcopy(base)
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            # Walk down to a random container.
            node, steps = value, draw(st.integers(min_value=0, max_value=4))
            for _ in range(steps):
                children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
                children = [c for c in children if isinstance(c, dict | list)]
                if not children:
                    break
                node = draw(st.sampled_from(children))
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node)))
                action = draw(st.sampled_from(["replace", "delete", "add"]))
                if action == "replace":
                    node[key] = draw(json_values)
                elif action == "delete":
                    del node[key]
                else:
                    node[draw(st.text(max_size=8))] = draw(json_values)
            elif isinstance(node, list) and node:
                node[draw(st.integers(min_value=0, max_value=len(node) - 1))] = draw(json_values)
        return value

    return build()


def deep(depth: int) -> Any:
    """A JSON value nested ``depth`` lists deep (JSON decoders and recursion meet here)."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def hostile_json(base: Any) -> st.SearchStrategy[Any]:
    """Mutations of ``base`` most of the time, arbitrary JSON otherwise."""
    return st.one_of(mutated(base), mutated(base), mutated(base), json_values)


bytesy = st.one_of(st.binary(max_size=400), texty.map(lambda t: t.encode("utf-8", "surrogatepass")))

# ---------------------------------------------------------------- valid bases

JWE = "eyJhbGciOiJFQ0RILUVTIn0..aXY.Y2lwaGVy.dGFn"
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
EC2_SELECTION = {
    "role_arn": "arn:aws:iam::111122223333:role/VsaConnector", "external_id": "f0d1c2",
    "regions": ["us-east-1"], "platform": "vpc_selected", "vpc_ids": ["vpc-0123abcd"],
    "instance_ids": ["i-0123456789abcdef0"], "tags_include": [{"key": "env", "value": "prod"}],
    "tags_exclude": [{"key": "skip", "value": None}], "include_small_types": False, "address": "private",
}
JOB = {
    "job_id": "j-42", "type": "vm_scan", "title": "Nightly",
    "targets": {"ips": ["10.77.0.10", "10.77.0.0/28", "10.77.0.20-10.77.0.30", "fd00::1"],
                "hostnames": ["web-1.corp.example"], "ec2": EC2_SELECTION},
    "exclude": ["10.77.0.13"],
    "options": {"tcp_ports": "22,80,8000-8100", "udp_ports": "none", "host_discovery": "default",
                "service_detection": "banner", "rate_pps": 10000, "max_parallel_hosts": 16,
                "host_timeout_s": 900, "authentication": True},
    "auth_records": [JWE],
}
POLL = {
    "poll_interval_s": 60, "jobs": [JOB], "cancel_jobs": ["j-41"],
    "ec2_api_proxy": {"url": "http://10.90.2.28:3129", "username": "scanner", "password": "pw-fuzz-1"},
    "signatures": {"version": "2026.12.01", "url": "/vsa/v1/signatures/2026.12.01",
                   "sha256": "ab" * 32, "signature": "c2ln"},
}
REGISTER = {"appliance_id": "vsa-7f3c2a", "certificate_pem": CERT, "ca_pem": CERT, "poll_interval_s": 180,
            "mqtt": {"url": "mqtts://h:8883", "wake_topic": "vsa/a/wake", "events_topic": "vsa/a/events"}}
UNIX_RECORD = {
    "type": "unix", "id": "r1", "title": "root", "username": "scan", "password": "pw-fuzz-2",
    "private_keys": [{"pem": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n", "passphrase": "pp-fuzz-3",
                      "certificate": None}],
    "root_delegation": {"method": "sudo", "password": "pw-fuzz-4"}, "port": 22,
    "targets": ["10.0.0.0/24", "fd00::5"],
}
WINDOWS_RECORD = {
    "type": "windows", "id": "r2", "username": "Administrator", "domain": "CORP", "password": "pw-fuzz-5",
    "nt_hash": "0" * 32, "protocols": ["ntlmv2", "ntlmv1"], "targets": ["10.0.0.7"],
}
OSV_RECORD = {
    "id": "DSA-1-1", "summary": "openssl: several flaws", "details": "long\ntext", "withdrawn": None,
    "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}],
    "database_specific": {"severity": 4},
    "affected": [
        {"package": {"ecosystem": "Debian:12", "name": "openssl"},
         "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u2"},
                                                     {"introduced": "3.0.13-1"}, {"last_affected": "3.0.14-1"}]}],
         "versions": ["3.0.9-1"], "database_specific": {"severity": 3},
         "severity": [{"type": "CVSS_V2", "score": "AV:N/AC:L/Au:N/C:P/I:P/A:P"}]},
        {"package": {"ecosystem": "AlmaLinux:9", "name": "openssl"},
         "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1:3.0.7-25.el9_3"}]}]},
        {"package": {"ecosystem": "Alpine:v3.20", "name": "openssl"},
         "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.3.2-r0"}]}]},
    ],
}
OSV_HOSTS = (
    Packages("dpkg", "Debian:12", (Package("libssl3", "3.0.9-1", "amd64", "openssl", "3.0.9-1"),
                                   Package("openssl", "3.0.14-1"))),
    Packages("rpm", "AlmaLinux:9", (Package("openssl", "1:3.0.7-24.el9", "x86_64", "openssl", None),)),
    Packages("apk", "Alpine:v3.20", (Package("openssl", "3.3.1-r0", None, "openssl", None),)),
)


def osv_record_with_versions(draw_text: str) -> dict[str, Any]:
    """The valid OSV record with hostile version strings in its events."""
    record = copy.deepcopy(OSV_RECORD)
    for affected in record["affected"]:
        affected["ranges"][0]["events"][-1] = {"fixed": draw_text}
        affected["versions"] = [draw_text]
    return record


def smb2_response(dialect: int = 0x0311, sec_offset: int = 128, sec_length: int = 8) -> bytes:
    """A well-formed SMB2 NEGOTIATE response to mutate."""
    header = smbnegotiate.SMB2_HEADER.pack(*_smb2_header_fields())
    body = smbnegotiate.SMB2_NEGOTIATE_RESP.pack(65, 1, dialect, 0, b"\x11" * 16, 0x44, 65536, 65536, 65536,
                                                 0, 0, sec_offset, sec_length, 0)
    return header + body + b"\x60\x06" + b"\x2b\x06\x01\x05\x05\x02" * 4


def _smb2_header_fields() -> tuple[Any, ...]:
    """Header fields of a successful NEGOTIATE answer, shaped after the module's own struct."""
    count = len(smbnegotiate.SMB2_HEADER.unpack(bytes(smbnegotiate.SMB2_HEADER.size)))
    fields: list[Any] = list(smbnegotiate.SMB2_HEADER.unpack(bytes(smbnegotiate.SMB2_HEADER.size)))
    fields[0] = b"\xfeSMB"
    fields[1] = 64
    fields[3] = smbnegotiate.STATUS_SUCCESS
    fields[4] = smbnegotiate.SMB2_NEGOTIATE
    assert len(fields) == count
    return tuple(fields)


def byte_mutations(base: bytes) -> st.SearchStrategy[bytes]:
    """``base`` truncated, extended or with some bytes overwritten."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(base)
        for _ in range(draw(st.integers(min_value=0, max_value=6))):
            if not data:
                break
            at = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[at] = draw(st.integers(min_value=0, max_value=255))
        cut = draw(st.integers(min_value=0, max_value=len(data) + 40))
        return bytes(data[:cut]) + draw(st.binary(max_size=max(0, cut - len(data))))

    return build()


reg_values = st.dictionaries(
    st.sampled_from(["CurrentBuildNumber", "CurrentBuild", "BuildLabEx", "CurrentMajorVersionNumber",
                     "CurrentMinorVersionNumber", "CurrentVersion", "InstallationType", "ProductName",
                     "EditionID", "DisplayVersion", "ReleaseId", "UBR", "PROCESSOR_ARCHITECTURE"]),
    st.tuples(st.integers(min_value=-1, max_value=12),
              st.one_of(st.none(), st.integers(min_value=-2**64, max_value=2**64), st.binary(max_size=40),
                        st.text(max_size=40), st.sampled_from(["22631", "6.1", "19041.1.amd64fre", "AMD64"]))),
    max_size=13,
)
cbs_names = st.one_of(
    st.text(max_size=60),
    st.builds(lambda n, kb, tail: f"Package_{n}for_KB{kb}~31bf3856ad364e35~amd64~~{tail}",
              st.sampled_from(["", "1_", "12_", "99999999999999999999_"]),
              st.integers(min_value=0, max_value=10**30), st.text(max_size=10)),
    st.builds(lambda b, r: f"Package_for_RollupFix~31bf3856ad364e35~amd64~~{b}.{r}.1.5",
              st.integers(min_value=0, max_value=10**30), st.integers(min_value=0, max_value=10**30)),
)


# ---------------------------------------------------------------- the calls

def _kb_from_records(records: list[Any]) -> int:
    """Index arbitrary records, then match every test host (severity is computed at match time)."""
    kb = KnowledgeBase.from_records(records)
    return sum(len(kb.match(host)) for host in OSV_HOSTS)


def _kb_load(lines: list[str]) -> int:
    """Load a bundle made of arbitrary lines, then match."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8", errors="surrogatepass") as handle:
            handle.write("\n".join(lines))
        kb = KnowledgeBase.load(path)
    return sum(len(kb.match(host)) for host in OSV_HOSTS)


def _sections(text: str) -> Any:
    sections = inv.split_sections(text, "0123456789abcdef")
    inv.parse_imds(sections)
    return inv.inventory_from(sections)


def _windows(values: dict[str, Any], names: list[str], states: list[Any]) -> Any:
    version = winversion.parse_current_version(values)
    winversion.architecture(values.get("PROCESSOR_ARCHITECTURE"))
    package_states = dict(zip(names, states, strict=False))
    return version, winversion.parse_updates(package_states), winversion.latest_rollup(package_states)


def _identify(port: int, first: bytes, http: bytes, subject: str | None) -> Any:
    services.parse_ssh_banner(first.decode("latin-1"))
    services.parse_server_header(http.decode("latin-1"))
    services.certificate_subject(first)
    return services.identify(port, first_bytes=first, http=http, tls_subject=subject)


def _ports(spec: str) -> Any:
    for parse in (tcp_ports, udp_ports):
        try:
            parse(spec)
        except PortSpecError:
            pass
    return None


def _targets(entries: list[str]) -> Any:
    small = []
    for entry in entries:
        try:
            if parse_entry(entry).size <= 16:  # expanding a /16 proves nothing more, slowly
                small.append(entry)
        except TargetError:
            pass
    return expand_targets(small) if small else expand_targets(entries[:1])


@dataclass(frozen=True)
class Target:
    """One parser under fuzz: its input strategy, the call, and the errors it may raise."""

    strategy: st.SearchStrategy[Any]
    call: Callable[[Any], Any]
    allowed: tuple[type[BaseException], ...]


TARGETS: dict[str, Target] = {
    "user_data": Target(st.one_of(bytesy, texty.map(lambda t: "PERSCODE=ABCD-EFGH\nPROXY_URL=" + t),
                                  st.builds(lambda b: __import__("gzip").compress(b), bytesy),
                                  st.builds(lambda b: __import__("base64").b64encode(b), bytesy)),
                        parse_user_data, (UserDataError,)),
    "proxy_url": Target(st.one_of(texty, urlish), parse_proxy_url, (UserDataError,)),
    "job_spec": Target(hostile_json(JOB), JobSpec.parse, (MessageError,)),
    "poll_response": Target(st.one_of(hostile_json(POLL), st.just(deep(3000))),
                            lambda d: PollResponse.parse(d, origin="https://platform.example"), (MessageError,)),
    # The raw body as the platform sends it: the client turns decode_json's ValueError into
    # PlatformProtocolError ("the answer is not JSON"), so ValueError is its own error here.
    "platform_body": Target(st.one_of(bytesy, hostile_json(POLL).map(lambda v: json.dumps(v).encode()),
                                      st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n)),
                            lambda b: PollResponse.parse(decode_json(b)), (MessageError, ValueError)),
    "register_response": Target(hostile_json(REGISTER), RegisterResponse.parse, (MessageError,)),
    "error_body": Target(json_values, ErrorBody.parse, ()),
    "signatures_offer": Target(hostile_json(dict(POLL["signatures"], signature="A" * 86 + "==")),
                               BundleOffer.from_wire, (BundleRefused,)),
    "bundle_url": Target(st.one_of(texty, urlish, texty.map(lambda t: "https://platform.example:8443" + t),
                                   texty.map(lambda t: "https://" + t)),
                         lambda u: resolve_bundle_url("https://platform.example:8443", u), (BundleRefused,)),
    "auth_record": Target(st.one_of(hostile_json(UNIX_RECORD), hostile_json(WINDOWS_RECORD)),
                          parse_auth_record, (AuthRecordError,)),
    "ec2_selection": Target(hostile_json(EC2_SELECTION), parse_ec2_selection, (Ec2Error,)),
    "ec2_api_proxy": Target(hostile_json(POLL["ec2_api_proxy"]), AwsEc2ApiProxy.from_wire, (Ec2Error,)),
    # from_records takes the dicts iter_bundle_records yields (it refuses other lines).
    "osv_records": Target(st.lists(st.one_of(mutated(OSV_RECORD), texty.map(osv_record_with_versions)),
                                   min_size=1, max_size=3).map(lambda rs: [r for r in rs if isinstance(r, dict)]),
                          _kb_from_records, (KbFormatError,)),
    "osv_bundle": Target(st.lists(st.one_of(texty, hostile_json(OSV_RECORD).map(json.dumps),
                                            st.just("[" * 100_000)), max_size=3),
                         _kb_load, (KbFormatError,)),
    "target_output": Target(texty, lambda t: (inv.parse_dpkg(t), inv.parse_rpm(t), inv.parse_apk_installed(t),
                                              inv.parse_ss(t), inv.parse_os_release(t), inv.parse_uname(t),
                                              inv.parse_proc_net(t, "tcp"), _sections(t)),
                            (inv.InventoryParseError,)),
    "windows_registry": Target(st.tuples(reg_values, st.lists(cbs_names, max_size=8),
                                         st.lists(st.one_of(st.none(), st.integers()), max_size=8)),
                               lambda a: _windows(*a), ()),
    "smb_negotiate": Target(st.one_of(bytesy, byte_mutations(smb2_response()),
                                      byte_mutations(smb2_response(sec_offset=2**16 - 1, sec_length=2**16 - 1))),
                            lambda m: (smbnegotiate.parse_smb1_negotiate_response(m)
                                       if m[:1] == b"\xff" else smbnegotiate.parse_smb2_negotiate_response(m)),
                            (smbnegotiate.NegotiateParseError,)),
    "service_banner": Target(st.tuples(st.integers(min_value=0, max_value=65535), bytesy,
                                       st.one_of(bytesy, bytesy.map(lambda b: b"HTTP/1.1 200 OK\r\nServer:" + b)),
                                       st.one_of(st.none(), st.text(max_size=40))),
                             lambda a: _identify(*a), ()),
    "port_spec": Target(texty, _ports, ()),
    "job_targets": Target(st.lists(st.one_of(texty, st.ip_addresses().map(str),
                                             st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(),
                                                       st.integers(min_value=-1, max_value=140))),
                                   max_size=4),
                          _targets, (TargetError,)),
}


def run_case(name: str, value: Any) -> None:
    """Run one case: only the target's own errors may escape, within MAX_CASE_S."""
    target = TARGETS[name]
    started = time.monotonic()
    try:
        target.call(value)
    except target.allowed as exc:
        assert isinstance(exc, VsaError) or name == "platform_body", f"{name}: {type(exc).__name__} is not a VsaError"
        assert str(exc), f"{name}: an error without words"
    elapsed = time.monotonic() - started
    assert elapsed < MAX_CASE_S, f"{name}: one case took {elapsed:.1f} s"


def fuzz(name: str, examples: int) -> Callable[[], None]:
    """A hypothesis test running ``examples`` cases of one target (used by CI and by bench/fuzz)."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(TARGETS[name].strategy)
    def check(value: Any) -> None:
        run_case(name, value)

    return check


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parser_only_raises_its_own_error(name: str) -> None:
    fuzz(name, CI_EXAMPLES)()
