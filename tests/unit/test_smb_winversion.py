"""Windows product, build, UBR and updates from registry values: recorded and constructed fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.scan import winversion as wv

FIXTURES = Path(__file__).parent.parent / "fixtures" / "smb"
HOSTS = json.loads((FIXTURES / "windows-currentversion.json").read_text())["hosts"]
SAMBA = json.loads((FIXTURES / "samba-winreg.json").read_text())
CBS = json.loads((FIXTURES / "cbs-packages.json").read_text())


def as_values(raw: dict[str, list]) -> dict[str, wv.RegValue]:
    return {name: (kind, data) for name, (kind, data) in raw.items()}


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_current_version_fixtures(host: str) -> None:
    fixture = HOSTS[host]
    assert fixture["provenance"]
    parsed = wv.parse_current_version(as_values(fixture["values"]))
    expected = fixture["expected"]
    assert parsed.product_name == expected["product_name"]
    assert parsed.edition_id == expected["edition_id"]
    assert parsed.installation_type == expected["installation_type"]
    assert parsed.display_version == expected["display_version"]
    assert parsed.version == expected["version"]


def test_windows_10_frozen_current_version_is_not_taken_for_the_version() -> None:
    # REG_SZ-only listing: no CurrentMajorVersionNumber, CurrentVersion says 6.3.
    parsed = wv.parse_current_version(as_values(HOSTS["windows10-enterprise-22h2-sz-only"]["values"]))
    assert (parsed.major, parsed.minor, parsed.build, parsed.ubr) == (10, 0, 19045, None)


def test_samba_recorded_answer() -> None:
    """Samba serves CurrentVersion ("6.1") and SystemRoot only: a version, no product, no build."""
    assert "Samba" in SAMBA["provenance"]
    served = {name: (v["type"], v["data"]) for name, v in SAMBA["values"].items() if "error" not in v}
    assert set(served) == {"CurrentVersion", "SystemRoot"}
    assert all(v["error"] == 2 for v in SAMBA["values"].values() if "error" in v)  # ERROR_FILE_NOT_FOUND
    parsed = wv.parse_current_version(served)
    assert (parsed.major, parsed.minor, parsed.build, parsed.product_name) == (6, 1, None, None)
    assert parsed.version == "6.1"
    # Neither the CBS package list nor the environment key exists in Samba's registry.
    assert all(v == {"error": 2} for v in SAMBA["other_keys"].values())


def test_windows_11_naming_rules() -> None:
    assert wv.corrected_product_name("Windows 10 Enterprise", 22000, "Client") == "Windows 11 Enterprise"
    assert wv.corrected_product_name("Windows 10 Pro", 19045, "Client") == "Windows 10 Pro"
    assert wv.corrected_product_name("Windows Server 2025 Datacenter", 26100, "Server") == "Windows Server 2025 Datacenter"
    assert wv.corrected_product_name("Windows 10 Pro", 26100, None) == "Windows 11 Pro"
    assert wv.corrected_product_name(None, 26100, None) is None


def test_reg_value_helpers_are_strict() -> None:
    assert wv.reg_text((wv.REG_SZ, "abc\x00junk")) == "abc"
    assert wv.reg_text((wv.REG_SZ, "\x00")) is None
    assert wv.reg_text((wv.REG_DWORD, 5)) is None
    assert wv.reg_text((wv.REG_SZ, "x".encode("utf-16-le"))) == "x"
    assert wv.reg_int((wv.REG_DWORD, 3930)) == 3930
    assert wv.reg_int((wv.REG_SZ, "19045\x00")) == 19045
    assert wv.reg_int((wv.REG_SZ, "6.3\x00")) is None
    assert wv.reg_int((wv.REG_BINARY, b"\x01")) is None
    assert wv.reg_int(None) is None


def test_build_falls_back_to_buildlabex() -> None:
    parsed = wv.parse_current_version({"BuildLabEx": (wv.REG_SZ, "17763.1.amd64fre.rs5_release.180914-1434\x00")})
    assert parsed.build == 17763 and (parsed.major, parsed.minor) == (10, 0)


def test_empty_answer_is_empty() -> None:
    assert wv.parse_current_version({}).empty
    assert wv.parse_current_version({}).version is None


@pytest.mark.parametrize("raw,arch", [("AMD64", "x86_64"), ("x86", "x86"), ("ARM64", "arm64"), ("MIPS", "mips")])
def test_architecture(raw: str, arch: str) -> None:
    assert wv.architecture((wv.REG_SZ, raw + "\x00")) == arch
    assert wv.architecture(None) is None


def test_updates_from_cbs_packages() -> None:
    assert CBS["provenance"]
    states = CBS["states"]
    updates = wv.parse_updates(states)
    assert [[u.kb, u.state, u.in_effect] for u in updates] == CBS["expected_updates"]
    # The root package is read, not Package_1_for_…
    kb = next(u for u in updates if u.kb == "KB5034441")
    assert kb.package.startswith("Package_for_KB5034441~")
    assert list(wv.latest_rollup(states) or ()) == CBS["expected_latest_rollup"]


def test_kb_packages_ignore_non_kb_names() -> None:
    names = ["Package_for_ServicingStack_2905~31bf3856ad364e35~amd64~~19041.2905.1.0",
             "Microsoft-Windows-Foo-Package~31bf3856ad364e35~amd64~~10.0.1",
             "package_3_for_kb123~x~amd64~~1.0", "Package_10_for_KB123~x~amd64~~1.0"]
    assert wv.kb_packages(names) == {"KB123": "package_3_for_kb123~x~amd64~~1.0"}


def test_cbs_state_names() -> None:
    assert wv.cbs_state_name(0x70) == "installed"
    assert wv.cbs_state_name(0x80) == "permanent"
    assert wv.cbs_state_name(0x33) == "unknown (0x33)"
    assert wv.cbs_state_name(None) == "unknown"


def test_rollup_without_states_still_counts() -> None:
    assert wv.latest_rollup({"Package_for_RollupFix~31bf3856ad364e35~amd64~~17763.1577.1.5": None}) == (17763, 1577)
    assert wv.latest_rollup({"Package_for_RollupFix~31bf3856ad364e35~amd64~~17763.1577.1.5": 0x40}) is None
