"""The CI-sized run of bench/fuzz: every parser, a thousand mutated cases each, no failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES_PER_PARSER = 1000
TIMEOUT_S = 300


def test_small_fuzz_run_finds_no_failure() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuzz"), "--cases", str(CASES_PER_PARSER), "--seeds", "60",
         "--seed", "7"],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    figures = dict(pair.split("=", 1) for pair in last.split())
    assert run.returncode == 0 and figures.get("fuzz_failures") == "0", run.stdout[-4000:] + run.stderr[-2000:]
    assert int(figures["fuzz_parsers"]) >= 20
    assert int(figures["fuzz_min_cases_per_parser"]) >= CASES_PER_PARSER
