"""``python -m appliance.lab.platform``: the reference platform's admin command line.

Every command works on one data directory (``--data-dir``, or
``VSA_LAB_PLATFORM_DIR``); a running server sees what the commands change at
its next request, because both share the directory's SQLite file. Output is
JSON where it is data, so that scripts can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from appliance.lab.platform.admin import Platform
from appliance.lab.platform.ca import DEFAULT_SERVER_NAMES
from appliance.lab.platform.errors import LabPlatformError

DATA_DIR_ENV = "VSA_LAB_PLATFORM_DIR"
DEFAULT_PORT = 8443


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m appliance.lab.platform",
                                description="The VSA reference platform (lab only).")
    p.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV),
                   help=f"the platform's data directory (default ${DATA_DIR_ENV})")
    # --data-dir is accepted before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    s = sub.add_parser("init", help="create the CA, server certificate, keys and database")
    s.add_argument("--server-name", action="append", dest="server_names",
                   help="a host name or IP for the server certificate (repeat; default: "
                        + ", ".join(DEFAULT_SERVER_NAMES) + ")")
    s.add_argument("--poll-interval", type=int, help="poll interval announced to appliances, s")
    s.add_argument("--mqtt-url", help="MQTT broker URL sent at registration")
    s.add_argument("--force", action="store_true", help="recreate everything (a new CA)")

    s = sub.add_parser("serve", help="run the HTTPS server until SIGTERM/SIGINT")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    s.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    s.add_argument("--poll-interval", type=int, help="poll interval announced to appliances, s")
    s.add_argument("--mqtt-url", help="MQTT broker URL sent at registration ('' for none)")

    s = sub.add_parser("create-perscode", help="create a personalization code and print it")
    s.add_argument("--code", help="the code (default: 14 random digits)")
    s.add_argument("--label")
    s = sub.add_parser("revoke-perscode", help="revoke a personalization code")
    s.add_argument("code")
    sub.add_parser("list-perscodes", help="list codes (last 4 characters only)")
    sub.add_parser("list-appliances", help="list appliances with their last heartbeat")
    s = sub.add_parser("forget-appliance", help="forget an appliance (its next request gets 401)")
    s.add_argument("appliance_id")
    s = sub.add_parser("set-poll-interval", help="the poll interval announced, s")
    s.add_argument("seconds", type=int)
    s.add_argument("--appliance", help="only for this appliance")
    s = sub.add_parser("set-ec2-api-proxy", help="the ec2_api_proxy of poll responses")
    s.add_argument("url", nargs="?", help="omit to remove the proxy")
    s.add_argument("--username")
    s.add_argument("--password-env", help="read the password from this environment variable")

    s = sub.add_parser("submit-job", help="queue a job; prints its ID")
    s.add_argument("--file", type=Path, help="a JSON JobSpec (auth_records as plaintext objects)")
    s.add_argument("--job-id")
    s.add_argument("--title")
    s.add_argument("--type", choices=["vm_scan", "discovery"])
    s.add_argument("--ips", help="comma-separated addresses, CIDRs, ranges")
    s.add_argument("--hostnames", help="comma-separated host names")
    s.add_argument("--exclude", help="comma-separated addresses, CIDRs, ranges")
    s.add_argument("--tcp-ports")
    s.add_argument("--udp-ports")
    s.add_argument("--no-discovery", action="store_true")
    s.add_argument("--auth-file", type=Path, action="append",
                   help="a JSON auth record (object) or a list of them, in clear (repeat)")
    s.add_argument("--appliance", action="append", help="offer only to this appliance (repeat)")
    s.add_argument("--no-validate", action="store_true", help="queue the spec as it is")
    s.add_argument("--wake", action="store_true", help="then wake the target appliances over MQTT")
    s = sub.add_parser("wake", help="publish a wake-up on an appliance's MQTT wake topic")
    s.add_argument("appliance_id")
    s = sub.add_parser("cancel-job", help="cancel a job")
    s.add_argument("job_id")
    sub.add_parser("list-jobs", help="list jobs")
    s = sub.add_parser("results", help="print a job's host results and completion as JSON")
    s.add_argument("job_id")

    sub.add_parser("keygen", help="create the bundle-signing key if needed; print its public key")
    s = sub.add_parser("publish-signatures", help="publish a signed OSV bundle")
    s.add_argument("file", type=Path, help="OSV records: .jsonl, .json array, or a .gz bundle")
    s.add_argument("--version")
    s.add_argument("--corrupt", choices=["signature", "sha256", "bytes"],
                   help="lab: publish a bundle that must fail the appliance's checks")
    s.add_argument("--url", help="lab: offer this URL instead of the platform's own path")

    s = sub.add_parser("fault", help="inject a fault into the running server (lab only)")
    fsub = s.add_subparsers(dest="fault", required=True)
    for name, helptext in (("fail", "answer an error status (503 with Retry-After by default)"),
                           ("drop", "close connections without an answer"),
                           ("delay", "hold requests before handling them")):
        f = fsub.add_parser(name, help=helptext)
        f.add_argument("--count", type=int, help="the next N matching requests")
        f.add_argument("--for", dest="duration_s", type=float, help="for T seconds")
        f.add_argument("--path-re", help="only requests whose path matches this regex")
        f.add_argument("--method")
        if name == "fail":
            f.add_argument("--status", type=int, default=503)
            f.add_argument("--retry-after", type=int, default=5, help="Retry-After, s (-1: none)")
        if name == "delay":
            f.add_argument("--seconds", type=float, required=True)
    f = fsub.add_parser("lose-hosts", help="forget host results at the next completion (409 missing_hosts)")
    f.add_argument("--job-id")
    f.add_argument("--count", type=int, default=1, help="how many host results to forget")
    f.add_argument("--times", type=int, default=1, help="at how many completions")
    fsub.add_parser("clear", help="remove every fault")
    fsub.add_parser("list", help="list active faults")

    s = sub.add_parser("requests", help="print the request log as JSON")
    s.add_argument("--path")
    s.add_argument("--path-re")
    s.add_argument("--method")
    s.add_argument("--status", type=int)
    s.add_argument("--appliance")
    s.add_argument("--count", action="store_true", help="print only how many")
    return p


def _job_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(args.file.read_text()) if args.file else {}
    targets = spec.setdefault("targets", {})
    options = spec.setdefault("options", {})
    if args.job_id:
        spec["job_id"] = args.job_id
    if args.title:
        spec["title"] = args.title
    if args.type:
        spec["type"] = args.type
    if args.ips:
        targets["ips"] = [x.strip() for x in args.ips.split(",") if x.strip()]
    if args.hostnames:
        targets["hostnames"] = [x.strip() for x in args.hostnames.split(",") if x.strip()]
    if args.exclude:
        spec["exclude"] = [x.strip() for x in args.exclude.split(",") if x.strip()]
    if args.tcp_ports:
        options["tcp_ports"] = args.tcp_ports
    if args.udp_ports:
        options["udp_ports"] = args.udp_ports
    if args.no_discovery:
        options["host_discovery"] = "none"
    for path in args.auth_file or []:
        loaded = json.loads(path.read_text())
        spec.setdefault("auth_records", []).extend(loaded if isinstance(loaded, list) else [loaded])
    return spec


def run(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    if not args.data_dir:
        print(f"error: give --data-dir or set {DATA_DIR_ENV}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except LabPlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "init":
        platform = Platform.init(args.data_dir, server_names=args.server_names or DEFAULT_SERVER_NAMES,
                                 poll_interval_s=args.poll_interval, mqtt_url=args.mqtt_url,
                                 force=args.force)
        _print({"data_dir": str(platform.data_dir), "ca_file": str(platform.ca_file),
                "server_names": platform.server_names(),
                "signatures_public_key": platform.signing_public_key()})
        return 0
    with Platform(args.data_dir) as platform:
        if cmd == "serve":
            from appliance.lab.platform.server import serve_forever

            if args.poll_interval is not None:
                platform.set_poll_interval(args.poll_interval)
            if args.mqtt_url is not None:
                platform.set_mqtt(args.mqtt_url or None)
            asyncio.run(serve_forever(platform, host=args.host, port=args.port, port_file=args.port_file))
        elif cmd == "create-perscode":
            print(platform.create_perscode(args.code, args.label))
        elif cmd == "revoke-perscode":
            platform.revoke_perscode(args.code)
        elif cmd == "list-perscodes":
            _print(platform.list_perscodes())
        elif cmd == "list-appliances":
            _print(platform.list_appliances())
        elif cmd == "forget-appliance":
            platform.forget_appliance(args.appliance_id)
        elif cmd == "set-poll-interval":
            platform.set_poll_interval(args.seconds, args.appliance)
        elif cmd == "set-ec2-api-proxy":
            password = os.environ.get(args.password_env) if args.password_env else None
            platform.set_ec2_api_proxy(args.url, args.username, password)
        elif cmd == "submit-job":
            job_id = platform.submit_job(_job_spec(args), appliances=args.appliance,
                                         validate=not args.no_validate)
            print(job_id)
            if args.wake:
                targets = args.appliance or [a["appliance_id"] for a in platform.list_appliances()
                                             if not a["forgotten"]]
                for appliance_id in targets:
                    platform.wake(appliance_id)
        elif cmd == "wake":
            platform.wake(args.appliance_id)
        elif cmd == "cancel-job":
            platform.cancel_job(args.job_id)
        elif cmd == "list-jobs":
            _print(platform.list_jobs())
        elif cmd == "results":
            _print(platform.results(args.job_id))
        elif cmd == "keygen":
            print(platform.keygen())
        elif cmd == "publish-signatures":
            _print(platform.publish_signatures(args.file, version=args.version,
                                              corrupt=args.corrupt, url=args.url))
        elif cmd == "fault":
            _fault(platform, args)
        elif cmd == "requests":
            rows = platform.requests(path=args.path, path_re=args.path_re, method=args.method,
                                     status=args.status, appliance_id=args.appliance)
            if args.count:
                print(len(rows))
            else:
                _print(rows)
    return 0


def _fault(platform: Platform, args: argparse.Namespace) -> None:
    kind = args.fault
    if kind == "clear":
        platform.clear_faults()
    elif kind == "list":
        _print(platform.list_faults())
    elif kind == "lose-hosts":
        print(platform.lose_hosts(args.job_id, args.count, args.times))
    else:
        where = {"count": args.count, "duration_s": args.duration_s, "path_re": args.path_re,
                 "method": args.method}
        if kind == "fail":
            retry = None if args.retry_after < 0 else args.retry_after
            print(platform.fail_next(status=args.status, retry_after_s=retry, **where))
        elif kind == "drop":
            print(platform.drop_next(**where))
        else:
            print(platform.delay_next(args.seconds, **where))


if __name__ == "__main__":
    sys.exit(run())
