"""The platform's MQTT side against a real Mosquitto: TLS with certificates from the platform's CA.

An appliance (its registered client certificate) subscribes to its wake topic;
the platform publishes a wake-up with its own client certificate.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from conftest import require_tool

from appliance.lab.platform import LabPlatformError, Platform, PlatformServer
from appliance.lab.platform.client import LabAppliance
from appliance.lab.platform.mqtt import broker_files

BROKER_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform.init(tmp_path / "platform")
    yield p
    p.close()


@pytest.fixture
def broker(platform: Platform, tmp_path: Path) -> Iterator[int]:
    mosquitto = require_tool("mosquitto")
    files = broker_files(platform, tmp_path / "broker", ["127.0.0.1"])
    port = _free_port()
    conf = tmp_path / "broker" / "mosquitto.conf"
    conf.write_text(
        "user root\n"  # LAB-NOTES: mosquitto reads the key after dropping privileges
        f"listener {port} 127.0.0.1\n"
        f"cafile {files.ca_file}\ncertfile {files.cert_file}\nkeyfile {files.key_file}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        "persistence false\n"
    )
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.05)
        platform.set_mqtt(f"mqtts://127.0.0.1:{port}")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def test_wake_reaches_the_appliance_over_mutual_tls(platform: Platform, broker: int) -> None:
    async with PlatformServer(platform) as server:
        a = LabAppliance(server.url, platform.ca_file, "i-0123456789abcdef0")
        reply = await a.register(platform.create_perscode())
        mqtt = reply.body["mqtt"]
        assert mqtt["url"] == f"mqtts://127.0.0.1:{broker}"
        async with aiomqtt.Client("127.0.0.1", broker, tls_context=a.ssl_context(), identifier=a.appliance_id,
                                  timeout=10) as client:
            await client.subscribe(mqtt["wake_topic"], qos=1)
            await asyncio.to_thread(platform.wake, a.appliance_id)
            async with asyncio.timeout(10):
                message = await anext(aiter(client.messages))
        assert str(message.topic) == mqtt["wake_topic"] and message.qos == 1
        assert json.loads(message.payload)["reason"] == "wake"


async def test_broker_refuses_a_client_without_certificate(platform: Platform, broker: int) -> None:
    ctx = ssl.create_default_context(cafile=str(platform.ca_file))
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with aiomqtt.Client("127.0.0.1", broker, tls_context=ctx, timeout=3):
            pass


def test_wake_without_a_broker_says_so(platform: Platform) -> None:
    with pytest.raises(LabPlatformError, match="no MQTT broker"):
        platform.wake("vsa-000000")
