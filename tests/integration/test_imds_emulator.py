"""The lab IMDS emulator behaves as AWS's IMDS does (raw HTTP, no appliance client)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from conftest import require_tool

from appliance.lab.imds import EmulatorConfig, ImdsEmulator

TOKEN_PATH = "/latest/api/token"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
TIMEOUT = aiohttp.ClientTimeout(total=5)


def sync_request(
    url: str, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One blocking request (http.client never consults proxy variables)."""
    parts = urlsplit(url)
    connection = HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def sync_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A blocking GET."""
    return sync_request(url, "GET", path, headers)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(trust_env=False, timeout=TIMEOUT) as session:
        yield session


async def put_token(
    http: aiohttp.ClientSession, url: str, ttl: str = "21600", **headers: str
) -> tuple[int, str]:
    async with http.put(url + TOKEN_PATH, headers={TTL: ttl, **headers}) as r:
        return r.status, await r.text()


async def get(
    http: aiohttp.ClientSession, url: str, path: str, token: str | None = None
) -> tuple[int, bytes]:
    headers = {TOKEN: token} if token is not None else {}
    async with http.get(url + path, headers=headers) as r:
        return r.status, await r.read()


async def test_token_ttl_validation_and_methods(http: aiohttp.ClientSession) -> None:
    emulator = ImdsEmulator(EmulatorConfig(mode="v2-required"))
    async with emulator.serve() as url:
        for bad in ("0", "21601", "abc", "-5", ""):
            assert (await put_token(http, url, bad))[0] == 400, bad
        async with http.put(url + TOKEN_PATH) as r:  # no TTL header at all
            assert r.status == 400
        for good in ("1", "21600"):
            async with http.put(url + TOKEN_PATH, headers={TTL: good}) as r:
                assert r.status == 200 and r.headers[TTL] == good
                assert len(await r.text()) >= 40
        async with http.get(url + TOKEN_PATH) as r:
            assert r.status == 405
        # Something that looks proxied never gets a token.
        assert (await put_token(http, url, **{"X-Forwarded-For": "10.0.0.9"}))[0] == 403
        assert emulator.requests[-1].forwarded_for


async def test_tokens_required_optional_invalid_expired(http: aiohttp.ClientSession) -> None:
    emulator = ImdsEmulator(EmulatorConfig(mode="v2-required"))
    async with emulator.serve() as url:
        status, token = await put_token(http, url, "5")
        assert status == 200
        assert (await get(http, url, "/latest/meta-data/instance-id"))[0] == 401  # none
        assert (await get(http, url, "/latest/meta-data/instance-id", "forged"))[0] == 401
        assert await get(http, url, "/latest/meta-data/instance-id", token) == (
            200,
            b"i-0abc1234def567890",
        )
        emulator.advance_clock(5)  # exactly at expiry
        assert (await get(http, url, "/latest/meta-data/instance-id", token))[0] == 401
        emulator.mode = "v2-optional"
        assert (await get(http, url, "/latest/meta-data/instance-id"))[0] == 200  # v1 allowed
        assert (await get(http, url, "/latest/meta-data/instance-id", "forged"))[0] == 401
        assert [r.token for r in emulator.requests[-2:]] == ["none", "invalid"]


@pytest.mark.parametrize("status", [404, 405])
async def test_v1_only(http: aiohttp.ClientSession, status: int) -> None:
    emulator = ImdsEmulator(EmulatorConfig(mode="v1-only", v1_only_status=status))
    async with emulator.serve() as url:
        assert (await put_token(http, url))[0] == status
        assert (await get(http, url, "/latest/meta-data/ami-id"))[0] == 200
        assert (await get(http, url, "/latest/meta-data/ami-id", "anything"))[0] == 200


async def test_disabled_is_403_everywhere(http: aiohttp.ClientSession) -> None:
    emulator = ImdsEmulator(EmulatorConfig(mode="disabled"))
    async with emulator.serve() as url:
        assert (await put_token(http, url))[0] == 403
        for path in ("/", "/latest/meta-data/", "/latest/user-data", TOKEN_PATH):
            assert (await get(http, url, path))[0] == 403


async def test_hop_limit_put_is_never_answered(http: aiohttp.ClientSession) -> None:
    emulator = ImdsEmulator(EmulatorConfig(mode="hop-limit"))
    async with emulator.serve() as url:
        with pytest.raises(asyncio.TimeoutError):
            async with http.put(
                url + TOKEN_PATH, headers={TTL: "21600"}, timeout=aiohttp.ClientTimeout(total=0.3)
            ):
                pass
        assert (await get(http, url, "/latest/meta-data/instance-id"))[0] == 401
    assert emulator.requests[0].status == 0  # logged as never answered


async def test_listings_user_data_and_documents(http: aiohttp.ClientSession) -> None:
    emulator = ImdsEmulator(EmulatorConfig(mode="v2-optional"))
    async with emulator.serve() as url:
        status, body = await get(http, url, "/latest/")
        assert (status, body) == (200, b"dynamic/\nmeta-data/")  # no user-data listed
        assert (await get(http, url, "/latest/user-data"))[0] == 404
        emulator.user_data = b"\x1f\x8b raw"
        assert await get(http, url, "/latest/user-data") == (200, b"\x1f\x8b raw")

        _, meta = await get(http, url, "/latest/meta-data/")
        entries = meta.decode().split("\n")
        assert {
            "ami-id",
            "instance-id",
            "local-ipv4",
            "mac",
            "placement/",
            "network/",
            "iam/",
        } <= set(entries)
        assert not meta.endswith(b"\n")
        _, macs = await get(http, url, "/latest/meta-data/network/interfaces/macs/")
        assert macs == b"0e:49:61:0f:c3:11/"
        mac_path = "/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/"
        assert await get(http, url, mac_path + "vpc-id") == (200, b"vpc-0a1b2c3d4e5f60718")
        assert await get(http, url, mac_path + "subnet-id") == (200, b"subnet-0f1e2d3c4b5a69788")
        assert await get(http, url, "/latest/meta-data/placement/availability-zone") == (
            200,
            b"us-east-1a",
        )
        assert (await get(http, url, "/latest/meta-data/public-ipv4"))[0] == 404  # optional, absent

        _, document = await get(http, url, "/latest/dynamic/instance-identity/document")
        text = document.decode()
        assert text.startswith('{\n  "accountId" : "111122223333",\n')  # AWS's own layout
        parsed = json.loads(text)
        assert parsed["privateIp"] == "10.0.0.5" and parsed["kernelId"] is None

        _, info = await get(http, url, "/latest/meta-data/iam/info")
        assert json.loads(info)["Code"] == "Success"
        _, role = await get(http, url, "/latest/meta-data/iam/security-credentials/")
        _, creds = await get(
            http, url, "/latest/meta-data/iam/security-credentials/" + role.decode()
        )
        assert set(json.loads(creds)) == {
            "Code",
            "LastUpdated",
            "Type",
            "AccessKeyId",
            "SecretAccessKey",
            "Token",
            "Expiration",
        }


async def test_injected_failures(http: aiohttp.ClientSession) -> None:
    emulator = ImdsEmulator()
    async with emulator.serve() as url:
        emulator.fail_next(2, status=503, retry_after="7")
        async with http.get(url + "/latest/meta-data/ami-id") as r:
            assert r.status == 503 and r.headers["Retry-After"] == "7"
        assert (await get(http, url, "/latest/meta-data/ami-id"))[0] == 503
        assert (await get(http, url, "/latest/meta-data/ami-id"))[0] == 200


def test_pkcs7_verifies_against_the_document(tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    emulator = ImdsEmulator()
    with emulator.serve_in_thread() as url:
        document = sync_get(url, "/latest/dynamic/instance-identity/document")[1]
        pkcs7 = sync_get(url, "/latest/dynamic/instance-identity/pkcs7")[1]
    assert all(len(line) <= 64 for line in pkcs7.split(b"\n"))
    (tmp_path / "document").write_bytes(document)
    armoured = b"-----BEGIN PKCS7-----\n" + pkcs7 + b"\n-----END PKCS7-----\n"
    (tmp_path / "pkcs7").write_bytes(armoured)
    (tmp_path / "cert").write_text(emulator.signing_cert_pem)
    # AWS documentation's verification command, "Verify the instance identity document".
    command = [openssl, "smime", "-verify", "-in", "pkcs7", "-inform", "PEM"]
    command += ["-content", "document", "-certfile", "cert", "-noverify"]
    verify = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=30)
    assert verify.returncode == 0, verify.stderr
    (tmp_path / "document").write_bytes(document.replace(b"111122223333", b"999999999999"))
    tampered = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=30)
    assert tampered.returncode != 0


def test_command_line(tmp_path: Path) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_bytes(b"PERSCODE=abcdefgh12\n")
    command = [sys.executable, "-m", "appliance.lab.imds", "--host", "127.0.0.1", "--port", "0"]
    command += ["--mode", "v2-required", "--user-data-file", str(user_data)]
    command += ["--instance-id", "i-0cli"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        status, token = sync_request(url, "PUT", TOKEN_PATH, {TTL: "21600"})
        assert status == 200
        headers = {TOKEN: token.decode()}
        assert sync_get(url, "/latest/user-data", headers) == (200, b"PERSCODE=abcdefgh12\n")
        assert sync_get(url, "/latest/meta-data/instance-id", headers) == (200, b"i-0cli")
        assert sync_get(url, "/latest/meta-data/instance-id")[0] == 401
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
