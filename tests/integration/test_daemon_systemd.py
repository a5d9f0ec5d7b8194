"""The daemon under systemd's eyes (sd_notify over a real NOTIFY_SOCKET) and IMDS at boot:
v1-only is said, a disabled endpoint is said with the setting to change and retried, never fatal."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonLab

pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DaemonLab]:
    with DaemonLab(tmp_path) as daemon_lab:
        yield daemon_lab


def test_ready_status_watchdog_and_stopping(lab: DaemonLab, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                return messages

    try:
        code = lab.platform.create_perscode()  # type: ignore[union-attr]
        lab.set_user_data(f"PERSCODE={code}\n")
        lab.start_daemon(env=lab.env(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000"))
        lab.wait_for(r"registered with the platform")
        lab.wait_until(lambda: any("polling every" in m for m in drain()), timeout_s=15, what="STATUS=polling")
        lab.wait_until(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 3, timeout_s=10, what="3 watchdog pings")
        assert lab.stop_daemon() == 0
        drain()
    finally:
        sock.close()
    assert "READY=1" in messages
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert any(s.startswith("STATUS=user-data") for s in statuses)
    assert any(s.startswith("STATUS=registering") for s in statuses)
    assert messages[-1] == "STOPPING=1" or "STOPPING=1" in messages
    assert code not in "".join(messages)


def test_imds_v1_only_is_said(lab: DaemonLab) -> None:
    assert lab.imds is not None
    lab.imds.mode = "v1-only"
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.start_daemon()
    lab.wait_for(r"^vsa: IMDSv1 in use \(.+\)$")
    lab.wait_for(r"registered with the platform")
    assert lab.status()["imds"] == "v1"
    assert lab.stop_daemon() == 0


def test_imds_disabled_endpoint_is_said_and_retried(lab: DaemonLab) -> None:
    assert lab.imds is not None
    lab.imds.mode = "disabled"
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\n")
    lab.start_daemon()
    lab.wait_for(r"is disabled \(403 Forbidden on .*HttpEndpoint=enabled.*\(the appliance keeps trying\)$")
    assert lab.status()["imds"] == "unavailable"
    lab.imds.mode = "v2-optional"  # the operator enables the endpoint
    lab.wait_for(r"^vsa: IMDSv2 in use", timeout_s=20)
    lab.wait_for(r"registered with the platform")
    assert lab.stop_daemon() == 0
