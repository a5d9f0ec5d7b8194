"""A faithful EC2 instance metadata service (IMDS) emulator for the lab and tests.

Lab code: never imported by the daemon. No usable emulator exists on PyPI
(LAB-NOTES.md, IMDS), so this one reproduces the behaviour the client depends on:

- modes ``v2-optional``, ``v2-required``, ``v1-only`` (token PUT answered 404
  or 405), ``hop-limit`` (token PUT never answered, tokenless GETs 401, as when
  tokens are required and the PUT response dies one hop short),
  ``hop-limit-optional`` (the same PUT, but v1 GETs work) and ``disabled``
  (403 everywhere);
- token TTL validated (1..21600, else 400), tokens expire (on a clock tests can
  move), ``GET`` on the token path 405, ``PUT`` with ``X-Forwarded-For`` 403,
  invalid or expired token 401, no token where tokens are required 401;
- meta-data, user-data (raw bytes; 404 when none), directory listings
  (newline-separated, ``/`` on subdirectories), the identity document as AWS
  formats it and its PKCS7 signature, and ``iam/security-credentials/<role>``
  in the form botocore reads, so that botocore takes credentials from it when
  ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` points here;
- a request log and injectable 5xx answers (with ``Retry-After``) for tests.

Run it in-process with :meth:`ImdsEmulator.serve` (async) or
:meth:`ImdsEmulator.serve_in_thread` (for blocking clients such as botocore),
or from the shell: ``python -m appliance.lab.imds --port 8080 --mode v2-required``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, get_args

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

Mode = Literal[
    "v2-optional", "v2-required", "v1-only", "hop-limit", "hop-limit-optional", "disabled"
]
MODES: tuple[str, ...] = get_args(Mode)

TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MIN_TOKEN_TTL_S = 1
MAX_TOKEN_TTL_S = 21600
CREDENTIALS_LIFETIME_S = 6 * 3600
# How long a stop waits for in-flight handlers (the hop-limit PUT is released at once).
SHUTDOWN_TIMEOUT_S = 1.0
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class NetworkInterface:
    """One elastic network interface as meta-data describes it."""

    mac: str = "0e:49:61:0f:c3:11"
    local_ipv4s: tuple[str, ...] = ("10.0.0.5",)
    vpc_id: str = "vpc-0a1b2c3d4e5f60718"
    subnet_id: str = "subnet-0f1e2d3c4b5a69788"
    device_number: int = 0
    security_group_ids: tuple[str, ...] = ("sg-0123456789abcdef0",)


@dataclass(frozen=True)
class RoleCredentials:
    """The instance profile's role and the temporary credentials IMDS hands out for it."""

    role_name: str = "vsa-appliance"
    access_key_id: str = "ASIAEMULATORKEY00001"
    secret_access_key: str = "emulatorSecretAccessKey0000000000000000000"
    token: str = "IQoJb3JpZ2luX2VjEMULATOR-SESSION-TOKEN"
    instance_profile_id: str = "AIPAEMULATOR00000001"


@dataclass(frozen=True)
class InstanceProfile:
    """The instance the emulator pretends to be."""

    instance_id: str = "i-0abc1234def567890"
    account_id: str = "111122223333"
    region: str = "us-east-1"
    availability_zone: str = "us-east-1a"
    image_id: str = "ami-0123456789abcdef0"
    instance_type: str = "c5.xlarge"
    architecture: str = "x86_64"
    interfaces: tuple[NetworkInterface, ...] = (NetworkInterface(),)
    public_ipv4: str | None = None
    security_groups: tuple[str, ...] = ("vsa-appliance",)
    hostname: str = "ip-10-0-0-5.ec2.internal"
    role: RoleCredentials | None = field(default_factory=RoleCredentials)
    pending_time: str = "2026-12-04T21:00:00Z"

    @property
    def private_ip(self) -> str:
        """The primary private address (first address of the first interface)."""
        return self.interfaces[0].local_ipv4s[0]

    @property
    def mac(self) -> str:
        """The primary interface's MAC."""
        return self.interfaces[0].mac


@dataclass(frozen=True)
class EmulatorConfig:
    """How the emulator behaves; the runtime knobs (mode, clock, failures) are on the emulator."""

    mode: Mode = "v2-optional"
    # v1-only: what the token PUT is answered (404 or 405; both exist in the wild).
    v1_only_status: int = 404
    profile: InstanceProfile = field(default_factory=InstanceProfile)
    user_data: bytes | None = None
    # Tokens live at most this long whatever the client asks (a test makes them short).
    max_token_ttl_s: int | None = None
    pkcs7: bool = True
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"unknown IMDS emulator mode {self.mode!r} (one of {', '.join(MODES)})"
            )
        if self.v1_only_status not in (404, 405):
            raise ValueError("v1_only_status must be 404 or 405")


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator saw and how it answered."""

    method: str
    path: str
    token: Literal["none", "valid", "invalid"]
    status: int
    forwarded_for: bool = False


Tree = dict[str, "Tree | bytes"]


class ImdsEmulator:
    """The emulated IMDS: an aiohttp application plus the state tests inspect and steer."""

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        """An emulator for ``config`` (defaults: v2-optional, no user-data, a role)."""
        self.config = config or EmulatorConfig()
        self.mode: Mode = self.config.mode
        self.user_data: bytes | None = self.config.user_data
        self.profile: InstanceProfile = self.config.profile
        self.requests: list[RequestRecord] = []
        self.tokens_issued: list[str] = []
        self._tokens: dict[str, float] = {}
        self._clock_offset_s = 0.0
        self._fail_remaining = 0
        self._fail_status = 503
        self._fail_retry_after: str | None = None
        self._closing = asyncio.Event()
        self._pkcs7_cache: tuple[str, str] | None = None  # (document, signature)
        self._signer_cache: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    # --- steering and inspection for tests ---

    def now(self) -> float:
        """The emulator's clock (the configured clock plus :meth:`advance_clock`)."""
        return self.config.clock() + self._clock_offset_s

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock only (the client's does not move): tokens expire early."""
        self._clock_offset_s += seconds

    def expire_tokens(self) -> None:
        """Forget every token issued so far (their next use is answered 401)."""
        self._tokens.clear()

    def fail_next(self, count: int, *, status: int = 503, retry_after: str | None = "1") -> None:
        """Answer the next ``count`` requests with ``status`` (and ``Retry-After`` if given)."""
        self._fail_remaining = count
        self._fail_status = status
        self._fail_retry_after = retry_after

    def count(
        self, method: str | None = None, path: str | None = None, status: int | None = None
    ) -> int:
        """How many logged requests match every given criterion."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and (path is None or r.path == path)
            and (status is None or r.status == status)
        )

    @property
    def signing_cert_pem(self) -> str:
        """The PEM certificate that verifies the PKCS7 signature (AWS publishes one per region)."""
        return self._pkcs7_material()[1]

    # --- serving ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port); returns the base URL."""
        self._closing = asyncio.Event()
        # handler_cancellation: a client that gives up on the hop-limit PUT ends its handler.
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            access_log=None,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0]
        bound_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{bound_host}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        """Stop listening; a PUT held open by the hop-limit mode is released."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Run in this event loop for the duration of the block, yielding the base URL."""
        url = await self.start(host, port)
        try:
            yield url
        finally:
            await self.stop()

    @contextmanager
    def serve_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Run in a thread of its own (for blocking clients such as botocore), yielding the base URL."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="imds-emulator", daemon=True)
        thread.start()
        try:
            url = asyncio.run_coroutine_threadsafe(self.start(host, port), loop).result(timeout=10)
            yield url
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    # --- the service ---

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token_state: Literal["none", "valid", "invalid"] = "none"
        presented = request.headers.get(TOKEN_HEADER)
        if presented is not None:
            token_state = "valid" if self._token_valid(presented) else "invalid"
        forwarded = "X-Forwarded-For" in request.headers
        try:
            response = await self._answer(request, presented, token_state)
        except asyncio.CancelledError:
            # The client gave up (the hop-limit PUT): logged as never answered, status 0.
            self.requests.append(
                RequestRecord(request.method, request.path, token_state, 0, forwarded)
            )
            raise
        self.requests.append(
            RequestRecord(request.method, request.path, token_state, response.status, forwarded)
        )
        return response

    async def _answer(
        self, request: web.Request, presented: str | None, token_state: str
    ) -> web.StreamResponse:
        if self.mode == "disabled":
            return _text(403, "Forbidden")
        if self._fail_remaining > 0:
            self._fail_remaining -= 1
            headers = {"Retry-After": self._fail_retry_after} if self._fail_retry_after else {}
            return _text(self._fail_status, "Service Unavailable", headers)
        if request.path == TOKEN_PATH:
            if request.method != "PUT":
                return _text(405, "Method Not Allowed", {"Allow": "PUT"})
            return await self._put_token(request)
        if request.method not in ("GET", "HEAD"):
            return _text(405, "Method Not Allowed", {"Allow": "GET, HEAD"})
        if self.mode != "v1-only":
            if presented is not None and token_state != "valid":
                return _text(401, "Unauthorized")
            if presented is None and self.mode in ("v2-required", "hop-limit"):
                return _text(401, "Unauthorized")
        return self._content(request.path)

    async def _put_token(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "v1-only":
            status = self.config.v1_only_status
            return _text(status, "Not Found" if status == 404 else "Method Not Allowed")
        # IMDS refuses tokens to anything that looks proxied (AWS, "IMDSv2").
        if "X-Forwarded-For" in request.headers:
            return _text(403, "Forbidden")
        raw_ttl = request.headers.get(TOKEN_TTL_HEADER, "")
        if not raw_ttl.strip().isdigit() or not MIN_TOKEN_TTL_S <= int(raw_ttl) <= MAX_TOKEN_TTL_S:
            return _text(400, "Bad Request")
        if self.mode in ("hop-limit", "hop-limit-optional"):
            # The answer dies one hop short: from the client's side it never comes.
            await self._closing.wait()
            return _text(503, "Service Unavailable")
        ttl_s = int(raw_ttl)
        if self.config.max_token_ttl_s is not None:
            ttl_s = min(ttl_s, self.config.max_token_ttl_s)
        token = base64.urlsafe_b64encode(secrets.token_bytes(42)).decode("ascii")
        self._tokens[token] = self.now() + ttl_s
        self.tokens_issued.append(token)
        return _text(200, token, {TOKEN_TTL_HEADER: str(ttl_s)})

    def _token_valid(self, token: str) -> bool:
        expires = self._tokens.get(token)
        return expires is not None and self.now() < expires

    def _content(self, path: str) -> web.StreamResponse:
        if path in ("", "/"):
            return _text(200, "latest")
        parts = [p for p in path.split("/") if p]
        if parts[0] != "latest":
            return _text(404, "Not Found")
        node: Tree | bytes = self._tree()
        for part in parts[1:]:
            if not isinstance(node, dict) or part not in node:
                return _text(404, "Not Found")
            node = node[part]
        if isinstance(node, dict):
            listing = "\n".join(
                name + ("/" if isinstance(child, dict) else "") for name, child in node.items()
            )
            return _text(200, listing)
        content_type = "application/octet-stream" if parts[1:] == ["user-data"] else "text/plain"
        return web.Response(status=200, body=node, content_type=content_type)

    def _tree(self) -> Tree:
        """Everything under /latest/, built from the profile as it is now."""
        p = self.profile
        macs: Tree = {}
        for nic in p.interfaces:
            macs[nic.mac] = {
                "device-number": str(nic.device_number).encode(),
                "local-ipv4s": "\n".join(nic.local_ipv4s).encode(),
                "mac": nic.mac.encode(),
                "security-group-ids": "\n".join(nic.security_group_ids).encode(),
                "subnet-id": nic.subnet_id.encode(),
                "vpc-id": nic.vpc_id.encode(),
            }
            if nic is p.interfaces[0] and p.public_ipv4:
                macs[nic.mac]["public-ipv4s"] = p.public_ipv4.encode()  # type: ignore[index]
        meta: Tree = {
            "ami-id": p.image_id.encode(),
            "hostname": p.hostname.encode(),
            "instance-id": p.instance_id.encode(),
            "instance-type": p.instance_type.encode(),
            "local-hostname": p.hostname.encode(),
            "local-ipv4": p.private_ip.encode(),
            "mac": p.mac.encode(),
            "network": {"interfaces": {"macs": macs}},
            "placement": {
                "availability-zone": p.availability_zone.encode(),
                "region": p.region.encode(),
            },
            "security-groups": "\n".join(p.security_groups).encode(),
        }
        if p.public_ipv4:
            meta["public-ipv4"] = p.public_ipv4.encode()
        if p.role is not None:
            meta["iam"] = {
                "info": self._iam_info(p.role).encode(),
                "security-credentials": {p.role.role_name: self._credentials(p.role).encode()},
            }
        identity: Tree = {"document": self._identity_document().encode()}
        if self.config.pkcs7:
            identity["pkcs7"] = self._pkcs7_material()[0].encode()
        tree: Tree = {
            "dynamic": {"instance-identity": identity},
            "meta-data": dict(sorted(meta.items())),
        }
        if self.user_data is not None:
            tree["user-data"] = self.user_data
        return tree

    def _identity_document(self) -> str:
        """The document with AWS's key order and its ``" : "`` separators."""
        p = self.profile
        document = {
            "accountId": p.account_id,
            "architecture": p.architecture,
            "availabilityZone": p.availability_zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": p.image_id,
            "instanceId": p.instance_id,
            "instanceType": p.instance_type,
            "kernelId": None,
            "pendingTime": p.pending_time,
            "privateIp": p.private_ip,
            "ramdiskId": None,
            "region": p.region,
            "version": "2017-09-30",
        }
        return json.dumps(document, indent=2, separators=(",", " : "))

    def _pkcs7_material(self) -> tuple[str, str]:
        """A detached PKCS7 signature of the document (base64, 64-column, no PEM armour) and its cert."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.serialization import pkcs7

        document = self._identity_document()
        key, cert = self._signer()
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        if self._pkcs7_cache is not None and self._pkcs7_cache[0] == document:
            return self._pkcs7_cache[1], cert_pem
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(document.encode())
            .add_signer(cert, key, hashes.SHA256())
            .sign(
                serialization.Encoding.DER,
                [
                    pkcs7.PKCS7Options.DetachedSignature,
                    pkcs7.PKCS7Options.NoCerts,
                    # sign the bytes as served, not a CRLF-canonicalised copy
                    pkcs7.PKCS7Options.Binary,
                ],
            )
        )
        text = base64.b64encode(der).decode("ascii")
        signature = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
        self._pkcs7_cache = (document, signature)
        return signature, cert_pem

    def _signer(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The emulator's throw-away signing key and self-signed certificate (made once)."""
        if self._signer_cache is None:
            from cryptography.hazmat.primitives import hashes
            from cryptography.x509.oid import NameOID

            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, "IMDS emulator identity signer")]
            )
            now = datetime.now(UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=3650))
                .sign(key, hashes.SHA256())
            )
            self._signer_cache = (key, cert)
        return self._signer_cache

    def _iam_info(self, role: RoleCredentials) -> str:
        p = self.profile
        info = {
            "Code": "Success",
            "LastUpdated": datetime.now(UTC).strftime(_TIME_FORMAT),
            "InstanceProfileArn": f"arn:aws:iam::{p.account_id}:instance-profile/{role.role_name}",
            "InstanceProfileId": role.instance_profile_id,
        }
        return json.dumps(info, indent=2, separators=(",", " : "))

    def _credentials(self, role: RoleCredentials) -> str:
        """Temporary credentials in the form botocore's InstanceMetadataFetcher reads."""
        now = datetime.now(UTC)
        credentials = {
            "Code": "Success",
            "LastUpdated": now.strftime(_TIME_FORMAT),
            "Type": "AWS-HMAC",
            "AccessKeyId": role.access_key_id,
            "SecretAccessKey": role.secret_access_key,
            "Token": role.token,
            "Expiration": (now + timedelta(seconds=CREDENTIALS_LIFETIME_S)).strftime(_TIME_FORMAT),
        }
        return json.dumps(credentials, indent=2, separators=(",", " : "))


def _text(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain", headers=headers)


# --- command line ---


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.lab.imds",
        description="Run the lab's IMDS emulator in the foreground.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="port (0 picks a free one; default 8080)"
    )
    parser.add_argument("--mode", choices=MODES, default="v2-optional")
    parser.add_argument(
        "--v1-status",
        type=int,
        choices=(404, 405),
        default=404,
        help="v1-only: the answer to the token PUT",
    )
    parser.add_argument("--user-data-file", type=Path, help="serve this file's bytes as user-data")
    parser.add_argument("--max-token-ttl", type=int, help="tokens live at most this many seconds")
    parser.add_argument("--instance-id", default=InstanceProfile.instance_id)
    parser.add_argument("--account-id", default=InstanceProfile.account_id)
    parser.add_argument("--region", default=InstanceProfile.region)
    parser.add_argument("--availability-zone")
    parser.add_argument("--private-ip", default=NetworkInterface.local_ipv4s[0])
    parser.add_argument("--public-ip")
    parser.add_argument("--role-name", default=RoleCredentials.role_name)
    parser.add_argument("--no-role", action="store_true", help="no IAM role (iam/ answers 404)")
    parser.add_argument("--access-key-id", default=RoleCredentials.access_key_id)
    parser.add_argument("--secret-access-key", default=RoleCredentials.secret_access_key)
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The emulator configuration the command line describes."""
    role = None
    if not args.no_role:
        role = RoleCredentials(
            role_name=args.role_name,
            access_key_id=args.access_key_id,
            secret_access_key=args.secret_access_key,
        )
    profile = InstanceProfile(
        instance_id=args.instance_id,
        account_id=args.account_id,
        region=args.region,
        availability_zone=args.availability_zone or f"{args.region}a",
        interfaces=(NetworkInterface(local_ipv4s=(args.private_ip,)),),
        public_ipv4=args.public_ip,
        hostname=f"ip-{args.private_ip.replace('.', '-')}.ec2.internal",
        role=role,
    )
    user_data = args.user_data_file.read_bytes() if args.user_data_file else None
    return EmulatorConfig(
        mode=args.mode,
        v1_only_status=args.v1_status,
        profile=profile,
        user_data=user_data,
        max_token_ttl_s=args.max_token_ttl,
    )


async def _serve_forever(emulator: ImdsEmulator, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with emulator.serve(host, port) as url:
        print(f"imds emulator listening on {url} (mode {emulator.mode})", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m appliance.lab.imds``."""
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except OSError as exc:
        print(f"imds emulator: cannot read user-data: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve_forever(ImdsEmulator(config), args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
