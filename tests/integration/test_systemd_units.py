"""The unit files pass `systemd-analyze verify` and rate below 2.0 in `systemd-analyze security`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from conftest import require

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vsa.service"
EXPOSURE_MARK = 2.0


def _unit_copy(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's vsa.
    vsa = shutil.which("vsa") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "vsa")
    text = UNIT.read_text().replace("/opt/vsa/venv/bin/vsa", vsa)
    copy = tmp_path / "vsa.service"
    copy.write_text(text)
    return copy


def test_verify_passes(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", str(_unit_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "vsa.service" not in result.stderr, result.stderr


def test_security_exposure_is_below_the_mark(tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(_unit_copy(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for vsa\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd_exposure={exposure}")
    assert exposure < EXPOSURE_MARK
