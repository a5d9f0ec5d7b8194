"""The image's shell scripts: strict mode in each, and shellcheck-clean (warnings and up)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

IMAGE_BUILD = Path(__file__).resolve().parents[2] / "image-build"
SCRIPTS = sorted(
    [IMAGE_BUILD / "local-build", IMAGE_BUILD / "boot-test",
     *IMAGE_BUILD.glob("provisioners/*.sh"), *IMAGE_BUILD.glob("local/*.sh")]
)
STRICT = "set -o errexit -o nounset -o pipefail"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_and_executable(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), script
    assert STRICT in text, f"{script.name} lacks `{STRICT}`"
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


def test_scripts_pass_shellcheck() -> None:
    shellcheck = require_tool("shellcheck")
    result = subprocess.run([shellcheck, "--severity=warning", *map(str, SCRIPTS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
