"""The proof that the AMI works: the image built locally from Debian packages with
the AMI's own provisioning scripts boots under qemu, the appliance starts from
systemd, finds its PERSCODE through IMDSv2 and registers with the lab platform.

One command each, as an operator would run them: ``image-build/local-build OUT``
(mmdebstrap from the Debian mirror, the provisioning scripts in a chroot,
cleanup.sh then validate.sh, ext4 image) and ``image-build/boot-test OUT``
(qemu with TCG, user-mode networking restricted to two guestfwd relays to the
lab IMDS emulator and reference platform on 127.0.0.1). Measured on two shared
cores: about 3 minutes, 2 for the build (1.5 of it mmdebstrap), 1 for the boot.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require, require_tool

REPO = Path(__file__).resolve().parents[2]
IMAGE_BUILD = REPO / "image-build"
BUILD_TIMEOUT_S = 900
BOOT_TIMEOUT_S = 600


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + 120)
def test_image_boots_and_registers(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "the local image build needs root (chroot, mkfs)")
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-system-x86_64", "socat"):
        require_tool(tool)
    out = tmp_path / "image"

    started = time.monotonic()
    build = subprocess.run([str(IMAGE_BUILD / "local-build"), str(out)],
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    build_s = time.monotonic() - started
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    assert "validate: the image is generalized" in build.stdout
    assert (out / "vsa-local.raw").stat().st_size > 0

    # A code unique to this run, so that any leak of it is unmistakable.
    code = "bt-" + secrets.token_hex(8)
    started = time.monotonic()
    boot = subprocess.run([str(IMAGE_BUILD / "boot-test"), str(out)],
                          capture_output=True, text=True, timeout=BOOT_TIMEOUT_S + 60,
                          env={**os.environ, "VSA_BOOT_PERSCODE": code,
                               "VSA_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S)})
    boot_s = time.monotonic() - started
    print(boot.stdout)
    print(f"image_build_s={build_s:.0f} image_boot_s={boot_s:.0f}")
    assert boot.returncode == 0, boot.stdout[-4000:] + boot.stderr[-4000:]

    console = (out / "console.log").read_text(errors="replace")
    # Started by systemd (the journal+console prefix), in the boot's order.
    expected = [
        r"vsa\[\d+\]: vsa: vsa \S+ starting",
        r"vsa\[\d+\]: vsa: IMDSv2 in use \(session tokens\)",
        r"vsa\[\d+\]: vsa: personalization code found \(PERSCODE ending in " + code[-4:] + r"\)",
        r"vsa\[\d+\]: vsa: platform 169\.254\.0\.100:8443: reachable",
        r"vsa\[\d+\]: vsa: registered with the platform: appliance ID (vsa-\w+)",
    ]
    position = 0
    for pattern in expected:
        match = re.compile(pattern).search(console, position)
        assert match, f"{pattern!r} not found (in order) in the console:\n{console[-3000:]}"
        position = match.end()
    appliance_id = match.group(1)
    assert code not in console, "the PERSCODE reached the serial console"

    listed = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "appliance.lab.platform",
         "--data-dir", str(out / "lab-platform"), "list-appliances"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )
    appliances = {a["appliance_id"]: a for a in json.loads(listed.stdout)}
    assert appliance_id in appliances
    capabilities = appliances[appliance_id]["capabilities"]
    # The unit's sandbox still lets the daemon see the machine it sizes itself on.
    assert capabilities["memory_mb"] > 0 and capabilities["raw_sockets"] is True
