"""botocore takes instance credentials from the lab IMDS emulator (LAB-NOTES.md, IMDS)."""

from __future__ import annotations

import os
from pathlib import Path

import botocore.session
import pytest

from appliance.lab.imds import EmulatorConfig, ImdsEmulator, InstanceProfile, Mode, RoleCredentials

ROLE = RoleCredentials(
    role_name="vsa-lab-role",
    access_key_id="ASIALABEMULATOR12345",
    secret_access_key="labSecretAccessKey000000000000000000000000",
    token="IQoJb3JpZ2luX2VjLAB-TOKEN",
)


def isolate_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """Only IMDS can supply credentials: no AWS_* variables, no credentials or config file."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
    # botocore reads proxy variables for IMDS: keep loopback direct.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.mark.parametrize("mode", ["v2-required", "v1-only"])
def test_botocore_takes_credentials_from_the_emulator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: Mode
) -> None:
    config = EmulatorConfig(mode=mode, profile=InstanceProfile(role=ROLE))
    emulator = ImdsEmulator(config)
    with emulator.serve_in_thread() as url:
        isolate_credentials(monkeypatch, tmp_path, url + "/")
        credentials = botocore.session.Session().get_credentials()
        assert credentials is not None
        assert credentials.method == "iam-role"
        frozen = credentials.get_frozen_credentials()
    assert frozen.access_key == ROLE.access_key_id
    assert frozen.secret_key == ROLE.secret_access_key
    assert frozen.token == ROLE.token
    fetched = [
        r for r in emulator.requests if r.path.endswith("/security-credentials/vsa-lab-role")
    ]
    assert fetched and all(r.status == 200 for r in fetched)
    if mode == "v2-required":
        assert {r.token for r in emulator.requests if r.method == "GET"} == {"valid"}
