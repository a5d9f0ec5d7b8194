"""The platform's MQTT side against a real Mosquitto: TLS with certificates from the platform's CA.

An appliance (its registered client certificate) subscribes to its wake topic;
the platform publishes a wake-up with its own client certificate.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from conftest import require_tool

from appliance.lab.mosquitto import BrokerTls, MosquittoBroker
from appliance.lab.platform import LabPlatformError, Platform, PlatformServer
from appliance.lab.platform.client import LabAppliance
from appliance.lab.platform.mqtt import broker_files


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform.init(tmp_path / "platform")
    yield p
    p.close()


@pytest.fixture
def broker(platform: Platform, tmp_path: Path) -> Iterator[int]:
    require_tool("mosquitto")
    files = broker_files(platform, tmp_path / "broker", ["127.0.0.1"])
    tls = BrokerTls(files.ca_file, files.cert_file, files.key_file)
    with MosquittoBroker(tmp_path / "broker", tls=tls) as mosquitto:
        platform.set_mqtt(mosquitto.url)
        yield mosquitto.port


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
