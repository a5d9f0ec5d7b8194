"""``vsa scan``: a one-off scan from the command line, without any platform (RUNTIME.md).

The main ``vsa`` command line calls :func:`add_arguments` on its ``scan``
subparser and :func:`run` with the parsed arguments. Exit status: 0 when the
scan ran (whatever it found), 2 for bad arguments, 1 for an internal failure
(3 for ``--fail-on-severity`` is reserved for when findings exist).

Authentication and knowledge-base options are accepted and validated now so
that scripts can be written against them; until their engines are wired in
they end the command with status 2 and "not available yet".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from appliance.config import load_config
from appliance.errors import ConfigError, VsaError
from appliance.scan import portlists, report
from appliance.scan.portscan import PortScanOptions, ScanOptionError, scan_targets
from appliance.scan.synscan import DEFAULT_RATE_PPS
from appliance.scan.targets import TargetError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
DEFAULT_PARALLEL_HOSTS = 16
PROGRESS_INTERVAL_S = 0.1
BAR_WIDTH = 30


class UsageError(VsaError):
    """The command line is wrong; the message says what to change."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``vsa scan`` to ``parser``."""
    parser.add_argument("targets", nargs="+", metavar="TARGET",
                        help="addresses, CIDR blocks and first-last ranges (IPv4 or IPv6)")
    parser.add_argument("--ports", default="standard", metavar="SPEC",
                        help="light (100), standard (1,000; default), full, or a list such as 22,80,8000-8100")
    parser.add_argument("--udp-ports", default="none", metavar="SPEC", help="none (default), light (20), or a list")
    parser.add_argument("--exclude", action="append", default=[], metavar="TARGETS",
                        help="addresses, CIDRs or ranges never to probe (repeatable, comma-separated)")
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE_PPS, metavar="PPS",
                        help=f"probes per second (default {DEFAULT_RATE_PPS})")
    parser.add_argument("--max-parallel-hosts", type=int, default=None, metavar="N",
                        help="hosts probed for services at once (default: scan.max_parallel_hosts, else 16)")
    parser.add_argument("--no-discovery", action="store_true", help="treat every target as alive")
    parser.add_argument("--service-detection", choices=("banner", "nmap", "none"), default="banner",
                        help="banner (default): own probes; nmap: nmap -sV where installed; none: ports only")
    parser.add_argument("--engine", choices=("auto", "syn", "connect"), default="auto",
                        help="auto (default): SYN when raw sockets are permitted, else connect")
    parser.add_argument("--format", choices=report.FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--output", metavar="FILE", help="write the report here instead of standard output")
    auth = parser.add_argument_group("authenticated checks (not available yet)")
    auth.add_argument("--ssh-user", metavar="USER")
    auth.add_argument("--ssh-key", metavar="FILE")
    auth.add_argument("--ssh-key-passphrase-env", metavar="VAR")
    delegation = auth.add_mutually_exclusive_group()
    delegation.add_argument("--sudo", action="store_true", help="become root with sudo")
    delegation.add_argument("--su", action="store_true", help="become root with su")
    auth.add_argument("--smb-user", metavar="USER")
    auth.add_argument("--smb-domain", metavar="DOMAIN")
    auth.add_argument("--smb-password-env", metavar="VAR")
    auth.add_argument("--check-auth", action="store_true", help="only check that the credentials work")
    vulns = parser.add_argument_group("vulnerabilities (not available yet)")
    vulns.add_argument("--kb", metavar="FILE", help="a local OSV bundle (gzip JSON Lines)")
    vulns.add_argument("--fail-on-severity", type=int, metavar="N", help="exit 3 when a finding has severity N or more")


def validate(args: argparse.Namespace) -> list[str]:
    """Check the options that argparse cannot; returns the options used that are not available yet."""
    if args.rate is not None and args.rate < 1:
        raise UsageError("--rate must be at least 1 probe per second")
    if args.max_parallel_hosts is not None and args.max_parallel_hosts < 1:
        raise UsageError("--max-parallel-hosts must be at least 1")
    if (args.ssh_key or args.ssh_key_passphrase_env or args.sudo or args.su) and not args.ssh_user:
        raise UsageError("--ssh-key, --ssh-key-passphrase-env, --sudo and --su need --ssh-user")
    if args.ssh_key and not Path(args.ssh_key).is_file():
        raise UsageError(f"--ssh-key {args.ssh_key}: no such file")
    if args.ssh_key_passphrase_env and args.ssh_key_passphrase_env not in os.environ:
        raise UsageError(f"--ssh-key-passphrase-env {args.ssh_key_passphrase_env}: the variable is not set")
    if (args.smb_domain or args.smb_password_env) and not args.smb_user:
        raise UsageError("--smb-domain and --smb-password-env need --smb-user")
    if args.smb_user and not args.smb_password_env:
        raise UsageError("--smb-user needs --smb-password-env VAR (passwords never go on the command line)")
    if args.smb_password_env and args.smb_password_env not in os.environ:
        raise UsageError(f"--smb-password-env {args.smb_password_env}: the variable is not set")
    if args.kb and not Path(args.kb).is_file():
        raise UsageError(f"--kb {args.kb}: no such file")
    if args.fail_on_severity is not None and not 1 <= args.fail_on_severity <= 5:
        raise UsageError("--fail-on-severity must be between 1 and 5")
    if args.check_auth and not (args.ssh_user or args.smb_user):
        raise UsageError("--check-auth needs --ssh-user or --smb-user")
    unavailable = [name for name, used in (
        ("--ssh-user", args.ssh_user), ("--smb-user", args.smb_user), ("--kb", args.kb),
        ("--fail-on-severity", args.fail_on_severity is not None), ("--check-auth", args.check_auth),
    ) if used]
    return unavailable


class ProgressBar:
    """A one-line progress bar on a terminal's standard error; silent elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.last = 0.0
        self.shown = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S and done < total:
            return
        self.last = now
        share = done / total if total else 1.0
        filled = int(share * BAR_WIDTH)
        self.stream.write(f"\r{phase:<10} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:6.1%} {done}/{total}  ")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Remove the bar before the report is written."""
        if self.shown:
            self.stream.write("\r" + " " * (BAR_WIDTH + 40) + "\r")
            self.stream.flush()


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Run ``vsa scan`` with parsed arguments; returns the exit status."""
    err = sys.stderr
    try:
        unavailable = validate(args)
        if unavailable:
            raise UsageError(f"{', '.join(unavailable)}: not available yet in this version of vsa scan "
                             "(authenticated checks and vulnerability matching are being wired in)")
        config = load_config(getattr(args, "config", None))
        parallel = args.max_parallel_hosts or config.max_parallel_hosts or DEFAULT_PARALLEL_HOSTS
        options = PortScanOptions(
            tcp_ports=portlists.tcp_ports(args.ports),
            udp_ports=portlists.udp_ports(args.udp_ports),
            host_discovery=not args.no_discovery,
            service_detection=args.service_detection,
            rate_pps=args.rate,
            max_parallel_hosts=parallel,
            engine=args.engine,
        )
    except (UsageError, portlists.PortSpecError, ConfigError) as exc:
        print(f"vsa scan: error: {exc}", file=err)
        return EXIT_USAGE
    bar = ProgressBar(err)
    try:
        run_ = asyncio.run(scan_targets(args.targets, options, exclude=_split(args.exclude),
                                        allow_targets=config.allow_targets, progress=bar))
    except (TargetError, ScanOptionError) as exc:
        bar.clear()
        print(f"vsa scan: error: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        bar.clear()
        print("vsa scan: interrupted", file=err)
        return EXIT_INTERNAL
    except Exception as exc:  # the command's last word on an internal failure, then exit 1
        bar.clear()
        print(f"vsa scan: internal failure: {exc.__class__.__name__}: {exc}", file=err)
        return EXIT_INTERNAL
    bar.clear()
    for note in run_.notes:
        print(f"vsa scan: {note}", file=err)
    text = report.render(run_.results, args.format)
    try:
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except OSError as exc:
        print(f"vsa scan: cannot write the report: {exc}", file=err)
        return EXIT_INTERNAL
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m appliance.scan.command``) until the main cli exists."""
    parser = argparse.ArgumentParser(prog="vsa scan", description="Scan addresses for open ports and services.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
