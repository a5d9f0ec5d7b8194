"""A real moto server process on 127.0.0.1, and helpers to seed it with EC2 instances.

moto (LAB-NOTES.md, moto with aioboto3) answers STS and EC2 like AWS does,
for every region at once, on one port: the region comes from the request's
signature. Tests and benches start one with :class:`MotoServer`, reset it
between cases and seed it through boto3 (synchronous: seeding is set-up, not
the code under test).

Traps handled here: a duplicate or out-of-subnet private address and an
exhausted subnet answer with an HTML 500 that botocore would retry, so the
seeding client never retries (``max_attempts: 1``) and the helpers hand out
addresses themselves.

Lab code: never imported by the daemon.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 5.0
# moto accepts any key; these are obviously fake and never real credentials.
LAB_ACCESS_KEY_ID = "AKIALABLABLABLAB0000"
LAB_SECRET_ACCESS_KEY = "lab-secret-not-a-real-key-000000000000000"
LAB_ACCOUNT_ID = "123456789012"  # moto's default account
# run_instances accepts at most this many instances per call in moto's default quota handling.
MAX_BATCH = 1000


class MotoLabError(RuntimeError):
    """The moto server could not be started or seeded."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def moto_server_path() -> str:
    """The moto_server executable beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:
        raise MotoLabError("moto_server is not installed (pip install 'moto[server]')")
    return found


@dataclass
class MotoServer:
    """One moto_server process on 127.0.0.1 with a port of its own.

    Use as a context manager; :meth:`stop` terminates only this process.
    """

    port: int = 0
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """The server's base URL, usable as both the STS and the EC2 endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        """Start the process and wait until it answers (about 0.6 s)."""
        if self.port == 0:
            self.port = free_port()
        log: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ)
        # The server must never reach out through a proxy inherited from the caller.
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(name, None)
        self._proc = subprocess.Popen(
            [moto_server_path(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=log,
            env=env,
        )
        if log is not subprocess.DEVNULL:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MotoLabError(f"moto_server exited with status {self._proc.returncode}")
            try:
                self._post("/moto-api/reset")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise MotoLabError(f"moto_server did not answer on {self.url} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Terminate the process (kill it if it does not stop in time) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def reset(self) -> None:
        """Forget every resource (``POST /moto-api/reset``)."""
        self._post("/moto-api/reset")

    def _post(self, path: str) -> None:
        request = urllib.request.Request(self.url + path, data=b"", method="POST")
        # An empty ProxyHandler: lab calls to 127.0.0.1 never follow HTTP(S)_PROXY.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
            response.read()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ec2(self, region: str) -> Any:
        """A synchronous boto3 EC2 client for seeding, never retrying, never proxied."""
        return boto3.client(
            "ec2",
            region_name=region,
            endpoint_url=self.url,
            aws_access_key_id=LAB_ACCESS_KEY_ID,
            aws_secret_access_key=LAB_SECRET_ACCESS_KEY,
            config=BotoConfig(retries={"mode": "standard", "total_max_attempts": 1}, proxies={}),
        )


@dataclass
class LabSubnet:
    """A subnet created in moto, handing out its addresses in order."""

    region: str
    vpc_id: str
    subnet_id: str
    cidr: ipaddress.IPv4Network
    _next: Iterator[ipaddress.IPv4Address] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # AWS reserves the first four addresses and the last one of every subnet.
        hosts = list(self.cidr.hosts())[3:-1]
        self._next = iter(hosts)

    def next_ip(self) -> str:
        """The next unused address of the subnet."""
        try:
            return str(next(self._next))
        except StopIteration:
            raise MotoLabError(f"subnet {self.cidr} is exhausted") from None


class Ec2Seeder:
    """Creates VPCs, subnets and instances in a moto server for tests and benches."""

    def __init__(self, server: MotoServer) -> None:
        self._server = server
        self._clients: dict[str, Any] = {}

    def client(self, region: str) -> Any:
        """The (cached) seeding client of a region."""
        if region not in self._clients:
            self._clients[region] = self._server.ec2(region)
        return self._clients[region]

    def vpc(self, region: str, cidr: str) -> str:
        """Create a VPC and return its ID."""
        return str(self.client(region).create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"])

    def subnet(
        self, region: str, vpc_id: str, cidr: str, *, public: bool = False
    ) -> LabSubnet:
        """Create a subnet; ``public`` maps a public IP on launch, as a public subnet does."""
        ec2 = self.client(region)
        subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr)["Subnet"]["SubnetId"]
        if public:
            ec2.modify_subnet_attribute(SubnetId=subnet_id, MapPublicIpOnLaunch={"Value": True})
        return LabSubnet(region, vpc_id, subnet_id, ipaddress.ip_network(cidr))  # type: ignore[arg-type]

    def launch(
        self,
        subnet: LabSubnet,
        *,
        instance_type: str = "t3.large",
        tags: Mapping[str, str] | None = None,
        private_ip: str | None = None,
        count: int = 1,
        image_id: str = "ami-12c6146b",
    ) -> list[str]:
        """Launch ``count`` instances in ONE call (one reservation) and return their IDs.

        With ``count`` 1 the address is ``private_ip`` or the subnet's next one;
        a batch takes consecutive addresses from the subnet.
        """
        ec2 = self.client(subnet.region)
        kwargs: dict[str, Any] = {
            "ImageId": image_id,
            "InstanceType": instance_type,
            "MinCount": count,
            "MaxCount": count,
            "SubnetId": subnet.subnet_id,
        }
        if count == 1:
            kwargs["PrivateIpAddress"] = private_ip or subnet.next_ip()
        else:
            # moto assigns batch addresses itself; keep our counter ahead of them.
            for _ in range(count):
                subnet.next_ip()
        if tags:
            kwargs["TagSpecifications"] = [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ]
        reservation = ec2.run_instances(**kwargs)
        return [i["InstanceId"] for i in reservation["Instances"]]

    def launch_many(self, subnet: LabSubnet, total: int, **kwargs: Any) -> list[str]:
        """Launch ``total`` instances in batches of at most :data:`MAX_BATCH`."""
        ids: list[str] = []
        while len(ids) < total:
            ids += self.launch(subnet, count=min(MAX_BATCH, total - len(ids)), **kwargs)
        return ids

    def terminate(self, region: str, instance_ids: Sequence[str]) -> None:
        """Terminate instances (moto moves them through shutting-down to terminated)."""
        self.client(region).terminate_instances(InstanceIds=list(instance_ids))
