"""The pipeline gate of ``vsa scan --fail-on-severity N``."""

from __future__ import annotations

import pytest

from appliance.kb.gate import (
    EXIT_GATE_FAILED,
    EXIT_PASSED,
    MESSAGE_MAX_FINDINGS,
    GateThresholdInvalid,
    severity_gate,
    severity_gate_for_results,
)
from appliance.results import Finding, HostResult, Target


def finding(fid: str, severity: int, package: str = "openssl", fixed: str | None = "3.0.15-1") -> Finding:
    return Finding(id=fid, source="osv", severity=severity, title=f"{fid} title", package=package,
                   installed="3.0.11-1", fixed=fixed)


def test_passes_when_every_finding_is_below_the_threshold() -> None:
    verdict = severity_gate({"10.0.0.5": [finding("CVE-1", 3)], "10.0.0.6": []}, 4)
    assert verdict.passed and verdict.exit_code == EXIT_PASSED and verdict.hits == ()
    assert "no finding of severity 4 or more" in verdict.message


def test_fails_with_exit_3_naming_hosts_and_advisories() -> None:
    verdict = severity_gate({"10.0.0.6": [finding("CVE-2", 4), finding("CVE-3", 2)],
                             "i-0abc": [finding("CVE-1", 5, fixed=None)]}, 4)
    assert verdict.exit_code == EXIT_GATE_FAILED == 3 and not verdict.passed
    assert [(h.host_key, h.finding.id) for h in verdict.hits] == [("10.0.0.6", "CVE-2"), ("i-0abc", "CVE-1")]
    assert verdict.message.splitlines()[0] == (
        "2 findings of severity 4 or more on 2 hosts (--fail-on-severity 4):")
    assert "10.0.0.6: CVE-2 (severity 4) openssl 3.0.11-1, fixed in 3.0.15-1 - CVE-2 title" in verdict.message
    assert "i-0abc: CVE-1 (severity 5) openssl 3.0.11-1, no fix yet" in verdict.message
    assert "CVE-3" not in verdict.message


def test_threshold_is_inclusive() -> None:
    assert severity_gate({"h": [finding("CVE-1", 5)]}, 5).exit_code == 3
    assert severity_gate({"h": [finding("CVE-1", 1)]}, 1).exit_code == 3


@pytest.mark.parametrize("bad", [0, 6, -1, "4", True, 4.0])
def test_threshold_out_of_range_is_refused_with_words(bad: object) -> None:
    with pytest.raises(GateThresholdInvalid, match="from 1 to 5"):
        severity_gate({}, bad)  # type: ignore[arg-type]


def test_long_lists_are_cut_with_a_count() -> None:
    many = [finding(f"CVE-{i:03d}", 4) for i in range(MESSAGE_MAX_FINDINGS + 7)]
    verdict = severity_gate({"h": many}, 4)
    assert len(verdict.hits) == MESSAGE_MAX_FINDINGS + 7
    assert verdict.message.endswith("... and 7 more")


def test_over_host_results() -> None:
    result = HostResult(target=Target(ip="10.77.0.10", instance_id="i-0abc"), status="scanned",
                        findings=[finding("CVE-1", 4)])
    verdict = severity_gate_for_results([result], 4)
    assert verdict.hits[0].host_key == "i-0abc"
