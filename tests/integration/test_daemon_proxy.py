"""Registration and polling through a real Squid with basic authentication (PROXY_URL).

Both forms: ``user:password@host:port`` and ``domain\\user:password@host:port``
(sent as basic credentials with the domain; Squid's password file holds
``CORP\\jdoe``). The password is a canary that must appear nowhere: not on the
console, not in the journal (stderr), not in any file under the state directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require
from daemon_harness import DaemonLab

from appliance.lab.squid import Squid, squid_available

pytestmark = pytest.mark.slow

CANARY = "Canary-Vsa@pw:31337"  # '@' and ':' inside on purpose


@pytest.fixture
def squid() -> Iterator[Squid]:
    reason = squid_available()
    require(reason is None, reason or "")
    with Squid(users={"jdoe": CANARY, "CORP\\jdoe": CANARY}) as proxy:
        yield proxy


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DaemonLab]:
    with DaemonLab(tmp_path) as daemon_lab:
        yield daemon_lab


def assert_no_canary(lab: DaemonLab, secret: str = CANARY) -> None:
    assert secret not in lab.console(), "password on the console"
    assert secret not in lab.journal(), "password in the journal output"
    for path, data in lab.state_files_text():
        assert secret.encode() not in data, f"password in {path}"


@pytest.mark.parametrize("login", ["jdoe", r"CORP\jdoe"])
def test_register_and_poll_through_squid(lab: DaemonLab, squid: Squid, login: str) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\nPROXY_URL={login}:{CANARY}@127.0.0.1:{squid.port}\n")
    lab.start_daemon()
    shown = f"{login}:***@127.0.0.1:{squid.port}"
    lab.wait_for(rf"^vsa: proxy for the platform: {re.escape(shown)}$")
    lab.wait_for(rf"reachable through the proxy {re.escape(shown)}$")
    appliance_id = lab.wait_for(r"^vsa: registered with the platform: appliance ID (\S+)$").group(1)
    lab.wait_until(lambda: len(lab.polls()) >= 2, timeout_s=15, what="2 polls")
    assert {p["appliance_id"] for p in lab.polls()} == {appliance_id}

    status = lab.status()
    assert status["proxy"] == shown
    assert lab.stop_daemon() == 0
    assert_no_canary(lab)

    # The platform connections went through Squid, as the authenticated user, by CONNECT
    # (Squid logs a tunnel when it closes: after the daemon stopped).
    platform_port = lab.server.port  # type: ignore[union-attr]
    needle = f"CONNECT 127.0.0.1:{platform_port}"
    lab.wait_until(lambda: needle in squid.access_log_text(), timeout_s=10, what="Squid's CONNECT log lines")
    log = squid.access_log_text()
    tunnels = [line for line in log.splitlines() if needle in line]
    assert tunnels and all("jdoe" in line and "TCP_TUNNEL/200" in line for line in tunnels), log
    if "\\" in login:
        assert all("CORP" in line for line in tunnels), log  # the domain travelled with the user name


def test_wrong_proxy_password_is_explained_and_fixed_user_data_is_picked_up(lab: DaemonLab, squid: Squid) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    wrong = "Wrong-canary:777"
    lab.set_user_data(f"PERSCODE={code}\nPROXY_URL=jdoe:{wrong}@127.0.0.1:{squid.port}\n")
    lab.start_daemon()
    platform_port = lab.server.port  # type: ignore[union-attr]
    lab.wait_for(rf"^vsa: platform: unable to connect to 127.0.0.1:{platform_port} - please fix: the proxy "
                 rf"jdoe:\*\*\*@127.0.0.1:{squid.port} refused the credentials \(407 Proxy Authentication Required\); "
                 r"correct the user name and password in PROXY_URL")
    assert lab.proc is not None and lab.proc.poll() is None
    # The operator corrects PROXY_URL: the daemon notices and registers.
    lab.set_user_data(f"PERSCODE={code}\nPROXY_URL=jdoe:{CANARY}@127.0.0.1:{squid.port}\n")
    lab.wait_for(r"^vsa: registered with the platform: appliance ID \S+$", timeout_s=60)
    assert lab.stop_daemon() == 0
    assert_no_canary(lab, wrong)
    assert_no_canary(lab, CANARY)


def test_proxy_gone_while_polling_and_a_new_proxy_url_is_picked_up(lab: DaemonLab, squid: Squid) -> None:
    code = lab.platform.create_perscode()  # type: ignore[union-attr]
    lab.set_user_data(f"PERSCODE={code}\nPROXY_URL=jdoe:{CANARY}@127.0.0.1:{squid.port}\n")
    lab.start_daemon()
    lab.wait_for(r"^vsa: registered with the platform: appliance ID \S+$")
    lab.wait_until(lambda: len(lab.polls()) >= 1, timeout_s=10, what="a poll through the proxy")
    squid.stop()  # the proxy disappears
    lab.wait_for(r"^vsa: poll failed: unable to connect to 127.0.0.1:\d+ - please fix: cannot connect to the proxy "
                 rf"jdoe:\*\*\*@127.0.0.1:{squid.port} \(Connection refused\)", timeout_s=20)
    lab.set_user_data(f"PERSCODE={code}\n")  # the operator removes PROXY_URL
    lab.wait_for(r"^vsa: PROXY_URL changed in user-data: connecting through the new setting$", timeout_s=20)
    lab.wait_for(r"^vsa: no proxy \(PROXY_URL not set\): connecting to the platform directly$", timeout_s=20)
    lab.wait_for(r"^vsa: registered as \S+ \(since ", timeout_s=20)  # the same identity, kept
    before = len(lab.polls())
    lab.wait_until(lambda: len(lab.polls()) > before, timeout_s=10, what="direct polls")
    assert len(lab.registers()) == 1  # the identity was kept
    assert lab.stop_daemon() == 0
    assert_no_canary(lab)
