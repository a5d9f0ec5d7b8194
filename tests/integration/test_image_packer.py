"""`packer validate` passes on the AMI template, offline and without AWS credentials.

Debian 12's packer (1.6.6, amazon-ebs built in) predates two settings the template
needs: ``imds_support`` (Amazon plugin >= 1.1.0) and the ``metadata_options`` block.
So the template is checked twice: as written with ``-syntax-only``, and in full
(every builder and provisioner option, file sources, variables) on a copy without
those two settings. Both run with no network namespace route and an empty
environment, which proves validation needs neither AWS nor credentials.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import require_tool

IMAGE_BUILD = Path(__file__).resolve().parents[2] / "image-build"
TEMPLATE = IMAGE_BUILD / "vsa.pkr.hcl"
VALIDATE_TIMEOUT_S = 60


def _packer(packer: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # unshare -n: a network namespace with only a down loopback, so any AWS call fails.
    return subprocess.run(
        ["unshare", "--net", packer, *args],
        cwd=cwd, capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


def _without_modern_settings(text: str) -> str:
    """The template minus what Packer 1.6.6's amazon-ebs does not know."""
    text = re.sub(r"\n[ \t]*imds_support[ \t]*=.*", "", text)
    text, count = re.subn(r"\n[ \t]*metadata_options \{.*?\n[ \t]*\}", "", text, flags=re.S)
    assert count == 1, "the template has lost its metadata_options block"
    return text.replace("${path.root}", str(IMAGE_BUILD))


def test_template_requires_imdsv2_and_uses_debian_12() -> None:
    text = TEMPLATE.read_text()
    assert re.search(r'imds_support\s*=\s*"v2\.0"', text)
    assert re.search(r'http_tokens\s*=\s*"required"', text)
    assert '"136693071363"' in text and '"debian-12-amd64-*"' in text
    for script in re.findall(r'"\$\{path\.root\}/(provisioners/[^"]+\.sh)"', text):
        body = (IMAGE_BUILD / script).read_text()
        assert "set -o errexit -o nounset -o pipefail" in body, script
    scripts = re.findall(r"provisioners/([\w-]+)\.sh", text)
    assert scripts[-2:] == ["cleanup", "validate"], scripts


def test_packer_validates_the_template(tmp_path: Path) -> None:
    packer = require_tool("packer")
    syntax = _packer(packer, ["validate", "-syntax-only", str(TEMPLATE)], tmp_path)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr

    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    copy = tmp_path / "vsa-packer166.pkr.hcl"
    copy.write_text(_without_modern_settings(TEMPLATE.read_text()))
    full = _packer(packer, ["validate", "-var", f"wheel_dir={wheels}", str(copy)], tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr


def test_packer_formatting_is_canonical(tmp_path: Path) -> None:
    packer = require_tool("packer")
    result = _packer(packer, ["fmt", "-check", "-diff", str(TEMPLATE)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
