"""Matching on OSV records in the upstream format (https://ossf.github.io/osv-schema/)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.kb.errors import KbFormatError
from appliance.kb.match import (
    KnowledgeBase,
    ecosystem_applies,
    severity_from_score,
    severity_of,
    title_of,
)
from appliance.results import Finding, Package, Packages


def osv(rid: str, ecosystem: str, name: str, events: list[dict[str, str]] | None = None, *,
        summary: str | None = "test advisory", versions: list[str] | None = None,
        extra_ranges: list[list[dict[str, str]]] | None = None, **fields: Any) -> dict[str, Any]:
    """One OSV record shaped as the upstream databases publish them."""
    ranges = []
    for evs in ([events] if events else []) + (extra_ranges or []):
        ranges.append({"type": "ECOSYSTEM", "events": evs})
    affected: dict[str, Any] = {"package": {"ecosystem": ecosystem, "name": name}}
    if ranges:
        affected["ranges"] = ranges
    if versions:
        affected["versions"] = versions
    record: dict[str, Any] = {"schema_version": "1.6.0", "id": rid,
                              "modified": "2024-10-01T00:00:00Z",
                              "published": "2024-09-01T00:00:00Z",
                              "aliases": [], "affected": [affected]}
    if summary is not None:
        record["summary"] = summary
    record.update(fields)
    return record


def deb(name: str, version: str, source: str | None = None, source_version: str | None = None) -> Package:
    return Package(name=name, version=version, arch="amd64", source_name=source,
                   source_version=source_version if source_version else (version if source else None))


def host(ecosystem: str, *items: Package, manager: str = "dpkg") -> Packages:
    return Packages(manager=manager, ecosystem=ecosystem, items=tuple(items))


def ids(findings: list[Finding]) -> list[tuple[str, str]]:
    return sorted((f.id, f.package or "") for f in findings)


# ------------------------------------------------------------------ Debian

OPENSSL_DSA = osv("DSA-5532-1", "Debian:12", "openssl",
                  [{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u2"}],
                  summary="openssl - security update", aliases=["CVE-2023-5363"],
                  severity=[{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"}])


def test_binary_package_matches_through_its_source_package_with_tilde_versions() -> None:
    kb = KnowledgeBase.from_records([OPENSSL_DSA])
    findings = kb.match(host("Debian:12",
                             deb("libssl3", "3.0.11-1~deb12u1", "openssl"),
                             deb("openssl", "3.0.11-1~deb12u1", "openssl")))
    assert ids(findings) == [("DSA-5532-1", "libssl3"), ("DSA-5532-1", "openssl")]
    by_pkg = {f.package: f for f in findings}
    assert by_pkg["libssl3"] == Finding(
        id="DSA-5532-1", source="osv", severity=4, title="openssl - security update",
        package="libssl3", source_package="openssl", installed="3.0.11-1~deb12u1",
        fixed="3.0.11-1~deb12u2", detection="package")
    assert by_pkg["openssl"].source_package is None  # keyed by its own name


@pytest.mark.parametrize("installed, affected", [
    ("3.0.11-1~deb12u1", True),
    ("3.0.9-1", True),
    ("3.0.11-1~deb12u2", False),   # the fix itself
    ("3.0.11-1", False),           # ~deb12u2 sorts before the plain revision
    ("3.0.13-1~deb12u1", False),
    ("3.0.11-1~deb12u1+b1", True), # still below ~deb12u2
])
def test_tilde_ordering_decides_affected(installed: str, affected: bool) -> None:
    kb = KnowledgeBase.from_records([OPENSSL_DSA])
    findings = kb.match(host("Debian:12", deb("libssl3", installed, "openssl")))
    assert bool(findings) is affected


@pytest.mark.parametrize("installed, affected", [
    ("1:9.18.19-1~deb12u1", True),
    ("1:9.18.24-1", False),
    ("9.20.0-1", True),      # no epoch is epoch 0: below any 1: version
    ("2:9.16.0-1", False),   # a higher epoch wins whatever follows
])
def test_epochs(installed: str, affected: bool) -> None:
    record = osv("DSA-5621-1", "Debian:12", "bind9", [{"introduced": "0"}, {"fixed": "1:9.18.24-1"}])
    kb = KnowledgeBase.from_records([record])
    findings = kb.match(host("Debian:12", deb("bind9-libs", installed, "bind9")))
    assert bool(findings) is affected


def test_binnmu_is_matched_on_the_source_version_and_reports_the_installed_one() -> None:
    record = osv("DLA-1-1", "Debian:12", "libfoo", [{"introduced": "0"}, {"fixed": "1.2-4"}])
    kb = KnowledgeBase.from_records([record])
    pkg = deb("libfoo1", "1.2-3+b1", "libfoo", "1.2-3")
    [finding] = kb.match(host("Debian:12", pkg))
    assert (finding.installed, finding.fixed, finding.source_package) == ("1.2-3+b1", "1.2-4", "libfoo")
    fixed_already = KnowledgeBase.from_records(
        [osv("DLA-1-2", "Debian:12", "libfoo", [{"introduced": "0"}, {"fixed": "1.2-3"}])])
    assert fixed_already.match(host("Debian:12", pkg)) == []


def test_no_source_known_falls_back_to_the_binary_name_and_version() -> None:
    record = osv("DSA-9-1", "Debian:12", "curl", [{"introduced": "0"}, {"fixed": "7.88.1-10+deb12u5"}])
    kb = KnowledgeBase.from_records([record])
    [finding] = kb.match(host("Debian:12", deb("curl", "7.88.1-10+deb12u4")))
    assert finding.source_package is None and finding.fixed == "7.88.1-10+deb12u5"


def test_binary_name_is_not_used_when_the_source_is_known() -> None:
    # A binary whose name happens to be another source package's name.
    record = osv("DSA-7-1", "Debian:12", "libbar", [{"introduced": "0"}])
    kb = KnowledgeBase.from_records([record])
    assert kb.match(host("Debian:12", deb("libbar", "1.0-1", "bar-source"))) == []


def test_last_affected_is_inclusive() -> None:
    record = osv("DEBIAN-CVE-2024-1", "Debian:12", "libxml2",
                 [{"introduced": "0"}, {"last_affected": "2.9.14+dfsg-1.3"}])
    kb = KnowledgeBase.from_records([record])
    assert kb.match(host("Debian:12", deb("libxml2", "2.9.14+dfsg-1.3", "libxml2")))[0].fixed is None
    assert kb.match(host("Debian:12", deb("libxml2", "2.9.14+dfsg-1.2", "libxml2")))
    assert not kb.match(host("Debian:12", deb("libxml2", "2.9.14+dfsg-1.3+b1", "libxml2")))


def test_several_ranges_and_several_events() -> None:
    record = osv("OSV-MULTI", "Debian:12", "pkg",
                 [{"introduced": "1.0-1"}, {"fixed": "1.2-1"}, {"introduced": "2.0-1"}, {"fixed": "2.3-1"}],
                 extra_ranges=[[{"introduced": "3.0-1"}, {"last_affected": "3.1-1"}]])
    kb = KnowledgeBase.from_records([record])
    expect = {"0.9-1": None, "1.0-1": "1.2-1", "1.1-5": "1.2-1", "1.2-1": None, "1.9-1": None,
              "2.0-1": "2.3-1", "2.2-1": "2.3-1", "2.3-1": None, "3.0-1": "", "3.1-1": "",
              "3.1-2": None}
    for version, fixed in expect.items():
        findings = kb.match(host("Debian:12", deb("pkg", version, "pkg")))
        if fixed is None:
            assert findings == [], version
        else:
            assert [f.fixed for f in findings] == [fixed or None], version


def test_events_are_evaluated_in_version_order_whatever_their_order_in_the_file() -> None:
    record = osv("OSV-ORDER", "Debian:12", "pkg",
                 [{"fixed": "2.3-1"}, {"introduced": "2.0-1"}, {"fixed": "1.2-1"}, {"introduced": "0"}])
    kb = KnowledgeBase.from_records([record])
    assert [f.fixed for f in kb.match(host("Debian:12", deb("pkg", "1.1-1", "pkg")))] == ["1.2-1"]
    assert kb.match(host("Debian:12", deb("pkg", "1.5-1", "pkg"))) == []
    assert [f.fixed for f in kb.match(host("Debian:12", deb("pkg", "2.1-1", "pkg")))] == ["2.3-1"]


def test_versions_list_matches_exactly() -> None:
    record = osv("OSV-VERS", "Debian:12", "pkg", None, versions=["2.4.1-1", "1:2.4.2-1"])
    kb = KnowledgeBase.from_records([record])
    assert kb.match(host("Debian:12", deb("pkg", "2.4.1-1", "pkg")))[0].fixed is None
    assert kb.match(host("Debian:12", deb("pkg", "1:2.4.2-1", "pkg")))
    assert kb.match(host("Debian:12", deb("pkg", "2.4.2-1", "pkg"))) == []  # epoch differs


def test_withdrawn_records_are_ignored() -> None:
    record = osv("DSA-0-1", "Debian:12", "openssl", [{"introduced": "0"}],
                 withdrawn="2024-10-02T00:00:00Z")
    kb = KnowledgeBase.from_records([record])
    assert kb.match(host("Debian:12", deb("libssl3", "3.0.11-1~deb12u1", "openssl"))) == []
    assert kb.stats.withdrawn == 1


def test_records_of_other_ecosystems_never_match() -> None:
    records = [
        osv("GHSA-npm", "npm", "openssl", [{"introduced": "0"}]),
        osv("DSA-bullseye", "Debian:11", "openssl", [{"introduced": "0"}]),
        osv("USN-1", "Ubuntu:22.04:LTS", "openssl", [{"introduced": "0"}]),
        osv("ALPINE-1", "Alpine:v3.20", "openssl", [{"introduced": "0"}]),
        osv("UNKNOWN-1", "Plan9:4", "openssl", [{"introduced": "0"}]),
    ]
    kb = KnowledgeBase.from_records(records)
    assert kb.match(host("Debian:12", deb("libssl3", "3.0.11-1~deb12u1", "openssl"))) == []
    assert kb.stats.unknown_ecosystem == 2  # npm and Plan9: no known version order


def test_a_bare_distribution_record_applies_to_every_release() -> None:
    records = [osv("DEBIAN-BARE", "Debian", "openssl", [{"introduced": "0"}, {"fixed": "3.0.15-1"}])]
    kb = KnowledgeBase.from_records(records)
    assert ids(kb.match(host("Debian:12", deb("libssl3", "3.0.11-1~deb12u1", "openssl")))) == [
        ("DEBIAN-BARE", "libssl3")]


def test_one_finding_per_advisory_and_package_even_with_several_affected_entries() -> None:
    record = osv("DSA-5532-1", "Debian:12", "openssl", [{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u2"}])
    record["affected"].append({"package": {"ecosystem": "Debian", "name": "openssl"},
                               "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}]})
    kb = KnowledgeBase.from_records([record])
    findings = kb.match(host("Debian:12", deb("libssl3", "3.0.11-1~deb12u1", "openssl")))
    assert len(findings) == 1 and findings[0].fixed == "3.0.11-1~deb12u2"


def test_non_ecosystem_ranges_are_ignored() -> None:
    record = osv("GIT-1", "Debian:12", "pkg", None)
    record["affected"][0]["ranges"] = [{"type": "GIT", "repo": "https://example.invalid/x",
                                        "events": [{"introduced": "0"}, {"fixed": "abc123"}]}]
    kb = KnowledgeBase.from_records([record])
    assert kb.match(host("Debian:12", deb("pkg", "1.0-1", "pkg"))) == []


def test_an_unreadable_version_in_a_record_skips_that_entry_only() -> None:
    bad = osv("BAD-1", "Debian:12", "pkg", [{"introduced": "0"}, {"fixed": "x:1.0"}])
    good = osv("GOOD-1", "Debian:12", "pkg", [{"introduced": "0"}, {"fixed": "2.0-1"}])
    kb = KnowledgeBase.from_records([bad, good])
    assert ids(kb.match(host("Debian:12", deb("pkg", "1.0-1", "pkg")))) == [("GOOD-1", "pkg")]
    assert kb.stats.bad_versions == 1


# ------------------------------------------------------------------ Ubuntu, Alpine, RPM

def test_ubuntu_records_keyed_by_source() -> None:
    record = osv("USN-6986-1", "Ubuntu:22.04:LTS", "openssl",
                 [{"introduced": "0"}, {"fixed": "3.0.2-0ubuntu1.18"}])
    kb = KnowledgeBase.from_records([record])
    findings = kb.match(host("Ubuntu:22.04:LTS", deb("libssl3", "3.0.2-0ubuntu1.15", "openssl")))
    assert [(f.package, f.source_package, f.fixed) for f in findings] == [
        ("libssl3", "openssl", "3.0.2-0ubuntu1.18")]
    assert kb.match(host("Ubuntu:24.04:LTS", deb("libssl3", "3.0.2-0ubuntu1.15", "openssl"))) == []


def test_alpine_records_keyed_by_origin_with_apk_order() -> None:
    record = osv("ALPINE-CVE-2024-5535", "Alpine:v3.20", "openssl",
                 [{"introduced": "0"}, {"fixed": "3.3.2-r0"}])
    kb = KnowledgeBase.from_records([record])
    apk_host = lambda v: Packages(manager="apk", ecosystem="Alpine:v3.20", items=(  # noqa: E731
        Package(name="libcrypto3", version=v, source_name="openssl", source_version=v),))
    assert kb.match(apk_host("3.3.1-r3"))[0].source_package == "openssl"
    assert kb.match(apk_host("3.3.2_rc1-r0"))  # a pre-release is below the release
    assert kb.match(apk_host("3.3.2-r0")) == []
    assert kb.match(apk_host("3.3.2_p1-r0")) == []  # a post-release is above it


def test_rpm_records_keyed_by_binary_name_with_rpm_order() -> None:
    record = osv("ALSA-2024:1234", "AlmaLinux:9", "openssl-libs",
                 [{"introduced": "0"}, {"fixed": "1:3.0.7-25.el9_3"}])
    kb = KnowledgeBase.from_records([record])
    rpm_host = lambda v: Packages(manager="rpm", ecosystem="AlmaLinux:9", items=(  # noqa: E731
        Package(name="openssl-libs", version=v, arch="x86_64", source_name="openssl",
                source_version=v),))
    [finding] = kb.match(rpm_host("1:3.0.7-24.el9"))
    assert (finding.package, finding.source_package, finding.fixed) == ("openssl-libs", None, "1:3.0.7-25.el9_3")
    assert kb.match(rpm_host("1:3.0.7-25.el9_3")) == []
    assert kb.match(rpm_host("1:3.0.7-25.el9_3.1")) == []
    assert kb.match(rpm_host("3.2.2-1.el9")), "no epoch is below epoch 1"


def test_red_hat_cpe_ecosystems_apply_to_the_major_release() -> None:
    assert ecosystem_applies("Red Hat:enterprise_linux:9::appstream", "Red Hat:9")
    assert ecosystem_applies("Red Hat:enterprise_linux:9::baseos", "Red Hat:9.4")
    assert not ecosystem_applies("Red Hat:enterprise_linux:8::baseos", "Red Hat:9")
    assert not ecosystem_applies("Red Hat:rhel_eus:9.4::baseos", "Red Hat:9")
    assert ecosystem_applies("Red Hat:rhel_eus:9.4::baseos", "Red Hat:rhel_eus:9.4::baseos")
    assert ecosystem_applies("Rocky Linux", "Rocky Linux:9")
    assert not ecosystem_applies("Rocky Linux:8", "Rocky Linux:9")
    assert not ecosystem_applies("Debian:12", "Debian")  # a host with no release: only bare records


# ------------------------------------------------------------------ severity and title

V3 = "CVSS_V3"


@pytest.mark.parametrize("record, expected", [
    ({"database_specific": {"severity": 5}}, 5),
    ({"database_specific": {"severity": 1},
      "severity": [{"type": V3, "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]}, 1),
    ({"database_specific": {"severity": 9}}, 3),      # out of range: ignored
    ({"database_specific": {"severity": True}}, 3),   # not an integer
    ({"database_specific": {"severity": "high"}}, 3),
    ({"severity": [{"type": V3, "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]}, 5),  # 9.8
    ({"severity": [{"type": V3, "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"}]}, 4),  # 7.5
    ({"severity": [{"type": V3, "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:L/I:N/A:N"}]}, 3),  # 5.3
    ({"severity": [{"type": V3, "score": "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:N/A:N"}]}, 2),  # 3.1
    ({"severity": [{"type": V3, "score": "CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N"}]}, 1),  # 0.0
    ({"severity": [{"type": "CVSS_V4", "score":
                    "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N"}]}, 5),  # 9.3
    ({"severity": [{"type": V3, "score": "not a vector"}]}, 3),
    ({"severity": [{"type": "Ubuntu", "score": "medium"}]}, 3),
    ({}, 3),
])
def test_severity_rules(record: dict[str, Any], expected: int) -> None:
    assert severity_of(record) == expected


def test_severity_of_the_affected_entry_when_the_record_has_none() -> None:
    assert severity_of({}, {"database_specific": {"severity": 2}}) == 2
    assert severity_of({"database_specific": {"severity": 4}}, {"database_specific": {"severity": 2}}) == 4


def test_score_boundaries() -> None:
    assert [severity_from_score(s) for s in (10.0, 9.0, 8.9, 7.0, 6.9, 4.0, 3.9, 0.1, 0.0)] == [
        5, 5, 4, 4, 3, 3, 2, 2, 1]


def test_titles() -> None:
    assert title_of({"id": "X", "summary": "a summary", "details": "d"}) == "a summary"
    assert title_of({"id": "X", "details": "\nfirst line\nsecond"}) == "first line"
    assert title_of({"id": "X"}) == "X"


# ------------------------------------------------------------------ loading

def _write_bundle(path: Path, records: list[dict[str, Any]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def test_load_from_gzip_json_lines(tmp_path: Path) -> None:
    bundle = _write_bundle(tmp_path / "osv.jsonl.gz", [OPENSSL_DSA])
    kb = KnowledgeBase.load(bundle)
    assert kb.stats.records == 1 and kb.stats.entries == 1
    assert kb.match(host("Debian:12", deb("libssl3", "3.0.11-1~deb12u1", "openssl")))


@pytest.mark.parametrize("content, words", [
    (b"not gzip at all", "gzip"),
    (gzip.compress(b'{"id": "X"}\nnot json\n'), "line 2"),
    (gzip.compress(b'[1, 2]\n'), "not a JSON object"),
    (gzip.compress(b'{"id": "X", "affected": []}\n' * 50)[:-20], "gzip"),  # truncated
])
def test_load_refuses_what_is_not_gzip_json_lines(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(content)
    with pytest.raises(KbFormatError, match=words):
        KnowledgeBase.load(path)


def test_rpm_package_meets_an_advisory_once_through_binary_and_source_names() -> None:
    record = osv("RLSA-2024:1", "Rocky Linux:9", "openssl-libs", [{"introduced": "0"}, {"fixed": "1:3.0.7-27.el9"}])
    record["affected"].append({"package": {"ecosystem": "Rocky Linux:9", "name": "openssl"},
                               "ranges": [{"type": "ECOSYSTEM",
                                           "events": [{"introduced": "0"}, {"fixed": "1:3.0.7-27.el9"}]}]})
    kb = KnowledgeBase.from_records([record])
    items = (Package(name="openssl-libs", version="1:3.0.7-24.el9", source_name="openssl",
                     source_version="1:3.0.7-24.el9"),
             Package(name="openssl", version="1:3.0.7-24.el9", source_name="openssl",
                     source_version="1:3.0.7-24.el9"))
    findings = kb.match(Packages(manager="rpm", ecosystem="Rocky Linux:9", items=items))
    assert ids(findings) == [("RLSA-2024:1", "openssl"), ("RLSA-2024:1", "openssl-libs")]
