"""A minimal appliance-side client of the reference platform, for tests and the demo (lab only).

It is not the appliance's protocol client (``appliance/platform/``): it has no
retries, no spool, no validation. It plays an appliance in tests of the
platform, and a second appliance (a competitor for a job, a clone) in tests of
the daemon.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from appliance.lab.platform.ca import generate_client_key_and_csr, write_private
from appliance.lab.platform.secrets import decrypt_auth_record

REQUEST_TIMEOUT_S = 30.0
USER_AGENT = "vsa/0.1.0 (lab client)"


@dataclass
class Reply:
    """One HTTP answer: status, headers, JSON body (or raw bytes)."""

    status: int
    headers: dict[str, str]
    body: Any
    raw: bytes


def register_body(perscode: str, csr_pem: str, instance_id: str, **overrides: Any) -> dict[str, Any]:
    """A complete, valid registration request (PROTOCOL.md's example shape)."""
    body: dict[str, Any] = {
        "perscode": perscode,
        "csr_pem": csr_pem,
        "instance": {
            "instance_id": instance_id, "region": "us-east-1", "account_id": "111122223333",
            "availability_zone": "us-east-1a", "image_id": "ami-0123456789abcdef0",
            "instance_type": "c5.xlarge", "private_ip": "10.0.0.5", "mac": "0e:00:00:00:00:01",
            "vpc_id": "vpc-0abc", "subnet_id": "subnet-0abc",
        },
        "identity_document": json.dumps({"instanceId": instance_id, "region": "us-east-1"}),
        "identity_pkcs7": None,
        "software_version": "0.1.0",
        "capabilities": {"raw_sockets": True, "cpus": 2, "memory_mb": 7900, "arch": "x86_64",
                         "max_parallel_hosts": 16},
    }
    body.update(overrides)
    return body


def poll_body(appliance_id: str | None, instance_id: str, **overrides: Any) -> dict[str, Any]:
    """A complete, valid poll request."""
    body: dict[str, Any] = {
        "appliance_id": appliance_id or "", "instance_id": instance_id, "software_version": "0.1.0",
        "signatures_version": None, "lan_ip": "10.0.0.5", "status": "idle", "running_jobs": [],
        "spool_pending": 0,
    }
    body.update(overrides)
    return body


class LabAppliance:
    """Plays one appliance against a platform URL: its own P-256 key, CSR and certificate."""

    def __init__(self, base_url: str, ca_file: str | os.PathLike[str], instance_id: str,
                 workdir: str | os.PathLike[str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.ca_file = Path(ca_file)
        self.instance_id = instance_id
        self._tmp = tempfile.TemporaryDirectory() if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.key_pem, self.csr_pem = generate_client_key_and_csr()
        self.key_file = self.workdir / f"{instance_id}.key"
        self.cert_file = self.workdir / f"{instance_id}.pem"
        write_private(self.key_file, self.key_pem)
        self.appliance_id: str | None = None
        self.certificate_pem: str | None = None

    def new_key(self) -> None:
        """A fresh key and CSR (what ``vsa reset`` or a 401 leads to)."""
        self.key_pem, self.csr_pem = generate_client_key_and_csr()
        write_private(self.key_file, self.key_pem)

    def ssl_context(self, with_cert: bool = True) -> ssl.SSLContext:
        """Verify the platform against its CA; present the certificate when there is one."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if with_cert and self.certificate_pem is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    async def request(self, method: str, path: str, body: Any = None, *, with_cert: bool = True,
                      raw_body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        """One request; JSON in (unless ``raw_body``), JSON out when the answer is JSON."""
        hdrs = {"User-Agent": USER_AGENT} | (headers or {})
        data: bytes | None = raw_body
        if raw_body is None and body is not None:
            data = json.dumps(body).encode("utf-8")
            hdrs.setdefault("Content-Type", "application/json")
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(ssl=self.ssl_context(with_cert), force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.request(method, self.base_url + path, data=data, headers=hdrs) as resp:
                raw = await resp.read()
                parsed: Any = raw
                if resp.content_type == "application/json" and raw:
                    parsed = json.loads(raw)
                return Reply(resp.status, dict(resp.headers), parsed, raw)

    async def register(self, perscode: str, **overrides: Any) -> Reply:
        """POST /vsa/v1/register; on 201 keeps the certificate and appliance ID."""
        reply = await self.request(
            "POST", "/vsa/v1/register",
            register_body(perscode, self.csr_pem, self.instance_id, **overrides), with_cert=False,
        )
        if reply.status == 201:
            self.appliance_id = reply.body["appliance_id"]
            self.certificate_pem = reply.body["certificate_pem"]
            self.cert_file.write_text(self.certificate_pem or "")
        return reply

    async def poll(self, **overrides: Any) -> Reply:
        """POST /vsa/v1/poll with a complete heartbeat."""
        return await self.request("POST", "/vsa/v1/poll", poll_body(self.appliance_id, self.instance_id, **overrides))

    async def accept(self, job_id: str) -> Reply:
        """POST /vsa/v1/jobs/{job_id}/accept."""
        return await self.request("POST", f"/vsa/v1/jobs/{job_id}/accept", {})

    async def put_host(self, job_id: str, result: dict[str, Any]) -> Reply:
        """PUT /vsa/v1/jobs/{job_id}/hosts/{host_key}."""
        return await self.request("PUT", f"/vsa/v1/jobs/{job_id}/hosts/{result['host_key']}", result)

    async def progress(self, job_id: str, phase: str, total: int, done: int) -> Reply:
        """POST /vsa/v1/jobs/{job_id}/progress."""
        return await self.request("POST", f"/vsa/v1/jobs/{job_id}/progress",
                                  {"phase": phase, "hosts_total": total, "hosts_done": done})

    async def complete(self, job_id: str, host_keys: list[str], status: str = "finished",
                       reason: str | None = None) -> Reply:
        """POST /vsa/v1/jobs/{job_id}/complete."""
        n = len(host_keys)
        return await self.request("POST", f"/vsa/v1/jobs/{job_id}/complete", {
            "status": status, "reason": reason, "message": f"{n} hosts targeted",
            "summary": {"hosts_targeted": n, "hosts_alive": n, "hosts_excluded": 0,
                        "hosts_scanned": n, "findings": 0},
            "host_keys": host_keys,
        })

    def decrypt(self, token: str) -> dict[str, Any]:
        """Decrypt one JWE auth record with this appliance's private key."""
        return decrypt_auth_record(token, self.key_pem)

    def close(self) -> None:
        """Remove the temporary key directory."""
        if self._tmp is not None:
            self._tmp.cleanup()


def host_result(host_key: str, ip: str | None = None, status: str = "scanned") -> dict[str, Any]:
    """A complete, valid HostResult for tests."""
    return {
        "host_key": host_key,
        "target": {"ip": ip or host_key, "hostname": None, "instance_id": None, "region": None,
                   "vpc_id": None, "subnet_id": None, "instance_type": None, "image_id": None,
                   "state": None, "private_dns": None, "public_dns": None, "public_ip": None,
                   "tags": {}},
        "status": status, "reason": None,
        "started_at": "2026-12-04T10:00:00Z", "finished_at": "2026-12-04T10:01:12Z",
        "ports": [{"proto": "tcp", "port": 22, "state": "open", "service": "ssh",
                   "banner": "SSH-2.0-OpenSSH_9.2p1", "product": "OpenSSH", "version": "9.2p1"}],
        "os": None, "auth": [], "packages": None, "findings": [], "instance_metadata": None,
        "errors": [],
    }
