"""The build-pipeline gate: ``vsa scan ... --fail-on-severity N`` exits 3 on a finding of severity N or more.

Pure: it takes findings per host and returns a verdict with the exit code and a
message naming the hosts and advisories that tripped it (RUNTIME.md: exit 0 when
the scan ran, 3 when ``--fail-on-severity`` is met).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from appliance.kb.errors import KbError
from appliance.results import Finding, HostResult

EXIT_PASSED = 0
EXIT_GATE_FAILED = 3
SEVERITY_MIN, SEVERITY_MAX = 1, 5
# The message lists this many findings, then says how many more there are.
MESSAGE_MAX_FINDINGS = 20


class GateThresholdInvalid(KbError):
    """``--fail-on-severity`` is not an integer from 1 to 5."""


@dataclass(frozen=True)
class GateHit:
    """One finding at or above the threshold, on one host."""

    host_key: str
    finding: Finding


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer: the exit code, the findings that tripped it, and the words to print."""

    threshold: int
    exit_code: int
    hits: tuple[GateHit, ...]
    message: str

    @property
    def passed(self) -> bool:
        """True when no finding reached the threshold."""
        return self.exit_code == EXIT_PASSED


def check_threshold(threshold: object) -> int:
    """The threshold as an int 1-5, or GateThresholdInvalid with words for the operator."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) \
            or not SEVERITY_MIN <= threshold <= SEVERITY_MAX:
        raise GateThresholdInvalid(
            f"--fail-on-severity takes a severity from {SEVERITY_MIN} to {SEVERITY_MAX} "
            f"(5 the most severe), not {threshold!r}")
    return threshold


def _describe(hit: GateHit) -> str:
    f = hit.finding
    text = f"{hit.host_key}: {f.id} (severity {f.severity})"
    if f.package:
        text += f" {f.package} {f.installed or '?'}"
        text += f", fixed in {f.fixed}" if f.fixed else ", no fix yet"
    return text + f" - {f.title}"


def severity_gate(findings_by_host: Mapping[str, Iterable[Finding]], threshold: int) -> GateVerdict:
    """Exit code 3 when any finding has severity >= ``threshold``, with a message naming them."""
    threshold = check_threshold(threshold)
    hits = tuple(
        GateHit(host_key, finding)
        for host_key in sorted(findings_by_host)
        for finding in sorted(findings_by_host[host_key], key=lambda f: (-f.severity, f.id, f.package or ""))
        if finding.severity >= threshold
    )
    if not hits:
        return GateVerdict(threshold, EXIT_PASSED, (),
                           f"no finding of severity {threshold} or more")
    hosts = len({h.host_key for h in hits})
    lines = [f"{len(hits)} finding{'s' if len(hits) != 1 else ''} of severity {threshold} or more "
             f"on {hosts} host{'s' if hosts != 1 else ''} (--fail-on-severity {threshold}):"]
    lines += ["  " + _describe(h) for h in hits[:MESSAGE_MAX_FINDINGS]]
    if len(hits) > MESSAGE_MAX_FINDINGS:
        lines.append(f"  ... and {len(hits) - MESSAGE_MAX_FINDINGS} more")
    return GateVerdict(threshold, EXIT_GATE_FAILED, hits, "\n".join(lines))


def severity_gate_for_results(results: Iterable[HostResult], threshold: int) -> GateVerdict:
    """:func:`severity_gate` over HostResults, keyed by their host keys."""
    by_host: dict[str, list[Finding]] = {}
    for result in results:
        by_host.setdefault(result.host_key, []).extend(result.findings)
    return severity_gate(by_host, threshold)
