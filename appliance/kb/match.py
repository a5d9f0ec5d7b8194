"""Matching a host's installed packages against the OSV knowledge base.

A :class:`KnowledgeBase` is built once per bundle from its gzip JSON Lines file:
every OSV record is parsed, its ``affected`` entries compiled (event versions
turned into sort keys of the ecosystem's version order, see ``versions.py``) and
filed under ``(ecosystem, package name)``. Matching a host then costs a few dict
look-ups and tuple comparisons per installed package, whatever the size of the
knowledge base (bench/kb_match measures it against a plain loop over every record).

Semantics (https://ossf.github.io/osv-schema/):

- ``affected[].package.ecosystem`` and ``name`` select the records; ranges of type
  ``ECOSYSTEM`` with events ``introduced`` (``"0"`` is the beginning of time),
  ``fixed`` (first version not affected) and ``last_affected`` (last version
  affected), several ranges and several introduced/fixed pairs per range; the
  ``versions`` list names affected versions exactly. Other range types (SEMVER,
  GIT) say nothing about distribution packages and are ignored.
- A record with ``withdrawn`` set is ignored.
- Ecosystems: a record applies to a host when its ecosystem is the host's
  (``Debian:12`` to ``Debian:12``), or names the same distribution with no
  release at all (a bare ``Debian`` record applies to every Debian release: OSV
  defines the release suffix as optional, scoping a record *down* to one release,
  so a record without it is not scoped). Red Hat's CPE-like ecosystems
  (``Red Hat:enterprise_linux:9::appstream``) apply to a host ``Red Hat:9`` (or
  ``Red Hat:9.4``); the extended-support streams (``Red Hat:rhel_eus:9.4::baseos``)
  only to a host that names that very stream. Records of any other ecosystem never match, nor do records of an
  ecosystem whose version order is unknown here.
- Debian, Ubuntu and Alpine records are keyed by source package (Alpine by the
  origin package of its security database): a binary package is matched through its
  ``source_name``/``source_version``, and through its own name and version only
  when no source is known. RPM ecosystems are keyed by binary package name.
- Severity (PROTOCOL.md): ``database_specific.severity`` (integer 1-5) of the
  record, else of the matching ``affected`` entry; else the highest base score of
  the CVSS vectors in ``severity`` (v3, else v4, else v2: >=9.0 -> 5, >=7.0 -> 4,
  >=4.0 -> 3, >0 -> 2); else 3.
- One :class:`~appliance.results.Finding` per (advisory, installed package), with
  the installed version, the ``fixed`` event of the matching range (None when the
  range has none, or the version matched through ``versions``).
"""

from __future__ import annotations

import gc
import gzip
import json
import logging
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from appliance.kb.errors import KbFormatError
from appliance.kb.versions import (
    KeyFunction,
    VersionError,
    VersionKey,
    key_function,
    scheme_for_ecosystem,
)
from appliance.results import Finding, Package, Packages

log = logging.getLogger(__name__)

DEFAULT_SEVERITY = 3
TITLE_MAX_CHARS = 300
# Distributions whose OSV records are keyed by the source package.
SOURCE_KEYED_DISTRIBUTIONS = frozenset({"Debian", "Ubuntu", "Alpine"})
_CVSS_PREFERENCE = ("CVSS_V3", "CVSS_V4", "CVSS_V2")


# ------------------------------------------------------------------ severity

def severity_from_score(score: float) -> int:
    """PROTOCOL.md's mapping of a CVSS base score to a severity 1-5."""
    if score >= 9.0:
        return 5
    if score >= 7.0:
        return 4
    if score >= 4.0:
        return 3
    if score > 0:
        return 2
    return 1


@lru_cache(maxsize=65536)  # advisories share a few thousand distinct vectors
def cvss_base_score(kind: str, vector: str) -> float | None:
    """The base score of a CVSS vector of OSV ``severity[].type`` ``kind``, None if unreadable."""
    from cvss import CVSS2, CVSS3, CVSS4  # imported here: only records without a severity need it
    from cvss.exceptions import CVSSError

    classes = {"CVSS_V3": CVSS3, "CVSS_V4": CVSS4, "CVSS_V2": CVSS2}
    cls = classes.get(kind)
    if cls is None or not isinstance(vector, str):
        return None
    try:
        return float(cls(vector.strip()).base_score)
    except (CVSSError, ValueError, KeyError, IndexError) as exc:
        log.debug("unreadable %s vector %r: %s", kind, vector, exc)
        return None


def _declared_severity(obj: Any) -> int | None:
    specific = obj.get("database_specific") if isinstance(obj, dict) else None
    if isinstance(specific, dict):
        value = specific.get("severity")
        # bool is an int in Python; a True severity is not a severity.
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5:
            return value
    return None


def severity_of(record: dict[str, Any], affected: dict[str, Any] | None = None) -> int:
    """Severity 1-5 of an OSV record (and the matching affected entry), as PROTOCOL.md says."""
    declared = _declared_severity(record)
    if declared is None and affected is not None:
        declared = _declared_severity(affected)
    if declared is not None:
        return declared
    vectors: list[tuple[str, str]] = []
    for source in (record, affected or {}):
        items = source.get("severity")
        # OSV's severity is a list; a record with anything else there has no vectors to read.
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict):
                vectors.append((str(item.get("type")), item.get("score")))  # type: ignore[arg-type]
    for kind in _CVSS_PREFERENCE:
        scores = [s for t, v in vectors
                  if t == kind and isinstance(v, str) and (s := cvss_base_score(t, v)) is not None]
        if scores:
            return severity_from_score(max(scores))
    return DEFAULT_SEVERITY


def title_of(record: dict[str, Any]) -> str:
    """The finding title: the summary, else the first line of details, else the id."""
    for text in (record.get("summary"), record.get("details")):
        if isinstance(text, str) and text.strip():
            first = text.strip().splitlines()[0].strip()
            return first[:TITLE_MAX_CHARS]
    return str(record.get("id"))


# ---------------------------------------------------------------- ecosystems

def _split_ecosystem(ecosystem: str) -> tuple[str, str]:
    head, _, rest = ecosystem.partition(":")
    return head.strip(), rest.strip()


def _red_hat_release(rest: str) -> str | None:
    # "enterprise_linux:9::appstream" -> "9"; "9" or "9.4" -> "9"
    parts = [p for p in rest.split(":") if p]
    for part in parts:
        major = part.split(".")[0]
        if major.isdigit():
            return major
    return None


def ecosystem_applies(record_ecosystem: str, host_ecosystem: str) -> bool:
    """Whether records of ``record_ecosystem`` apply to a host on ``host_ecosystem``."""
    if record_ecosystem == host_ecosystem:
        return True
    rec_head, rec_rest = _split_ecosystem(record_ecosystem)
    host_head, host_rest = _split_ecosystem(host_ecosystem)
    if rec_head != host_head:
        return False
    if not rec_rest:
        return True  # a bare distribution record is not scoped to a release
    if rec_head == "Red Hat" and rec_rest.startswith("enterprise_linux:"):
        # The main RHEL streams (baseos, appstream, ...) of a major release; the
        # extended-support streams (rhel_eus, rhel_aus, ...) only match exactly.
        release = _red_hat_release(rec_rest)
        return release is not None and release == _red_hat_release(host_rest)
    return False


# ------------------------------------------------------------ compiled model

@dataclass(frozen=True)
class Advisory:
    """What a finding needs from one OSV record."""

    id: str
    title: str
    raw_severity: dict[str, Any]  # database_specific and severity of the record only


class Interval(NamedTuple):
    """An affected interval of one range: ``lo <= v < hi`` (``<=`` when last_affected)."""

    lo: VersionKey | None  # None: from the beginning ("introduced": "0")
    hi: VersionKey | None  # None: no fix known
    hi_inclusive: bool
    fixed: str | None  # the fixed event's text, reported in the finding


@dataclass(eq=False)
class Entry:
    """One compiled ``affected`` entry of one advisory; its severity is computed on first use."""

    advisory: Advisory
    ecosystem: str
    package: str
    scheme: str
    intervals: tuple[Interval, ...]
    versions: frozenset[VersionKey]
    specific: dict[str, Any] | None  # severity inputs of the affected entry, if any
    _severity: int | None = field(default=None, repr=False)

    @property
    def severity(self) -> int:
        """Severity 1-5 of this advisory for this affected entry (CVSS parsed once)."""
        if self._severity is None:
            self._severity = severity_of(self.advisory.raw_severity, self.specific)
        return self._severity

    def matches(self, key: VersionKey) -> tuple[bool, str | None]:
        """Whether an installed version (as key) is affected, and the fixed version."""
        for lo, hi, hi_inclusive, fixed in self.intervals:
            if lo is not None and key < lo:
                continue
            if hi is None or key < hi or (hi_inclusive and key == hi):
                return True, fixed
        if key in self.versions:
            return True, None
        return False, None


def _compile_range(events: list[Any], keyf: KeyFunction) -> list[Interval]:
    """Intervals of one ECOSYSTEM range, from its events in version order (OSV's evaluation)."""
    keyed: list[tuple[int, VersionKey | None, str, str]] = []
    for event in events:
        if not isinstance(event, dict):
            continue
        for kind in ("introduced", "fixed", "last_affected"):
            value = event.get(kind)
            if not isinstance(value, str):
                continue
            if kind == "introduced" and value.strip() == "0":
                keyed.append((0, None, kind, value))
            else:
                keyed.append((1, keyf(value), kind, value))  # VersionError propagates
    # Sort by version; "0" first. At equal versions, a fix closes before an
    # introduction reopens (so "fixed X, introduced X" leaves X affected).
    order = {"fixed": 0, "last_affected": 1, "introduced": 2}
    keyed.sort(key=lambda e: (e[0], e[1] if e[1] is not None else (), order[e[2]]))
    intervals: list[Interval] = []
    open_lo: VersionKey | None = None
    is_open = False
    for _, key, kind, text in keyed:
        if kind == "introduced":
            if not is_open:
                open_lo, is_open = key, True
        elif is_open:
            intervals.append(Interval(open_lo, key, kind == "last_affected",
                                      text if kind == "fixed" else None))
            is_open = False
    if is_open:
        intervals.append(Interval(open_lo, None, False, None))
    return intervals


class Bucket:
    """The entries of one (ecosystem, package), arranged so a version finds its hits by bisection.

    Most OSV entries say "affected from the beginning up to a fix" (or up to a
    last affected version): sorted by that bound, the entries affecting a version
    are a suffix of the list, found with one binary search. Entries of any other
    shape (several intervals, a lower bound, a versions list) are checked one by one.
    """

    __slots__ = ("fixed_bounds", "fixed_entries", "last_bounds", "last_entries", "always", "general")

    def __init__(self, entries: list[Entry]) -> None:
        fixed: list[tuple[VersionKey, int, Entry]] = []
        last: list[tuple[VersionKey, int, Entry]] = []
        self.always: list[Entry] = []
        self.general: list[Entry] = []
        for order, entry in enumerate(entries):
            if len(entry.intervals) == 1 and not entry.versions and entry.intervals[0].lo is None:
                hi = entry.intervals[0].hi
                if hi is None:
                    self.always.append(entry)
                elif entry.intervals[0].hi_inclusive:
                    last.append((hi, order, entry))
                else:
                    fixed.append((hi, order, entry))
            else:
                self.general.append(entry)
        fixed.sort(key=lambda item: (item[0], item[1]))
        last.sort(key=lambda item: (item[0], item[1]))
        self.fixed_bounds = [item[0] for item in fixed]
        self.fixed_entries = [item[2] for item in fixed]
        self.last_bounds = [item[0] for item in last]
        self.last_entries = [item[2] for item in last]

    def hits(self, key: VersionKey) -> Iterator[tuple[Entry, str | None]]:
        """Every entry affecting the version ``key``, with the fix of its matching interval."""
        # Affected when key < fix: the entries whose bound is above key.
        for entry in self.fixed_entries[bisect_right(self.fixed_bounds, key):]:
            yield entry, entry.intervals[0].fixed
        # Affected when key <= last_affected.
        for entry in self.last_entries[bisect_left(self.last_bounds, key):]:
            yield entry, None
        for entry in self.always:
            yield entry, None
        for entry in self.general:
            hit, fixed = entry.matches(key)
            if hit:
                yield entry, fixed


@dataclass
class LoadStats:
    """What loading a bundle kept and skipped, for the journal and the console."""

    records: int = 0
    withdrawn: int = 0
    entries: int = 0
    unknown_ecosystem: int = 0
    bad_versions: int = 0
    skipped_records: int = 0


def _severity_inputs(obj: dict[str, Any]) -> dict[str, Any] | None:
    inputs: dict[str, Any] = {k: obj[k] for k in ("database_specific", "severity") if k in obj}
    return inputs or None


def _list(value: Any) -> list[Any]:
    """``value`` when it is a list, else no items (a hostile record may put anything there)."""
    return value if isinstance(value, list) else []


def compile_record(record: dict[str, Any], stats: LoadStats) -> list[Entry]:
    """The compiled entries of one OSV record (none when withdrawn or not applicable)."""
    if record.get("withdrawn"):
        stats.withdrawn += 1
        return []
    rid = record.get("id")
    affected_list = record.get("affected")
    if not isinstance(rid, str) or not isinstance(affected_list, list):
        stats.skipped_records += 1
        return []
    advisory = Advisory(rid, title_of(record), _severity_inputs(record) or {})
    entries: list[Entry] = []
    for affected in affected_list:
        if not isinstance(affected, dict):
            continue
        package = affected.get("package")
        if not isinstance(package, dict):
            continue
        ecosystem, name = package.get("ecosystem"), package.get("name")
        if not isinstance(ecosystem, str) or not isinstance(name, str):
            continue
        scheme = scheme_for_ecosystem(ecosystem)
        if scheme is None:
            stats.unknown_ecosystem += 1
            continue
        keyf = key_function(scheme)
        intervals: list[Interval] = []
        versions: set[VersionKey] = set()
        try:
            for rng in _list(affected.get("ranges")):
                if isinstance(rng, dict) and rng.get("type") == "ECOSYSTEM":
                    intervals += _compile_range(_list(rng.get("events")), keyf)
            for version in _list(affected.get("versions")):
                if isinstance(version, str):
                    versions.add(keyf(version))
        except VersionError as exc:
            stats.bad_versions += 1
            log.debug("record %s, %s/%s: %s", rid, ecosystem, name, exc)
            continue
        if not intervals and not versions:
            continue
        entries.append(Entry(advisory, ecosystem, name, scheme, tuple(intervals),
                             frozenset(versions), _severity_inputs(affected)))
    return entries


# ------------------------------------------------------------ knowledge base

@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the index is built.

    Building allocates millions of containers and creates no cycles; the
    collector's full passes over them doubled the build time (measured with
    bench/kb_match). Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def iter_bundle_records(path: Path) -> Iterator[dict[str, Any]]:
    """The OSV records of a gzip JSON Lines file, one dict per non-blank line."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise KbFormatError(f"line {number} of the bundle is not JSON ({exc.msg})") from exc
                except RecursionError:
                    # json's decoder recurses per nesting level: a line of "[[[[..." exhausts the stack.
                    raise KbFormatError(f"line {number} of the bundle nests too deeply to be an OSV record") from None
                if not isinstance(record, dict):
                    raise KbFormatError(f"line {number} of the bundle is not a JSON object")
                yield record
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise KbFormatError(f"the bundle is not a complete gzip file ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise KbFormatError(f"the bundle is not UTF-8 text ({exc.reason})") from exc


@dataclass
class KnowledgeBase:
    """OSV records indexed by (ecosystem, package name), ready to match hosts against."""

    index: dict[tuple[str, str], list[Entry]] = field(default_factory=dict)
    stats: LoadStats = field(default_factory=LoadStats)
    _ecosystems_for_host: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    _by_ecosystem: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: Path) -> KnowledgeBase:
        """Build the index from a gzip JSON Lines bundle; KbFormatError if it is not one."""
        return cls.from_records(iter_bundle_records(Path(path)))

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> KnowledgeBase:
        """Build the index from OSV records (parsed as they are read when ``records`` is lazy)."""
        kb = cls()
        with _gc_paused():
            for record in records:
                kb.stats.records += 1
                for entry in compile_record(record, kb.stats):
                    kb.index.setdefault((entry.ecosystem, entry.package), []).append(entry)
                    kb._by_ecosystem.setdefault(entry.ecosystem, set())
                    kb.stats.entries += 1
            kb._buckets = {key: Bucket(entries) for key, entries in kb.index.items()}
        return kb

    def ecosystems_for(self, host_ecosystem: str) -> tuple[str, ...]:
        """The record ecosystems of this knowledge base that apply to a host ecosystem."""
        cached = self._ecosystems_for_host.get(host_ecosystem)
        if cached is None:
            # The most specific first: when several entries of one advisory
            # apply, the finding reports the release-scoped one's fix.
            cached = tuple(sorted((e for e in self._by_ecosystem
                                   if ecosystem_applies(e, host_ecosystem)),
                                  key=lambda e: (e != host_ecosystem, -len(e), e)))
            self._ecosystems_for_host[host_ecosystem] = cached
        return cached

    def match(self, packages: Packages) -> list[Finding]:
        """Findings for a host's packages: one per (advisory, installed package)."""
        ecosystems = self.ecosystems_for(packages.ecosystem)
        if not ecosystems:
            return []
        source_keyed = _split_ecosystem(packages.ecosystem)[0] in SOURCE_KEYED_DISTRIBUTIONS
        # Binaries of one source at one version share the evaluation: group them.
        groups: dict[tuple[str, str], list[Package]] = {}
        for pkg in packages.items:
            if source_keyed and pkg.source_name:
                groups.setdefault((pkg.source_name, pkg.source_version or pkg.version), []).append(pkg)
            else:
                groups.setdefault((pkg.name, pkg.version), []).append(pkg)
                if pkg.source_name and pkg.source_name != pkg.name:
                    # RPM records are keyed by binary name; a source-named record still counts.
                    groups.setdefault((pkg.source_name, pkg.source_version or pkg.version),
                                      []).append(pkg)
        findings: list[Finding] = []
        append = findings.append
        # Only a package filed under two names (RPM: binary and source) can meet
        # one advisory twice; track what was reported for those alone.
        twice: set[int] = set()
        if not source_keyed:
            counted: set[int] = set()
            for pkgs in groups.values():
                for p in pkgs:
                    (twice if id(p) in counted else counted).add(id(p))
        reported: set[tuple[str, str]] = set()
        keys: dict[tuple[str, str], VersionKey | None] = {}
        for (name, version), pkgs in groups.items():
            for entry, fixed in self._evaluate(name, version, ecosystems, keys):
                advisory_id, title, severity = entry.advisory.id, entry.advisory.title, entry.severity
                for pkg in pkgs:
                    if twice and id(pkg) in twice:
                        if (advisory_id, pkg.name) in reported:
                            continue
                        reported.add((advisory_id, pkg.name))
                    append(Finding(advisory_id, "osv", severity, title, pkg.name,
                                   name if name != pkg.name else None, pkg.version, fixed, "package"))
        return findings

    def _evaluate(self, name: str, version: str, ecosystems: tuple[str, ...],
                  keys: dict[tuple[str, str], VersionKey | None]) -> list[tuple[Entry, str | None]]:
        """The entries (one per advisory) affecting ``name`` at ``version``, with their fix."""
        hits: list[tuple[Entry, str | None]] = []
        seen: set[str] = set()
        for ecosystem in ecosystems:
            bucket = self._buckets.get((ecosystem, name))
            if bucket is None:
                continue
            scheme = self.index[(ecosystem, name)][0].scheme  # one ecosystem, one version order
            key = keys.get((scheme, version), _MISSING)
            if key is _MISSING:
                try:
                    key = key_function(scheme)(version)
                except VersionError:
                    key = None  # an unreadable installed version matches nothing
                keys[(scheme, version)] = key
            if key is None:
                continue
            for entry, fixed in bucket.hits(key):
                if entry.advisory.id not in seen:
                    seen.add(entry.advisory.id)
                    hits.append((entry, fixed))
        return hits


_MISSING: Any = object()
