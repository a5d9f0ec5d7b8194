"""``vsa scan``: a one-off scan from the command line, without any platform (RUNTIME.md).

The main ``vsa`` command line calls :func:`add_arguments` on its ``scan``
subparser and :func:`run` with the parsed arguments. The scan is the job
engine's pipeline: scope, discovery, ports, services, then the authenticated
checks and knowledge-base matching of :mod:`appliance.scan.hostchecks` on
every scanned host, with the records the options describe (they apply to
every target).

Exit status: 0 when the scan ran (whatever it found), 3 when
``--fail-on-severity N`` is met (the report is written first, and standard
error names each host and advisory), 2 for bad arguments (a bad ``--kb`` file
included), 1 for an internal failure. ``--check-auth`` scans nothing but the
credentials: for each host and record it prints whether connect, authenticate,
root and the collectors work and exactly why not; a host passes when one of
its records passes every step; exit 0 when every targeted host passed, 1
otherwise (a host that is down or out of scope has not passed).

Secrets (SSH key passphrase, SSH password, sudo or root password, SMB
password) come only from environment variables named on the command line,
never from the command line itself; they are registered with the console's
scrubber and every line written (report, messages) goes through it. Host-key
pins live under ``state.dir`` (``--config``, ``VSA_STATE_DIR``), as for the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from appliance.authrecords import AuthRecord, AuthRecordError, parse_auth_record
from appliance.config import load_config
from appliance.console import redact, register_secret
from appliance.errors import ConfigError, VsaError
from appliance.kb.errors import KbError
from appliance.kb.gate import check_threshold, severity_gate_for_results
from appliance.kb.match import KnowledgeBase
from appliance.results import HostResult
from appliance.scan import hostchecks, portlists, report
from appliance.scan.portscan import PortScanOptions, PortScanRun, ScanOptionError, scan_targets
from appliance.scan.smb import SMB_PORT
from appliance.scan.ssh import PreflightReport, cli_unix_record
from appliance.scan.synscan import DEFAULT_RATE_PPS
from appliance.scan.targets import TargetError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CHECK_FAILED = 1  # --check-auth: some host did not pass
EXIT_USAGE = 2
EXIT_GATE = 3
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
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument("--config", metavar="FILE",
                            help="configuration file (state.dir for host-key pins, scan.allow_targets)")
    auth = parser.add_argument_group(
        "authenticated checks", "secrets are read from the environment variables named here, "
        "never from the command line")
    auth.add_argument("--ssh-user", metavar="USER", help="log in over SSH as USER")
    auth.add_argument("--ssh-key", action="append", default=[], metavar="FILE",
                      help="private key (OpenSSH or PEM; FILE-cert.pub beside it is its certificate); repeatable")
    auth.add_argument("--ssh-key-passphrase-env", metavar="VAR", help="the key's passphrase is in $VAR")
    auth.add_argument("--ssh-password-env", metavar="VAR", help="log in with the password in $VAR")
    auth.add_argument("--ssh-port", type=int, default=22, metavar="PORT", help="SSH port (default 22)")
    delegation = auth.add_mutually_exclusive_group()
    delegation.add_argument("--sudo", action="store_true", help="become root with sudo")
    delegation.add_argument("--su", action="store_true", help="become root with su (needs --sudo-password-env)")
    auth.add_argument("--sudo-password-env", metavar="VAR",
                      help="the password sudo asks for (--sudo), or root's password (--su), is in $VAR")
    auth.add_argument("--smb-user", metavar="USER", help="log in over SMB (NTLMv2) as USER")
    auth.add_argument("--smb-domain", metavar="DOMAIN", help="the account's domain (default: a local account)")
    auth.add_argument("--smb-password-env", metavar="VAR", help="the SMB password is in $VAR")
    auth.add_argument("--check-auth", action="store_true",
                      help="only check, per host, that the credentials work and say why not (exit 0: all pass, 1: not)")
    vulns = parser.add_argument_group("vulnerabilities")
    vulns.add_argument("--kb", metavar="FILE", help="a local OSV bundle (gzip JSON Lines) to match packages against")
    vulns.add_argument("--fail-on-severity", type=int, metavar="N",
                       help="exit 3 when a finding has severity N (1-5) or more; needs --kb")


def _env(option: str, var: str | None) -> str | None:
    """The secret in environment variable ``var`` (registered with the scrubber at once)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if value is None:
        raise UsageError(f"{option} {var}: the variable is not set")
    if not value:
        raise UsageError(f"{option} {var}: the variable is empty")
    register_secret(value)
    return value


def validate(args: argparse.Namespace) -> None:
    """Check the options that argparse cannot; raises :class:`UsageError` with words."""
    if args.rate is not None and args.rate < 1:
        raise UsageError("--rate must be at least 1 probe per second")
    if args.max_parallel_hosts is not None and args.max_parallel_hosts < 1:
        raise UsageError("--max-parallel-hosts must be at least 1")
    ssh_only = (args.ssh_key or args.ssh_key_passphrase_env or args.ssh_password_env or args.sudo
                or args.su or args.sudo_password_env)
    if ssh_only and not args.ssh_user:
        raise UsageError("--ssh-key, --ssh-key-passphrase-env, --ssh-password-env, --sudo, --su and "
                         "--sudo-password-env need --ssh-user")
    if args.ssh_user and not (args.ssh_key or args.ssh_password_env):
        raise UsageError("--ssh-user needs --ssh-key FILE or --ssh-password-env VAR "
                         "(passwords never go on the command line)")
    if not 1 <= args.ssh_port <= 65535:
        raise UsageError("--ssh-port must be a port number from 1 to 65535")
    for key in args.ssh_key:
        if not Path(key).is_file():
            raise UsageError(f"--ssh-key {key}: no such file")
    if args.ssh_key_passphrase_env and not args.ssh_key:
        raise UsageError("--ssh-key-passphrase-env needs --ssh-key")
    if args.su and not args.sudo_password_env:
        raise UsageError("--su needs --sudo-password-env VAR holding root's password")
    if args.sudo_password_env and not (args.sudo or args.su):
        raise UsageError("--sudo-password-env needs --sudo or --su")
    if (args.smb_domain or args.smb_password_env) and not args.smb_user:
        raise UsageError("--smb-domain and --smb-password-env need --smb-user")
    if args.smb_user and not args.smb_password_env:
        raise UsageError("--smb-user needs --smb-password-env VAR (passwords never go on the command line)")
    if args.kb and not Path(args.kb).is_file():
        raise UsageError(f"--kb {args.kb}: no such file")
    if args.fail_on_severity is not None:
        try:
            check_threshold(args.fail_on_severity)
        except KbError:
            raise UsageError("--fail-on-severity must be between 1 and 5 (5 the most severe)") from None
        if not args.kb:
            # Without a knowledge base no package is judged: a pipeline gate would pass blind.
            raise UsageError("--fail-on-severity needs --kb FILE: without a knowledge base no "
                             "package finding can exist and the gate would pass blind")
    if args.check_auth and not (args.ssh_user or args.smb_user):
        raise UsageError("--check-auth needs --ssh-user or --smb-user")


def records_from(args: argparse.Namespace) -> list[AuthRecord]:
    """The authentication records the options describe (applying to every target)."""
    records: list[AuthRecord] = []
    if args.ssh_user:
        delegation = "sudo" if args.sudo else "su" if args.su else "none"
        try:
            records.append(cli_unix_record(
                username=args.ssh_user, key_paths=tuple(args.ssh_key),
                key_passphrase=_env("--ssh-key-passphrase-env", args.ssh_key_passphrase_env),
                password=_env("--ssh-password-env", args.ssh_password_env),
                delegation=delegation,
                delegation_password=_env("--sudo-password-env", args.sudo_password_env),
                port=args.ssh_port))
        except OSError as exc:
            raise UsageError(f"--ssh-key: cannot read {exc.filename}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError("--ssh-key: the file is not a text private key") from None
        except AuthRecordError as exc:
            raise UsageError(f"SSH options: {exc}") from None
    if args.smb_user:
        password = _env("--smb-password-env", args.smb_password_env)
        try:
            records.append(parse_auth_record({
                "type": "windows", "id": "cli-windows", "title": "command line",
                "username": args.smb_user, "domain": args.smb_domain, "password": password,
                "nt_hash": None, "protocols": ["ntlmv2"], "targets": ["0.0.0.0/0", "::/0"]}))
        except AuthRecordError as exc:
            raise UsageError(f"SMB options: {exc}") from None
    return records


def check_state_dir(state_dir: Path) -> None:
    """SSH host keys are pinned under ``state.dir``: it must be usable before any login."""
    hint = "set state.dir with --config FILE or VSA_STATE_DIR"
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"state.dir {state_dir} cannot be created ({exc.strerror}): SSH host keys "
                         f"could not be pinned; {hint}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise UsageError(f"state.dir {state_dir} is not writable: SSH host keys could not be pinned; {hint}")


def load_kb(path: str | None) -> KnowledgeBase | None:
    """The knowledge base of ``--kb``, or a :class:`UsageError` saying why it cannot be used."""
    if path is None:
        return None
    try:
        kb = KnowledgeBase.load(Path(path))
    except KbError as exc:
        raise UsageError(f"--kb {path}: not a usable OSV bundle: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--kb {path}: cannot read it: {exc.strerror}") from None
    if kb.stats.records == 0:
        raise UsageError(f"--kb {path}: the bundle holds no OSV record; nothing to match against")
    return kb


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
        validate(args)
        records = records_from(args)
        kb = load_kb(args.kb)
        config = load_config(getattr(args, "config", None))
        if any(r.type == "unix" for r in records):
            check_state_dir(config.state_dir)
        parallel = args.max_parallel_hosts or config.max_parallel_hosts or DEFAULT_PARALLEL_HOSTS
        tcp_ports = portlists.tcp_ports(args.ports)
        if args.check_auth:
            # Only the ports the records use: discovery and scope as for a scan, then the preflight.
            tcp_ports = tuple(sorted({r.port for r in records if r.type == "unix"}
                                     | ({SMB_PORT} if any(r.type == "windows" for r in records) else set())))
        options = PortScanOptions(
            tcp_ports=tcp_ports,
            udp_ports=() if args.check_auth else portlists.udp_ports(args.udp_ports),
            host_discovery=not args.no_discovery,
            service_detection="none" if args.check_auth else args.service_detection,
            rate_pps=args.rate,
            max_parallel_hosts=parallel,
            engine=args.engine,
        )
    except (UsageError, portlists.PortSpecError, ConfigError) as exc:
        _say(err, f"error: {exc}")
        return EXIT_USAGE
    bar = ProgressBar(err)
    try:
        outcome = asyncio.run(_scan(args, options, records, kb, config.state_dir,
                                    config.allow_targets, bar))
    except (TargetError, ScanOptionError) as exc:
        bar.clear()
        _say(err, f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        bar.clear()
        _say(err, "interrupted")
        return EXIT_INTERNAL
    except Exception as exc:  # the command's last word on an internal failure, then exit 1
        bar.clear()
        _say(err, f"internal failure: {exc.__class__.__name__}: {exc}")
        return EXIT_INTERNAL
    bar.clear()
    run_, preflight = outcome
    for note in run_.notes:
        _say(err, note)
    if args.check_auth:
        lines, passed = preflight_text(run_.results, preflight)
        code = EXIT_OK if passed else EXIT_CHECK_FAILED
        return code if _write(args.output, "\n".join(lines) + "\n", err) else EXIT_INTERNAL
    if not _write(args.output, report.render(run_.results, args.format), err):
        return EXIT_INTERNAL
    if args.fail_on_severity is None:
        return EXIT_OK
    for line in blind_spots(run_.results, records):
        _say(err, f"warning: {line}")
    verdict = severity_gate_for_results(run_.results, args.fail_on_severity)
    for line in verdict.message.splitlines():
        _say(err, line)
    return EXIT_GATE if verdict.exit_code == EXIT_GATE else EXIT_OK


def _say(stream: TextIO, text: str) -> None:
    stream.write(redact(f"vsa scan: {text}") + "\n")
    stream.flush()


def _write(output: str | None, text: str, err: TextIO) -> bool:
    text = redact(text)  # the last guard: no secret reaches a report
    try:
        if output:
            Path(output).write_text(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    except OSError as exc:
        _say(err, f"cannot write the report: {exc}")
        return False
    return True


async def _scan(args: argparse.Namespace, options: PortScanOptions, records: list[AuthRecord],
                kb: KnowledgeBase | None, state_dir: Path, allow_targets: Sequence[Any],
                bar: ProgressBar) -> tuple[PortScanRun, dict[str, list[PreflightReport]]]:
    """The port scan, then (with records or a knowledge base) the checks of every scanned host."""
    run_ = await scan_targets(args.targets, options, exclude=_split(args.exclude),
                              allow_targets=allow_targets, progress=bar)
    preflight: dict[str, list[PreflightReport]] = {}
    scanned = [r for r in run_.results if r.status == "scanned"]
    if not scanned or not (records or kb):
        return run_, preflight
    ctx = hostchecks.make_check_context(
        state_dir, kb=kb, max_parallel_hosts=options.max_parallel_hosts,
        no_kb_note="packages not matched against vulnerabilities: no --kb given")
    limit = asyncio.Semaphore(options.max_parallel_hosts)
    done = 0
    phase = "check-auth" if args.check_auth else "checks"

    async def one(result: HostResult) -> None:
        nonlocal done
        async with limit:
            if args.check_auth:
                preflight[result.host_key] = await hostchecks.preflight_host(result, records, ctx)
            else:
                await hostchecks.run_host_checks(result, records, ctx, job_type="vm_scan",
                                                 authentication=True, is_ec2=False,
                                                 scanned_tcp_ports=set(options.tcp_ports))
                result.finished_at = _now()
        done += 1
        bar(phase, done, len(scanned))

    try:
        await asyncio.gather(*(one(r) for r in scanned))
    finally:
        ctx.close()
    return run_, preflight


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def preflight_text(results: Sequence[HostResult],
                   reports: dict[str, list[PreflightReport]]) -> tuple[list[str], bool]:
    """The ``--check-auth`` lines for every target, and whether every target passed.

    A host passes when one of the records applying to it passes every step (the
    options' records apply to every target, so a mixed list of Linux and Windows
    hosts can be checked at once); the lines show every record's steps.
    """
    lines: list[str] = []
    good = 0
    for result in results:
        if result.status != "scanned":
            why = f"{result.status} ({result.reason})" if result.reason else result.status
            if result.status == "down":
                why += ": no answer to discovery (try --no-discovery)"
            lines.append(f"{result.host_key}: {why}; not checked")
            continue
        host_reports = reports.get(result.host_key, [])
        for rep in host_reports:
            lines.extend(rep.lines())
        if any(rep.ok for rep in host_reports):
            good += 1
        else:
            lines.append(f"{result.host_key}: no record passed every step")
    total = len(results)
    lines.append(f"{good} of {total} host{'s' if total != 1 else ''} passed the authentication checks")
    return lines, good == total


def blind_spots(results: Sequence[HostResult], records: Sequence[AuthRecord]) -> list[str]:
    """Scanned hosts whose packages the gate could not judge (no unix login worked), in words.

    A host where a windows record logged in is a Windows host: not listed.
    """
    if not any(r.type == "unix" for r in records):
        return []
    lines = []
    for result in results:
        if result.status != "scanned" or result.packages is not None:
            continue
        if any(a.type == "windows" and a.status == "success" for a in result.auth):
            continue
        tried = [a for a in result.auth if a.type == "unix" and a.record_id is not None]
        why = "; ".join(f"{a.status}: {a.message}" for a in tried) or "no unix login"
        lines.append(f"{result.host_key}: no packages collected ({why}); "
                     "the gate could not judge its packages")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m appliance.scan.command``) until the main cli exists."""
    parser = argparse.ArgumentParser(prog="vsa scan", description="Scan addresses for open ports and services.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
