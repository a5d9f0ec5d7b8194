"""The project's own SMB network findings: stable IDs, and which facts raise which."""

from __future__ import annotations

from appliance.scan import winfindings as wf

ALL_SMB2 = ("2.0.2", "2.1", "3.0", "3.0.2", "3.1.1")


def ids(facts: wf.SmbFacts) -> list[str]:
    return [f.id for f in wf.smb_findings(facts)]


def test_catalog_ids_are_pinned() -> None:
    # IDs are a contract with the platform: changing one is a breaking change.
    assert {k: (v.title, v.severity) for k, v in wf.CATALOG.items()} == {
        "VSA-SMB-0001": ("SMBv1 is enabled", 3),
        "VSA-SMB-0002": ("SMB signing is not required", 3),
        "VSA-SMB-0003": ("NTLMv1 authentication is accepted", 3),
        "VSA-SMB-0004": ("No SMB 3 dialect is offered (no SMB encryption)", 2),
        "VSA-SMB-0005": ("Logins with invalid credentials are mapped to the guest account", 3),
    }
    assert all(spec.remedy for spec in wf.CATALOG.values())


def test_a_hardened_server_has_no_finding() -> None:
    assert ids(wf.SmbFacts(dialects=ALL_SMB2, signing_required=dict.fromkeys(ALL_SMB2, True))) == []


def test_signing_not_required_names_the_dialects() -> None:
    facts = wf.SmbFacts(dialects=ALL_SMB2, signing_required={**dict.fromkeys(ALL_SMB2, True), "2.0.2": False})
    (finding,) = wf.smb_findings(facts)
    assert finding.id == "VSA-SMB-0002" and "2.0.2" in (finding.evidence or "")
    assert (finding.source, finding.detection, finding.package) == ("vsa", "network", None)


def test_smb1_ntlmv1_guest_and_no_smb3() -> None:
    facts = wf.SmbFacts(dialects=("1.0", "2.0.2"), signing_required={"1.0": True, "2.0.2": True},
                        ntlmv1_accepted=True, guest_fallback=True)
    assert ids(facts) == ["VSA-SMB-0001", "VSA-SMB-0003", "VSA-SMB-0004", "VSA-SMB-0005"]


def test_unknown_signing_is_not_a_finding() -> None:
    assert ids(wf.SmbFacts(dialects=("3.1.1",), signing_required={})) == []


def test_nothing_learnt_nothing_found() -> None:
    assert ids(wf.SmbFacts()) == []


def test_finding_wire_shape_has_evidence() -> None:
    from appliance.results import HostResult, Target

    result = HostResult(target=Target(ip="10.77.0.2"), status="scanned")
    result.findings.extend(wf.smb_findings(wf.SmbFacts(dialects=("3.1.1",), signing_required={"3.1.1": False})))
    wire = result.to_wire()["findings"][0]
    assert wire["id"] == "VSA-SMB-0002" and wire["source"] == "vsa" and wire["detection"] == "network"
    assert wire["evidence"]
