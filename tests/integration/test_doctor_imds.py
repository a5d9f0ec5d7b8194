"""`vsa doctor` against the IMDS emulator: verdicts, fixes and exit status for every mode."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab.imds import EmulatorConfig, ImdsEmulator
from appliance.lab.squid import free_port

PERSCODE = "IMDS-doctor-code-7731"


@pytest.fixture
def env_base(tmp_path: Path) -> dict[str, str]:
    closed = free_port()
    (tmp_path / "empty.toml").write_text("")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VSA_", "AWS_"))},
        "VSA_CONFIG": str(tmp_path / "empty.toml"),
        # Nothing listens there: the platform check must fail with a verdict, fast.
        "VSA_PLATFORM_URL": f"https://127.0.0.1:{closed}",
        "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{closed}",
        "AWS_ENDPOINT_URL_EC2": f"http://127.0.0.1:{closed}",
    }


def doctor(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "doctor", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def emulator_factory() -> Iterator[object]:
    started: list[object] = []

    def start(**config: object) -> str:
        emulator = ImdsEmulator(EmulatorConfig(**config))  # type: ignore[arg-type]
        context = emulator.serve_in_thread()
        url = context.__enter__()
        started.append(context)
        return url

    yield start
    for context in started:
        context.__exit__(None, None, None)  # type: ignore[attr-defined]


def test_v2_with_gzip_user_data(env_base: dict[str, str], emulator_factory) -> None:  # type: ignore[no-untyped-def]
    url = emulator_factory(
        mode="v2-required", user_data=gzip.compress(f"PERSCODE={PERSCODE}\n".encode())
    )
    result = doctor({**env_base, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
    out = result.stdout
    assert "IMDS" in out and "OK" in out and "IMDSv2 at" in out
    assert "instance i-0abc1234def567890 in us-east-1" in out
    assert "PERSCODE found (ending in 7731) from IMDS" in out
    assert PERSCODE not in out + result.stderr
    # The platform is down: a required check fails, with the contract's words.
    assert (
        "unable to connect to 127.0.0.1:" in out and "please fix: the connection was refused" in out
    )
    assert result.returncode == 1


def test_v1_only_is_reported_as_v1(env_base: dict[str, str], emulator_factory) -> None:  # type: ignore[no-untyped-def]
    url = emulator_factory(mode="v1-only", user_data=f"PERSCODE={PERSCODE}".encode())
    out = doctor({**env_base, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url}).stdout
    assert "IMDSv1 (" in out and "404" in out


def test_hop_limit_names_the_setting(env_base: dict[str, str], emulator_factory) -> None:  # type: ignore[no-untyped-def]
    url = emulator_factory(mode="hop-limit", user_data=f"PERSCODE={PERSCODE}".encode())
    result = doctor({**env_base, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
    assert "HttpPutResponseHopLimit" in result.stdout
    assert result.returncode == 1


def test_disabled_names_the_setting(env_base: dict[str, str], emulator_factory) -> None:  # type: ignore[no-untyped-def]
    url = emulator_factory(mode="disabled")
    result = doctor({**env_base, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
    assert "HttpEndpoint=enabled" in result.stdout
    assert result.returncode == 1


def test_no_user_data_says_what_to_add(env_base: dict[str, str], emulator_factory) -> None:  # type: ignore[no-untyped-def]
    url = emulator_factory(mode="v2-optional", user_data=None)
    result = doctor({**env_base, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
    assert "none (IMDS has no user-data)" in result.stdout
    assert "add a line PERSCODE=<your personalization code>" in result.stdout
    assert result.returncode == 1


def test_bad_proxy_url_is_explained_not_guessed(env_base: dict[str, str], emulator_factory) -> None:  # type: ignore[no-untyped-def]
    url = emulator_factory(
        mode="v2-optional", user_data=f"PERSCODE={PERSCODE}\nPROXY_URL=jdoe@10.0.0.1\n".encode()
    )
    result = doctor({**env_base, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
    assert "PROXY_URL has a user name but no password" in result.stdout
    assert result.returncode == 1


def test_imds_disabled_by_config_with_user_data_file(
    env_base: dict[str, str], tmp_path: Path
) -> None:
    user_data = tmp_path / "ud"
    user_data.write_text(f"PERSCODE={PERSCODE}\n")
    result = doctor(
        {**env_base, "AWS_EC2_METADATA_DISABLED": "true"}, "--user-data", str(user_data)
    )
    assert (
        f"disabled by configuration (imds.disabled); user-data comes from {user_data}"
        in result.stdout
    )
    assert "PERSCODE found (ending in 7731)" in result.stdout
    assert "MQTT" in result.stdout and "no broker configured" in result.stdout


def test_imds_unreachable_is_a_verdict(env_base: dict[str, str]) -> None:
    result = doctor(
        {**env_base, "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    )
    assert "IMDS" in result.stdout and "FAIL" in result.stdout
    assert result.returncode == 1
