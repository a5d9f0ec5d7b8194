"""The ``vsa`` command: run | status | doctor | scan | reset (RUNTIME.md, Commands).

Each subcommand lives in the module that owns its concern; this file only
parses arguments and dispatches, importing the subcommand's module lazily so
that ``vsa status`` does not pay for the scanner's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from appliance import __version__

# subcommand -> (module, function taking the parsed arguments and returning an exit status)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("appliance.daemon", "main"),
    "status": ("appliance.status", "main"),
    "doctor": ("appliance.doctor", "main"),
    "scan": ("appliance.scan.command", "run"),
    "reset": ("appliance.state.identity", "reset_main"),
    "hostkeys": ("appliance.state.hostkeys", "main"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="vsa", description="The virtual scanner appliance.")
    parser.add_argument("--version", action="version", version=f"vsa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, user_data: bool = False) -> None:
        p.add_argument(
            "--config",
            metavar="FILE",
            help="configuration file (default /etc/vsa/appliance.toml or $VSA_CONFIG)",
        )
        if user_data:
            p.add_argument(
                "--user-data", metavar="FILE", help="read user-data from FILE instead of IMDS"
            )

    run = sub.add_parser("run", help="the daemon, in the foreground")
    common(run, user_data=True)

    status = sub.add_parser("status", help="registration, polls, jobs, spool, signatures")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    doctor = sub.add_parser("doctor", help="run the boot connectivity checks once")
    common(doctor, user_data=True)

    scan = sub.add_parser("scan", help="a one-off scan without any platform")
    _add_scan_arguments(scan)

    reset = sub.add_parser(
        "reset", help="wipe the identity so the instance can be personalized afresh"
    )
    common(reset)
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    hostkeys = sub.add_parser("hostkeys", help="list or forget pinned SSH host keys")
    common(hostkeys)
    hostkeys.add_argument("action", choices=["list", "forget"])
    hostkeys.add_argument(
        "host_key", nargs="?", help="the host (instance ID or IP) whose pin to forget"
    )
    return parser


def _add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        module = importlib.import_module("appliance.scan.command")
    except ModuleNotFoundError as exc:
        if exc.name != "appliance.scan.command":
            raise
        parser.add_argument("targets", nargs="*")
        return
    module.add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vsa`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    module_name, function = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"vsa {args.command}: not available in this build yet", file=sys.stderr)
        return 1
    return int(getattr(module, function)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
