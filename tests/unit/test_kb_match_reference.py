"""The indexed matcher agrees with OSV's reference evaluation on thousands of random cases.

The reference is the schema's own algorithm written plainly: for every record and
affected entry, the events sorted by version and walked with the state machine
of https://ossf.github.io/osv-schema/#evaluation (introduced sets, fixed and
last_affected clear), plus exact ``versions``; versions compared from strings
with :func:`appliance.kb.versions.compare`. Versions are real ones from the
fixtures (Debian, RPM, Alpine), so the shapes are those of real advisories.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

from appliance.kb.match import KnowledgeBase
from appliance.kb.versions import compare, scheme_for_ecosystem
from appliance.results import Package, Packages

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kb"
RECORDS_PER_ECOSYSTEM = 400
HOSTS = 40
NAMES = ("alpha", "beta", "gamma", "delta", "eps")


def _pools() -> dict[str, list[str]]:
    with gzip.open(FIXTURES / "debian-versions.txt.gz", "rt", encoding="utf-8") as handle:
        debian = [v.strip() for v in handle if v.strip() and not v.startswith("#")]
    rpm = [v.strip() for v in (FIXTURES / "rpm-evrs.txt").read_text().splitlines()
           if v.strip() and not v.startswith("#")]
    apk: set[str] = set()
    for name in ("apk-chains.txt", "apk-version.data"):
        for line in (FIXTURES / name).read_text().splitlines():
            line = line.split("#", 1)[0]
            apk.update(t for t in line.split() if t not in ("<", ">", "="))
    rng = random.Random(1)
    return {"Debian:12": rng.sample(debian, 300), "AlmaLinux:9": rpm, "Alpine:v3.20": sorted(apk)}


def _random_events(rng: random.Random, pool: list[str], eco: str) -> list[dict[str, str]]:
    scheme = scheme_for_ecosystem(eco)
    assert scheme
    picks = sorted(rng.sample(pool, 4), key=lambda v: _Sortable(scheme, v))
    shape = rng.randrange(6)
    if shape == 0:
        return [{"introduced": "0"}, {"fixed": picks[1]}]
    if shape == 1:
        return [{"introduced": "0"}, {"last_affected": picks[2]}]
    if shape == 2:
        return [{"introduced": picks[0]}, {"fixed": picks[1]}, {"introduced": picks[2]}, {"fixed": picks[3]}]
    if shape == 3:
        return [{"introduced": "0"}]
    if shape == 4:
        return [{"introduced": picks[1]}, {"last_affected": picks[3]}]
    events = [{"introduced": "0"}, {"fixed": picks[3]}, {"introduced": picks[0]}]
    rng.shuffle(events)  # files do not always list events in order
    return events


class _Sortable:
    def __init__(self, scheme: str, version: str) -> None:
        self.scheme, self.version = scheme, version

    def __lt__(self, other: _Sortable) -> bool:
        return compare(self.scheme, self.version, other.version) < 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Sortable) and compare(self.scheme, self.version, other.version) == 0

    __hash__ = None  # type: ignore[assignment]


_EVENT_ORDER = {"fixed": 0, "last_affected": 1, "introduced": 2}


def _event_sort_key(scheme: str, item: tuple[str, str]) -> Any:
    """Sorted by version ("0" first); at equal versions a fix before an introduction."""
    kind, value = item
    return (value != "0" or kind != "introduced", _Sortable(scheme, value), _EVENT_ORDER[kind])


def _reference_affected(affected: dict[str, Any], version: str, scheme: str) -> bool:
    if any(compare(scheme, version, v) == 0 for v in affected.get("versions", [])):
        return True
    for rng in affected.get("ranges", []):
        flat = [(kind, value) for event in rng["events"] for kind, value in event.items()]
        state = False
        for kind, value in sorted(flat, key=lambda item: _event_sort_key(scheme, item)):
            if kind == "introduced" and (value == "0" or compare(scheme, version, value) >= 0):
                state = True
            elif kind == "fixed" and compare(scheme, version, value) >= 0:
                state = False
            elif kind == "last_affected" and compare(scheme, version, value) > 0:
                state = False
        if state:
            return True
    return False


def test_index_agrees_with_the_reference_evaluation() -> None:
    rng = random.Random(20261204)
    pools = _pools()
    records: list[dict[str, Any]] = []
    for eco, pool in pools.items():
        for i in range(RECORDS_PER_ECOSYSTEM):
            affected: dict[str, Any] = {"package": {"ecosystem": eco, "name": rng.choice(NAMES)}}
            affected["ranges"] = [{"type": "ECOSYSTEM", "events": _random_events(rng, pool, eco)}
                                  for _ in range(rng.choice((1, 1, 1, 2)))]
            if rng.random() < 0.15:
                affected["versions"] = rng.sample(pool, 3)
            records.append({"id": f"{eco}-{i}", "summary": "s", "affected": [affected]})
    kb = KnowledgeBase.from_records(records)
    agreed_hits = 0
    for eco, pool in pools.items():
        scheme = scheme_for_ecosystem(eco)
        assert scheme
        for _ in range(HOSTS):
            items = tuple(Package(name=n, version=rng.choice(pool), source_name=n) for n in NAMES)
            host = Packages(manager="x", ecosystem=eco, items=items)
            got = {(f.id, f.package) for f in kb.match(host)}
            want = {(r["id"], p.name) for r in records for a in r["affected"] for p in items
                    if a["package"]["ecosystem"] == eco and a["package"]["name"] == p.name
                    and _reference_affected(a, p.version, scheme)}
            assert got == want, (eco, sorted(got ^ want)[:5])
            agreed_hits += len(want)
    assert agreed_hits > 500  # the cases do hit, not only miss
