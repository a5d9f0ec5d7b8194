"""Windows product, build, UBR and installed updates, parsed from registry values.

Pure functions over what the remote registry (winreg over SMB) answered; the
I/O lives in :mod:`appliance.scan.smb`. Where each fact comes from:

* ``HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion``: ``ProductName``,
  ``EditionID``, ``InstallationType``, ``DisplayVersion`` (``22H2``; older
  releases only have ``ReleaseId``), ``CurrentBuildNumber`` (or ``CurrentBuild``),
  ``UBR`` (the update build revision: the cumulative update level, a DWORD),
  ``CurrentMajorVersionNumber``/``CurrentMinorVersionNumber`` (Windows 10 and
  later; ``CurrentVersion`` says ``6.3`` there for compatibility, and is the
  real version only before Windows 10). Windows 11 still says "Windows 10" in
  ``ProductName``: a client build of 22000 or more is Windows 11.
* Installed updates: the subkeys of
  ``HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages``,
  the servicing stack's own package list (what DISM and ``Get-HotFix`` read).
  A name such as ``Package_for_KB5034441~31bf3856ad364e35~amd64~~19041.3920.1.1``
  carries the KB number; its DWORD ``CurrentState`` says whether it is in effect
  (0x70 installed, 0x80 permanent, 0x50 superseded by a later update). The
  ``Package_for_RollupFix~…~~19041.3930.1.7`` entries name the latest cumulative
  update's build and revision. The ``Uninstall`` keys were not chosen: since
  Windows Vista they list programs, not Windows updates, and the ``HotFix`` key
  stopped being maintained after Windows XP/2003.
* ``HKLM\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Environment``:
  ``PROCESSOR_ARCHITECTURE`` (``AMD64``, ``x86``, ``ARM64``).

A registry value is handed in as impacket's ``hBaseRegQueryValue`` returns it:
a ``(type, data)`` pair, strings still NUL-terminated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_MULTI_SZ = 7
REG_QWORD = 11

RegValue = tuple[int, Any]

CURRENT_VERSION_KEY = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion"
CURRENT_VERSION_VALUES: tuple[str, ...] = (
    "ProductName", "EditionID", "InstallationType", "DisplayVersion", "ReleaseId",
    "CurrentBuildNumber", "CurrentBuild", "UBR", "CurrentMajorVersionNumber",
    "CurrentMinorVersionNumber", "CurrentVersion", "BuildLabEx",
)
CBS_PACKAGES_KEY = r"SOFTWARE\Microsoft\Windows\CurrentVersion\Component Based Servicing\Packages"
ENVIRONMENT_KEY = r"SYSTEM\CurrentControlSet\Control\Session Manager\Environment"
ARCH_VALUE = "PROCESSOR_ARCHITECTURE"

WINDOWS_10_FIRST_BUILD = 10240
WINDOWS_11_FIRST_BUILD = 22000

# CurrentState of a CBS package (the servicing stack's install states, x16).
CBS_STATES: dict[int, str] = {
    0x00: "absent",
    0x05: "uninstall pending",
    0x10: "resolving",
    0x20: "resolved",
    0x30: "staging",
    0x40: "staged",
    0x50: "superseded",
    0x60: "install pending",
    0x65: "partially installed",
    0x70: "installed",
    0x80: "permanent",
}
# States in which the update's fixes are in effect: superseded means a later
# installed update carries them.
CBS_IN_EFFECT = frozenset({0x50, 0x70, 0x80})

_DECIMAL_RE = re.compile(r"[0-9]{1,20}")  # a DWORD/QWORD written in decimal
# Numbers that int() reads are bounded ASCII digits (a hostile server may send 5,000 of them).
PACKAGE_KB_RE = re.compile(r"^Package_(?:([0-9]{1,9})_)?for_(KB\d+)(?:_\w+)?~", re.IGNORECASE)
ROLLUP_RE = re.compile(r"^Package_for_RollupFix~[^~]*~[^~]*~[^~]*~([0-9]{1,10})\.([0-9]{1,10})\.", re.IGNORECASE)
ARCHITECTURES = {"AMD64": "x86_64", "X86": "x86", "ARM64": "arm64", "IA64": "ia64", "ARM": "arm"}


@dataclass(frozen=True)
class WindowsVersion:
    """A Windows product and its exact build, as the registry describes it."""

    product_name: str | None = None  # "Windows 11 Pro" (corrected from the registry's "Windows 10 Pro")
    edition_id: str | None = None  # "Professional", "ServerDatacenter"
    installation_type: str | None = None  # "Client", "Server", "Server Core"
    display_version: str | None = None  # "22H2" (or ReleaseId "1909")
    major: int | None = None
    minor: int | None = None
    build: int | None = None
    ubr: int | None = None

    @property
    def version(self) -> str | None:
        """``major.minor.build.ubr`` as far as known, e.g. ``10.0.19045.3930``."""
        if self.major is None or self.minor is None:
            return None
        parts = [str(self.major), str(self.minor)]
        if self.build is not None:
            parts.append(str(self.build))
            if self.ubr is not None:
                parts.append(str(self.ubr))
        return ".".join(parts)

    @property
    def empty(self) -> bool:
        """Whether nothing at all was learnt."""
        return self == WindowsVersion()


def reg_text(value: RegValue | None) -> str | None:
    """A REG_SZ/REG_EXPAND_SZ value as text without its NULs, or None (empty or not text)."""
    if value is None:
        return None
    kind, data = value
    if kind not in (REG_SZ, REG_EXPAND_SZ):
        return None
    if isinstance(data, bytes):
        data = data.decode("utf-16-le", "replace")
    if not isinstance(data, str):
        return None
    text = data.split("\x00", 1)[0].strip()
    return text or None


def reg_int(value: RegValue | None) -> int | None:
    """A DWORD/QWORD, or a decimal string of one (CurrentBuild is a REG_SZ), or None."""
    if value is None:
        return None
    kind, data = value
    if kind in (REG_DWORD, REG_QWORD) and isinstance(data, int) and not isinstance(data, bool):
        return data
    text = reg_text(value)
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses; and a bounded
    # length, for int() refuses more than 4,300 digits.
    if text is not None and _DECIMAL_RE.fullmatch(text):
        return int(text)
    return None


def parse_current_version(values: Mapping[str, RegValue]) -> WindowsVersion:
    """Parse the values of ``Windows NT\\CurrentVersion`` (any subset) into a WindowsVersion."""
    build = reg_int(values.get("CurrentBuildNumber")) or reg_int(values.get("CurrentBuild"))
    if build is None:
        lab = reg_text(values.get("BuildLabEx"))  # "19041.1.amd64fre.vb_release.191206-1406"
        if lab and _DECIMAL_RE.fullmatch(lab.split(".", 1)[0]):
            build = int(lab.split(".", 1)[0])
    major = reg_int(values.get("CurrentMajorVersionNumber"))
    minor = reg_int(values.get("CurrentMinorVersionNumber"))
    if major is None and build is not None and build >= WINDOWS_10_FIRST_BUILD:
        # Windows 10 and later freeze CurrentVersion at "6.3" for old programs.
        major, minor = 10, 0
    elif major is None:
        # Before Windows 10, CurrentVersion is the real "major.minor".
        legacy = reg_text(values.get("CurrentVersion"))
        match = re.fullmatch(r"(\d+)\.(\d+)", legacy or "")
        if match:
            major, minor = int(match.group(1)), int(match.group(2))
    elif minor is None:
        minor = 0
    installation_type = reg_text(values.get("InstallationType"))
    return WindowsVersion(
        product_name=corrected_product_name(reg_text(values.get("ProductName")), build, installation_type),
        edition_id=reg_text(values.get("EditionID")),
        installation_type=installation_type,
        display_version=reg_text(values.get("DisplayVersion")) or reg_text(values.get("ReleaseId")),
        major=major, minor=minor, build=build, ubr=reg_int(values.get("UBR")),
    )


def corrected_product_name(name: str | None, build: int | None, installation_type: str | None) -> str | None:
    """Windows 11 keeps "Windows 10" in ProductName: name it by its build instead."""
    if name is None or build is None or build < WINDOWS_11_FIRST_BUILD:
        return name
    if installation_type is not None and installation_type.lower().startswith("server"):
        return name
    if name.startswith("Windows 10"):
        return "Windows 11" + name[len("Windows 10"):]
    return name


def architecture(value: RegValue | None) -> str | None:
    """``PROCESSOR_ARCHITECTURE`` in the names the HostResult uses (``x86_64``)."""
    text = reg_text(value)
    if text is None:
        return None
    return ARCHITECTURES.get(text.upper(), text.lower())


# ---- installed updates ----------------------------------------------------------------


@dataclass(frozen=True)
class InstalledUpdate:
    """One Windows update (KB) known to the servicing stack, and its state."""

    kb: str  # "KB5034441"
    state: str  # "installed", "superseded", "staged", ... or "unknown (0x..)" / "unknown"
    package: str  # the CBS package name it was read from

    @property
    def in_effect(self) -> bool:
        """Whether the update's fixes are on the host (installed, permanent or superseded)."""
        return self.state in {CBS_STATES[s] for s in CBS_IN_EFFECT}


def kb_packages(subkeys: Iterable[str]) -> dict[str, str]:
    """For each KB among CBS package names, the package whose state to read.

    A KB often has several packages (``Package_for_KB…``, ``Package_1_for_KB…``,
    ...); the un-numbered one is the update's root package, so it is preferred.
    """
    chosen: dict[str, tuple[int, str]] = {}
    for name in subkeys:
        match = PACKAGE_KB_RE.match(name)
        if not match:
            continue
        kb = match.group(2).upper()
        rank = 0 if match.group(1) is None else 1 + int(match.group(1))
        if kb not in chosen or (rank, name) < chosen[kb]:
            chosen[kb] = (rank, name)
    return {kb: name for kb, (_rank, name) in sorted(chosen.items())}


def cbs_state_name(state: int | None) -> str:
    """A CBS CurrentState in words."""
    if state is None:
        return "unknown"
    return CBS_STATES.get(state, f"unknown ({state:#x})")


def parse_updates(package_states: Mapping[str, int | None]) -> tuple[InstalledUpdate, ...]:
    """Updates from ``{package name: CurrentState}`` (None where the state was not served)."""
    updates = []
    for kb, package in kb_packages(package_states).items():
        updates.append(InstalledUpdate(kb=kb, state=cbs_state_name(package_states.get(package)), package=package))
    return tuple(updates)


def rollup_packages(subkeys: Iterable[str]) -> dict[str, tuple[int, int]]:
    """The cumulative-update (RollupFix) packages among CBS names, with their ``(build, revision)``."""
    found = {}
    for name in subkeys:
        match = ROLLUP_RE.match(name)
        if match:
            found[name] = (int(match.group(1)), int(match.group(2)))
    return found


def latest_rollup(package_states: Mapping[str, int | None]) -> tuple[int, int] | None:
    """The highest ``(build, revision)`` of a cumulative update in effect.

    A package whose state was not served counts (better a level than none);
    one that is staged, pending or absent does not.
    """
    levels = [
        level for name, level in rollup_packages(package_states).items()
        if package_states.get(name) is None or package_states.get(name) in CBS_IN_EFFECT
    ]
    return max(levels) if levels else None
