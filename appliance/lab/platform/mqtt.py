"""The platform's side of MQTT (lab only): certificates for a lab broker, and wake-ups.

PROTOCOL.md, MQTT: an appliance subscribes to ``vsa/<id>/wake`` (QoS 1) over
TLS with its client certificate, so the broker trusts the platform's CA. The
platform publishes a wake-up there (for example after queueing a job) with a
client certificate of its own from the same CA.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiomqtt

from appliance.lab.platform.ca import write_private
from appliance.lab.platform.errors import LabPlatformError
from appliance.lab.platform.store import now_rfc3339

if TYPE_CHECKING:
    from appliance.lab.platform.admin import Platform

MQTTS_DEFAULT_PORT = 8883
MQTT_DEFAULT_PORT = 1883
WAKE_TIMEOUT_S = 10.0
PLATFORM_MQTT_CN = "vsa-lab-platform"


@dataclass(frozen=True)
class BrokerFiles:
    """What a lab broker's TLS listener needs: the CA that signs appliances, its own cert and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def broker_files(platform: Platform, directory: Path, server_names: list[str]) -> BrokerFiles:
    """Issue a broker server certificate under the platform's CA into ``directory``.

    With Mosquitto: ``cafile`` = ``ca_file``, ``certfile``/``keyfile`` as given,
    ``require_certificate true`` (LAB-NOTES: Mosquitto reads the key after
    dropping privileges; run it with ``user root`` in a lab config or chown the key).
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = platform.ca.issue_keypair("vsa-lab-broker", server_names=server_names)
    files = BrokerFiles(platform.ca_file, directory / "broker.pem", directory / "broker.key")
    files.cert_file.write_text(cert_pem)
    write_private(files.key_file, key_pem)
    return files


def _platform_client_files(platform: Platform) -> tuple[Path, Path]:
    cert_file = platform.data_dir / "mqtt-client.pem"
    key_file = platform.data_dir / "mqtt-client.key"
    if not (cert_file.exists() and key_file.exists()):
        cert_pem, key_pem = platform.ca.issue_keypair(PLATFORM_MQTT_CN, client=True)
        write_private(key_file, key_pem)
        cert_file.write_text(cert_pem)
    return cert_file, key_file


async def wake_async(platform: Platform, appliance_id: str, *, timeout_s: float = WAKE_TIMEOUT_S) -> None:
    """Publish a wake-up (QoS 1) on the appliance's wake topic; raise when no broker is configured."""
    settings = platform.mqtt_for(appliance_id)
    if settings is None:
        raise LabPlatformError("no MQTT broker is configured (serve --mqtt-url, or Platform.set_mqtt)")
    url = urlsplit(settings["url"])
    if url.scheme not in ("mqtts", "mqtt") or not url.hostname:
        raise LabPlatformError(f"the MQTT URL must be mqtts://host[:port] or mqtt://host[:port], not {settings['url']}")
    tls: ssl.SSLContext | None = None
    if url.scheme == "mqtts":
        tls = ssl.create_default_context(cafile=str(platform.ca_file))
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        cert_file, key_file = _platform_client_files(platform)
        tls.load_cert_chain(str(cert_file), str(key_file))
    port = url.port or (MQTTS_DEFAULT_PORT if tls else MQTT_DEFAULT_PORT)
    payload = json.dumps({"reason": "wake", "at": now_rfc3339()})
    async with asyncio.timeout(timeout_s):
        async with aiomqtt.Client(url.hostname, port, tls_context=tls, identifier=f"{PLATFORM_MQTT_CN}-{appliance_id}",
                                  timeout=timeout_s) as client:
            await client.publish(settings["wake_topic"], payload, qos=1)


def wake(platform: Platform, appliance_id: str, *, timeout_s: float = WAKE_TIMEOUT_S) -> None:
    """:func:`wake_async` from synchronous code (its own thread and loop, so it works inside a running loop)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(wake_async(platform, appliance_id, timeout_s=timeout_s))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name="vsa-lab-wake")
    thread.start()
    thread.join(timeout_s + 1)
    if failure:
        if isinstance(failure[0], LabPlatformError):
            raise failure[0]
        raise LabPlatformError(f"could not publish the wake-up: {failure[0]}") from failure[0]
