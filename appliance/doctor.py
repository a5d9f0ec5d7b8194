"""``vsa doctor``: the boot connectivity checks, run once, each with a verdict and a fix.

Required (exit 0 only if all pass): IMDS, user-data with a PERSCODE, and the
platform. Reported only: the STS and EC2 endpoints (a scan of plain addresses
needs neither) and the MQTT broker (an accelerator, never a dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from appliance.aws.imds import ImdsClient
from appliance.config import Config, load_config
from appliance.console import mask_perscode, register_secret
from appliance.errors import ConfigError, ImdsError, UserDataError
from appliance.platform.reach import check_platform
from appliance.userdata import UserData, parse_user_data

AWS_CHECK_TIMEOUT_S = 5.0
MQTT_CHECK_TIMEOUT_S = 5.0
DEFAULT_MQTTS_PORT = 8883


@dataclass(frozen=True)
class Check:
    """One check's outcome: passed, failed, or only informative (``ok`` None)."""

    name: str
    required: bool
    ok: bool | None
    verdict: str
    fix: str | None = None

    @property
    def label(self) -> str:
        if self.ok is None:
            return "INFO"
        if self.ok:
            return "OK"
        return "FAIL" if self.required else "WARN"


@dataclass
class _Context:
    config: Config
    user_data_file: Path | None
    imds: ImdsClient | None = None
    user_data: UserData | None = None
    region: str | None = None


async def run_checks(config: Config, *, user_data_file: Path | None = None) -> list[Check]:
    """Run every check in boot order and return their outcomes."""
    ctx = _Context(config=config, user_data_file=user_data_file)
    checks: list[Check] = []
    try:
        if not config.imds_disabled:
            ctx.imds = ImdsClient.from_config(config)
        checks.append(await _check_imds(ctx))
        checks.append(await _check_user_data(ctx))
        checks.append(await _check_platform(ctx))
        checks.extend(await _check_aws(ctx))
        checks.append(await _check_mqtt(ctx))
    finally:
        if ctx.imds is not None:
            await ctx.imds.aclose()
    return checks


async def _check_imds(ctx: _Context) -> Check:
    if ctx.imds is None:
        where = (
            f"user-data comes from {ctx.user_data_file}"
            if ctx.user_data_file
            else "no user-data source"
        )
        return Check(
            "IMDS",
            True,
            ctx.user_data_file is not None,
            f"disabled by configuration (imds.disabled); {where}",
            None if ctx.user_data_file else "pass --user-data FILE, or enable IMDS",
        )
    try:
        version = await ctx.imds.probe()
    except ImdsError as exc:
        return Check(
            "IMDS",
            True,
            False,
            f"not usable at {ctx.imds.endpoint}: {exc}",
            "see the message: it names the instance setting to change",
        )
    try:
        facts = await ctx.imds.instance_facts()
        ctx.region = facts.region
        who = f" (instance {facts.instance_id} in {facts.region})" if facts.instance_id else ""
    except ImdsError:
        who = ""
    word = (
        "IMDSv2"
        if version == "v2"
        else f"IMDSv1 ({ctx.imds.version_reason or 'IMDSv2 unavailable'})"
    )
    return Check("IMDS", True, True, f"{word} at {ctx.imds.endpoint}{who}")


async def _check_user_data(ctx: _Context) -> Check:
    add_fix = "add a line PERSCODE=<your personalization code> to the instance's user-data"
    if ctx.user_data_file is not None:
        try:
            raw: bytes | None = ctx.user_data_file.read_bytes()
        except OSError as exc:
            return Check(
                "user-data",
                True,
                False,
                f"cannot read {ctx.user_data_file}: {exc.strerror}",
                "pass a readable file to --user-data",
            )
        source = str(ctx.user_data_file)
    elif ctx.imds is not None and ctx.imds.version is not None:
        try:
            raw = await ctx.imds.user_data()
        except ImdsError as exc:
            return Check(
                "user-data", True, False, f"cannot be read from IMDS: {exc}", "fix IMDS first"
            )
        source = "IMDS"
    else:
        return Check(
            "user-data",
            True,
            False,
            "no source (IMDS is not usable and no --user-data FILE)",
            "fix IMDS, or pass --user-data FILE",
        )
    if raw is None:
        return Check("user-data", True, False, f"none ({source} has no user-data)", add_fix)
    try:
        ud = parse_user_data(raw)
    except UserDataError as exc:
        return Check(
            "user-data", True, False, f"cannot be used: {exc}", "correct the user-data and reboot"
        )
    ctx.user_data = ud
    register_secret(ud.perscode)
    if ud.proxy is not None:
        register_secret(ud.proxy.password)
    notes = []
    if ud.proxy is not None:
        notes.append(f"proxy {ud.proxy.display()}")
    if ud.unknown_keys:
        notes.append(f"ignored unknown keys: {', '.join(ud.unknown_keys)}")
    extra = f"; {'; '.join(notes)}" if notes else ""
    if ud.perscode is None:
        return Check(
            "user-data", True, False, f"no PERSCODE in the user-data from {source}{extra}", add_fix
        )
    return Check(
        "user-data",
        True,
        True,
        f"PERSCODE found (ending in {mask_perscode(ud.perscode)[-4:]}) from {source}{extra}",
    )


async def _check_platform(ctx: _Context) -> Check:
    url = ctx.config.platform_url
    if url is None:
        return Check(
            "platform",
            True,
            False,
            "no platform URL is configured",
            "set platform.url in /etc/vsa/appliance.toml or VSA_PLATFORM_URL",
        )
    proxy = ctx.user_data.proxy if ctx.user_data else None
    result = await check_platform(url, ca_file=ctx.config.platform_ca_file, proxy=proxy)
    if result.ok:
        return Check("platform", True, True, f"{url} {result.verdict}")
    # The verdict already ends with the remedy, in the console's words.
    return Check("platform", True, False, result.verdict)


async def _check_aws(ctx: _Context) -> list[Check]:
    region = ctx.region
    sts = ctx.config.sts_endpoint or (
        f"https://sts.{region}.amazonaws.com" if region else "https://sts.amazonaws.com"
    )
    ec2 = ctx.config.ec2_endpoint or (f"https://ec2.{region}.amazonaws.com" if region else None)
    checks = [await _endpoint_check("STS", sts)]
    if ec2 is None:
        checks.append(
            Check(
                "EC2", False, None, "region unknown (no IMDS): the EC2 endpoint is chosen per job"
            )
        )
    else:
        checks.append(await _endpoint_check("EC2", ec2))
    return checks


async def _endpoint_check(name: str, url: str) -> Check:
    # AWS traffic never goes through PROXY_URL (PROTOCOL.md, Transport): checked direct.
    ok, why = await _connect(url, default_port=443, timeout_s=AWS_CHECK_TIMEOUT_S)
    if ok:
        return Check(name, False, True, f"{url} reachable (direct, not through PROXY_URL)")
    return Check(
        name,
        False,
        False,
        f"{url} not reachable: {why}",
        "needed only for EC2 targets: allow HTTPS to it from the appliance's subnet "
        "(VPC endpoint or NAT), or let the platform send an EC2 API proxy",
    )


async def _check_mqtt(ctx: _Context) -> Check:
    url = ctx.config.mqtt_url
    if url is None:
        return Check(
            "MQTT",
            False,
            None,
            "no broker configured (optional: the platform is polled over HTTPS)",
        )
    ok, why = await _connect(url, default_port=DEFAULT_MQTTS_PORT, timeout_s=MQTT_CHECK_TIMEOUT_S)
    if ok:
        return Check("MQTT", False, True, f"{url} reachable")
    return Check(
        "MQTT",
        False,
        False,
        f"{url} not reachable: {why}",
        "optional: the appliance works by polling; allow the broker's port to use wake-ups",
    )


async def _connect(url: str, *, default_port: int, timeout_s: float) -> tuple[bool, str]:
    """TCP connect, plus a TLS handshake for https/mqtts URLs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme in ("https", "mqtts")
    port = parts.port or (default_port if secure else 80 if parts.scheme == "http" else 1883)
    context = ssl.create_default_context() if secure else None
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if secure else None
            ),
            timeout_s,
        )
    except TimeoutError:
        return False, f"no answer within {timeout_s:g} s"
    except ssl.SSLError as exc:
        return False, f"TLS failed ({exc.reason or exc})"
    except OSError as exc:
        return False, exc.strerror or str(exc)
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass  # the check already succeeded; a messy close does not change it
    return True, "ok"


def render(checks: list[Check], stream: TextIO) -> None:
    """Print one line per check, with its fix indented below when it has one."""
    width = max(len(c.name) for c in checks)
    for check in checks:
        stream.write(f"{check.name:<{width}}  {check.label:<4}  {check.verdict}\n")
        if check.fix and check.ok is False:
            stream.write(f"{'':<{width}}        fix: {check.fix}\n")
    stream.flush()


def exit_status(checks: list[Check]) -> int:
    """0 only if every required check passed."""
    return 0 if all(c.ok for c in checks if c.required) else 1


def main(args: argparse.Namespace) -> int:
    """``vsa doctor [--config FILE] [--user-data FILE]``."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"configuration: {exc}", file=sys.stderr)
        return 1
    user_data_file = Path(args.user_data) if getattr(args, "user_data", None) else None
    checks = asyncio.run(run_checks(config, user_data_file=user_data_file))
    render(checks, sys.stdout)
    return exit_status(checks)
