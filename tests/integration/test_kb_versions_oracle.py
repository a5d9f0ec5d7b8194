"""Version order checked against the real package managers, on thousands of real versions.

- dpkg: ``dpkg --compare-versions`` on pairs drawn from this machine's package
  database, the apt package lists present on the machine, and the committed list
  of every bookworm/bookworm-updates/bookworm-security version
  (tests/fixtures/kb/debian-versions.txt.gz, provenance in its header).
- RPM: ``rpm.vercmp`` of Debian's rpm 4.18 (one Lua script compares every pair in
  one process) on RHEL/Fedora/Amazon-shaped EVRs and on the Debian versions read
  as EVRs (same ``epoch:version-release`` syntax).
- apk: apk-tools is not packaged for Debian 12, so apk's order is checked on
  apk-tools' own comparison table and on chains ordered by the real apk
  (tests/fixtures/kb/apk-*.txt, provenance in their headers).

Pairs are drawn deterministically: neighbours in string order (versions sharing
long prefixes, where the algorithms differ most), versions of the same package
across suites, and random pairs.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance.kb.versions import apk_key, dpkg_key, rpm_key
from tests.conftest import require, require_tool

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kb"
DPKG_PAIRS = 3000
RPM_DEBIAN_PAIRS = 6000
ORACLE_TIMEOUT_S = 120
SEED = 8


def _cmp(a: tuple, b: tuple) -> int:
    return (a > b) - (a < b)


def _fixture_lines(name: str) -> list[str]:
    path = FIXTURES / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]


def _installed_debian_versions() -> set[str]:
    """Versions (binary and source) from this machine's own dpkg database."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}\n${source:Version}\n"],
                         capture_output=True, text=True, timeout=ORACLE_TIMEOUT_S, check=True)
    return {v for v in out.stdout.split() if v}


def _apt_list_versions() -> set[str]:
    """Versions from whatever apt package lists this machine holds."""
    found: set[str] = set()
    helper = "/usr/lib/apt/apt-helper"
    for lst in Path("/var/lib/apt/lists").glob("*Packages*"):
        if not os.path.exists(helper):
            break
        text = subprocess.run([helper, "cat-file", str(lst)], capture_output=True, text=True,
                              timeout=ORACLE_TIMEOUT_S).stdout
        for line in text.splitlines():
            if line.startswith("Version: "):
                found.add(line[9:].strip())
    return found


def _draw_pairs(versions: list[str], count: int, rng: random.Random) -> list[tuple[str, str]]:
    ordered = sorted(versions)
    pairs: list[tuple[str, str]] = []
    # Neighbours in string order share long prefixes: the comparison goes deep.
    starts = rng.sample(range(len(ordered) - 1), min(count // 2, len(ordered) - 1))
    pairs += [(ordered[i], ordered[i + 1]) for i in starts]
    while len(pairs) < count:
        a, b = rng.choice(ordered), rng.choice(ordered)
        pairs.append((a, b))
    # Swap half, so that both directions of each relation are exercised.
    return [(b, a) if rng.random() < 0.5 else (a, b) for a, b in pairs]


def _dpkg_oracle(pairs: list[tuple[str, str]]) -> list[int]:
    """dpkg's answer for every pair: one dpkg process per question, two shells in parallel."""
    def run(chunk: list[tuple[str, str]]) -> list[int]:
        lines = []
        for a, b in chunk:
            assert "'" not in a + b
            lines.append(f"if dpkg --compare-versions '{a}' lt '{b}'; then echo -1; "
                         f"elif dpkg --compare-versions '{a}' eq '{b}'; then echo 0; else echo 1; fi")
        out = subprocess.run(["sh"], input="\n".join(lines) + "\n", capture_output=True,
                             text=True, timeout=ORACLE_TIMEOUT_S, check=True)
        return [int(x) for x in out.stdout.split()]

    half = len(pairs) // 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(run, [pairs[:half], pairs[half:]])
    return first + second


def _rpm_oracle(pairs: list[tuple[str, str]]) -> list[int]:
    """rpm.vercmp for every pair, all in one rpm process running a Lua loop."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pairs.txt"
        src.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
        lua = (f"for line in io.lines('{src}') do "
               "local a, b = line:match('^([^\\t]*)\\t(.*)$'); "
               "io.write(rpm.vercmp(a, b), '\\n') end")
        out = subprocess.run(["rpm", "--eval", "%{lua: " + lua + "}"], capture_output=True,
                             text=True, timeout=ORACLE_TIMEOUT_S, check=True)
    answers = [int(x) for x in out.stdout.split()]
    assert len(answers) == len(pairs), out.stderr
    return answers


def _report(mismatches: list[str], total: int) -> None:
    assert not mismatches, f"{len(mismatches)} of {total} pairs differ, e.g.\n" + "\n".join(mismatches[:20])


def _variants(versions: list[str], rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Real versions against what packaging does to them: binNMU, backports, security
    uploads, pre-releases and epochs (the corners of dpkg's order)."""
    pairs = []
    for v in rng.sample(versions, count):
        bare = v.split(":", 1)[-1]
        pairs += [(v, v + "+b1"), (v, v + "~bpo12+1"), (v, v + "~deb12u1"), (v, bare + "~rc1"),
                  (v, "1:" + bare if ":" not in v else bare)]
    return pairs


def test_dpkg_order_matches_dpkg_compare_versions() -> None:
    require_tool("dpkg")
    rng = random.Random(SEED)
    installed = sorted(_installed_debian_versions())
    listed = set(_fixture_lines("debian-versions.txt.gz")) | _apt_list_versions()
    require(len(installed) > 100 and len(listed) > 10000, "too few Debian versions found")
    pairs = _draw_pairs(installed, DPKG_PAIRS // 4, rng)           # this machine's packages
    pairs += _draw_pairs(sorted(listed), DPKG_PAIRS // 2, rng)     # the Debian package lists
    pairs += _variants(sorted(listed), rng, DPKG_PAIRS // 20)      # and what packaging does to them
    answers = _dpkg_oracle(pairs)
    mismatches = [f"{a} vs {b}: dpkg {want}, ours {_cmp(dpkg_key(a), dpkg_key(b))}"
                  for (a, b), want in zip(pairs, answers, strict=True) if _cmp(dpkg_key(a), dpkg_key(b)) != want]
    _report(mismatches, len(pairs))
    assert sum(1 for x in answers if x == 0) < len(answers)  # the oracle did answer


def _rpm_edge_pairs() -> list[tuple[str, str]]:
    """Hand-picked corners of rpmvercmp: tilde, caret, separators, epochs, releases."""
    edges = ["1.0", "1.0-1", "1.0-", "1", "1-", "1.0~rc1", "1.0~rc1-1", "1.0~rc1~git123", "1.0^",
             "1.0^git1", "1.0^git2", "1.0^git1~pre", "1.0~rc1^git1", "1.01", "1.0.1", "1.0a",
             "1.0aa", "10.0001", "10.1", "2_0", "2.0", "a", "a+", "+a", "_", "xyz10", "xyz10.1",
             "0:1", "1:1", "01:2", "1:2", ":1", "a:1", "b:1", "1:1.0-1.el8", "1.0-1.el8",
             "1-1.el7", "1-1.a", "1-1.", "1-1.1", "3.10.0-229.el7", "3.10.0-229.1.2.ael7b",
             "2.4.21-9.EL", "2.4.21-9.0.1.EL", "1.1.\u03b1", "1.1.a", "1.1.\u03b2\u03b2",
             "5.5p1", "5.5p10", "6.0.rc1", "6.0", "1.0-5", "1.0.5", "1-2-3", "1-2.3", "0.1", "~1"]
    return [(a, b) for a in edges for b in edges]


def test_rpm_order_matches_rpm_vercmp() -> None:
    require_tool("rpm")
    rng = random.Random(SEED)
    evrs = _fixture_lines("rpm-evrs.txt")
    pairs = [(a, b) for a in evrs for b in evrs]  # every ordered pair of the EVR list
    debian = sorted(set(_fixture_lines("debian-versions.txt.gz")))
    pairs += _draw_pairs(debian, RPM_DEBIAN_PAIRS, rng)
    pairs += _rpm_edge_pairs()
    answers = _rpm_oracle(pairs)
    mismatches = [f"{a} vs {b}: rpm {want}, ours {_cmp(rpm_key(a), rpm_key(b))}"
                  for (a, b), want in zip(pairs, answers, strict=True) if _cmp(rpm_key(a), rpm_key(b)) != want]
    _report(mismatches, len(pairs))
    assert len(pairs) > 30000


def _apk_table() -> list[tuple[str, str, str]]:
    rows = []
    for line in _fixture_lines("apk-version.data"):
        a, op, b = line.split("#", 1)[0].split()
        rows.append((a, op, b))
    for line in _fixture_lines("apk-chains.txt"):
        chain = line.split()
        rows += [(a, "<", b) for a, b in zip(chain, chain[1:], strict=False)]
    return rows


def test_apk_order_matches_apk_tools_table() -> None:
    if shutil.which("apk"):
        pytest.fail("apk is installed here: compare against `apk version -t` instead of the table")
    rows = _apk_table()
    symbols = {-1: "<", 0: "=", 1: ">"}
    mismatches = [f"{a} {op} {b}: ours {symbols[_cmp(apk_key(a), apk_key(b))]}"
                  for a, op, b in rows if symbols[_cmp(apk_key(a), apk_key(b))] != op]
    # The table's relations must hold in reverse too.
    mismatches += [f"{b} vs {a} (reverse of {op})" for a, op, b in rows
                   if symbols[_cmp(apk_key(b), apk_key(a))] != {"<": ">", ">": "<", "=": "="}[op]]
    _report(mismatches, len(rows))
    assert len(rows) > 900
