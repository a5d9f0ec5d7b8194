"""The project's own network findings for Windows/SMB hosts: stable IDs, titles, severities.

These findings come from what the SMB checker observed on the wire, not from
an OSV record, so they carry ``source`` ``vsa`` and ``detection`` ``network``
and an ``evidence`` string saying what was seen. IDs are stable: a platform
may key suppressions and history on them, so an ID is never reused for a
different weakness, and retired IDs stay retired.

Severities use the HostResult scale (1–5, 5 the most severe) and follow the
usual rating of each weakness by scanners and Microsoft's own guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.results import Finding


@dataclass(frozen=True)
class FindingSpec:
    """A kind of network finding: what every instance of it shares."""

    id: str
    title: str
    severity: int
    remedy: str  # for documentation and the platform's help text; not sent per finding


SMB1_ENABLED = FindingSpec(
    id="VSA-SMB-0001",
    title="SMBv1 is enabled",
    # The protocol of the wormable MS17-010 family; deprecated by Microsoft
    # since 2014 and off by default since Windows 10 1709. Medium on its own:
    # the missing patches are matched separately.
    severity=3,
    remedy="Disable SMB1 (Windows: Set-SmbServerConfiguration -EnableSMB1Protocol $false; "
    "Samba: server min protocol = SMB2_02).",
)
SIGNING_NOT_REQUIRED = FindingSpec(
    id="VSA-SMB-0002",
    title="SMB signing is not required",
    # Allows NTLM relay and tampering on the path; rated medium by common scanners.
    severity=3,
    remedy="Require signing (Windows: 'Microsoft network server: Digitally sign communications "
    "(always)'; Samba: server signing = mandatory).",
)
NTLMV1_ACCEPTED = FindingSpec(
    id="VSA-SMB-0003",
    title="NTLMv1 authentication is accepted",
    # NTLMv1 responses can be cracked to the NT hash whatever the password's strength.
    severity=3,
    remedy="Refuse NTLMv1 (Windows: LAN Manager authentication level 5, 'Send NTLMv2 response "
    "only. Refuse LM & NTLM'; Samba: ntlm auth = ntlmv2-only).",
)
NO_SMB3 = FindingSpec(
    id="VSA-SMB-0004",
    title="No SMB 3 dialect is offered (no SMB encryption)",
    severity=2,
    remedy="Enable SMB 3.x (Samba: server max protocol = SMB3; Windows 8/2012 and later offer it).",
)
GUEST_FALLBACK = FindingSpec(
    id="VSA-SMB-0005",
    title="Logins with invalid credentials are mapped to the guest account",
    severity=3,
    remedy="Stop mapping bad logins to guest (Samba: map to guest = Never; Windows: disable the "
    "Guest account and insecure guest logons).",
)

CATALOG: dict[str, FindingSpec] = {
    spec.id: spec for spec in (SMB1_ENABLED, SIGNING_NOT_REQUIRED, NTLMV1_ACCEPTED, NO_SMB3, GUEST_FALLBACK)
}

SMB3_DIALECTS = frozenset({"3.0", "3.0.2", "3.1.1"})


@dataclass(frozen=True)
class SmbFacts:
    """What the SMB checker observed, as far as findings need it.

    ``dialects``: every dialect the server agreed to (``"1.0"`` for SMB1).
    ``signing_required``: per dialect, whether the server's NEGOTIATE response
    required signing. ``ntlmv1_accepted``: an NTLMv1 login succeeded.
    ``guest_fallback``: the server answered our login with a guest session.
    """

    dialects: tuple[str, ...] = ()
    signing_required: dict[str, bool] = field(default_factory=dict)
    ntlmv1_accepted: bool = False
    guest_fallback: bool = False


def make_finding(spec: FindingSpec, evidence: str) -> Finding:
    """One instance of ``spec`` with its evidence."""
    return Finding(
        id=spec.id, source="vsa", severity=spec.severity, title=spec.title,
        detection="network", evidence=evidence,
    )


def smb_findings(facts: SmbFacts) -> list[Finding]:
    """The network findings that ``facts`` establish, in catalog order."""
    findings = []
    if "1.0" in facts.dialects:
        findings.append(make_finding(
            SMB1_ENABLED, "The server accepted an SMB1 NEGOTIATE for dialect NT LM 0.12."))
    unsigned = [d for d in facts.dialects if facts.signing_required.get(d) is False]
    if unsigned:
        findings.append(make_finding(
            SIGNING_NOT_REQUIRED,
            f"NEGOTIATE responses for dialect(s) {', '.join(unsigned)} did not set "
            "the signing-required bit."))
    if facts.ntlmv1_accepted:
        findings.append(make_finding(
            NTLMV1_ACCEPTED, "The server accepted an NTLMv1 login (24-byte NT response)."))
    smb2_up = [d for d in facts.dialects if d != "1.0"]
    if facts.dialects and not SMB3_DIALECTS.intersection(facts.dialects):
        offered = ", ".join(smb2_up) if smb2_up else "SMB1 only"
        findings.append(make_finding(NO_SMB3, f"Dialects agreed: {offered}."))
    if facts.guest_fallback:
        findings.append(make_finding(
            GUEST_FALLBACK, "A login with the scan's credentials was answered with a guest session."))
    return findings
