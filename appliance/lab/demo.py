"""The end-to-end demo on the embedded lab (the README's first command).

What it shows grows with the project; today: a contained network lab (a hub
namespace for the appliance and its services, target namespaces on a
bridge), the IMDS emulator answering at its real address 169.254.169.254
inside the lab, and ``vsa doctor`` run inside the lab as it runs on a fresh
instance: IMDSv2, the user-data with its personalization code, and the
platform check. Every step prints what really happened; the lab is torn down
at the end, even on failure.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.lab.netns import NetnsLab, lab_available

IMDS_ADDRESS = "169.254.169.254"
DEMO_PERSCODE = "DEMO-0000-4242"
STEP_TIMEOUT_S = 120


def say(message: str) -> None:
    """The demo's own narration (distinct from the appliance's ``vsa:`` lines)."""
    print(f"demo: {message}", flush=True)


def _wait_for_port(lab: NetnsLab, host: str, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    probe = (
        "import socket,sys\n"
        f"s=socket.socket(); s.settimeout(0.5)\n"
        f"sys.exit(s.connect_ex(('{host}', {port})))\n"
    )
    while time.monotonic() < deadline:
        if lab.hub_run(sys.executable, "-c", probe, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} in the lab after {timeout_s:g} s")


def run_demo(workdir: Path) -> int:
    """Build the lab, run the steps, tear it down; return the exit status."""
    reason = lab_available()
    if reason:
        say(f"cannot build the lab: {reason}")
        return 1
    with NetnsLab() as lab:
        say(f"lab namespaces use the prefix {lab.prefix}; the appliance runs in {lab.hub} at {lab.scanner_ip}")
        for name in ("web1", "db1"):
            host = lab.add_host(name, hostname=name)
            say(f"target {name} at {host.ip} (namespace {host.netns})")
        lab.add_hub_address(f"{IMDS_ADDRESS}/32")

        user_data = workdir / "user-data"
        user_data.write_text(f"# pasted into the EC2 launch wizard\nPERSCODE={DEMO_PERSCODE}\n")
        lab.popen(
            lab.hub,
            [sys.executable, "-m", "appliance.lab.imds", "--host", IMDS_ADDRESS, "--port", "80",
             "--mode", "v2-required", "--user-data-file", str(user_data)],
            stdout=subprocess.DEVNULL,
        )
        _wait_for_port(lab, IMDS_ADDRESS, 80)
        say(f"IMDS emulator answers at http://{IMDS_ADDRESS} inside the lab (IMDSv2 required)")

        config = workdir / "appliance.toml"
        platform_port = _free_port()
        config.write_text(
            f'[platform]\nurl = "https://127.0.0.1:{platform_port}"\n'
            f'[state]\ndir = "{workdir / "state"}"\n'
        )
        say("running `vsa doctor` inside the lab, as on a fresh instance "
            "(no platform runs yet in this demo, so its check must fail with a verdict)")
        vsa = shutil.which("vsa") or str(Path(sys.executable).with_name("vsa"))
        # No AWS API runs in this demo yet: point STS/EC2 at the lab's own loopback.
        env = {**os.environ, "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{platform_port}",
               "AWS_ENDPOINT_URL_EC2": f"http://127.0.0.1:{platform_port}"}
        result = subprocess.run(
            lab.hub_argv([vsa, "doctor", "--config", str(config)]),
            capture_output=True, text=True, timeout=STEP_TIMEOUT_S, env=env,
        )
        for line in result.stdout.splitlines():
            print(f"    {line}", flush=True)
        say(f"vsa doctor exited with {result.returncode} "
            f"({'all required checks passed' if result.returncode == 0 else 'a required check failed'})")
        imds_ok = "IMDSv2 at" in result.stdout
        code_ok = "PERSCODE found (ending in 4242)" in result.stdout
        leaked = DEMO_PERSCODE in result.stdout + result.stderr
        say(f"IMDSv2 used: {imds_ok}; personalization code found: {code_ok}; code shown in full: {leaked}")
        ok = imds_ok and code_ok and not leaked
    say("lab torn down")
    return 0 if ok else 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m appliance.lab.demo`` (``scripts/demo``)."""
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vsa-demo-") as tmp:
        return run_demo(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
