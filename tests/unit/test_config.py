"""Layered configuration: defaults < TOML file < environment, errors naming key and source."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from appliance.config import DEFAULT_STATE_DIR, load_config
from appliance.errors import ConfigError

KEY_B64 = base64.b64encode(bytes(range(32))).decode()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_defaults_without_any_file() -> None:
    config = load_config(environ={})
    assert config.state_dir == DEFAULT_STATE_DIR
    assert config.platform_url is None
    assert config.imds_endpoint == "http://169.254.169.254"
    assert config.imds_disabled is False
    assert config.sources["state_dir"] == "built-in default"


def test_file_then_environment_wins(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    path = write(
        tmp_path,
        f"""
[platform]
url = "https://platform.example:8443/"
ca_file = "{ca}"
[state]
dir = "/srv/vsa"
[signatures]
public_key = "{KEY_B64}"
[scan]
allow_targets = ["127.0.0.0/8"]
max_parallel_hosts = 8
""",
    )
    config = load_config(
        path, environ={"VSA_STATE_DIR": "/tmp/state", "AWS_EC2_METADATA_DISABLED": "true"}
    )
    assert config.platform_url == "https://platform.example:8443"
    assert config.platform_host_port == ("platform.example", 8443)
    assert config.platform_ca_file == ca
    assert config.state_dir == Path("/tmp/state")
    assert config.sources["state_dir"] == "environment (VSA_STATE_DIR)"
    assert config.sources["platform_url"] == str(path)
    assert config.signatures_public_key == bytes(range(32))
    assert config.imds_disabled is True
    assert [str(n) for n in config.allow_targets] == ["127.0.0.0/8"]
    assert config.max_parallel_hosts == 8


def test_vsa_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[state]\ndir = "/x"\n')
    assert load_config(environ={"VSA_CONFIG": str(path)}).state_dir == Path("/x")


def test_aws_endpoints_from_standard_variables() -> None:
    config = load_config(
        environ={
            "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:5000",
            "AWS_ENDPOINT_URL_EC2": "http://127.0.0.1:5001",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:1338",
        }
    )
    assert config.sts_endpoint == "http://127.0.0.1:5000"
    assert config.ec2_endpoint == "http://127.0.0.1:5001"
    assert config.imds_endpoint == "http://127.0.0.1:1338"


@pytest.mark.parametrize(
    ("toml", "env", "words"),
    [
        (
            '[platform]\nurl = "http://plain.example"\n',
            {},
            r"platform.url from .*appliance.toml \(platform.url\) must be an https:// URL",
        ),
        (
            "",
            {"VSA_PLATFORM_URL": "https://x.example/path"},
            r"platform.url from environment variable VSA_PLATFORM_URL must be a base URL",
        ),
        (
            '[platform]\nca_file = "/nonexistent/ca.pem"\n',
            {},
            r"platform.ca_file .* not a readable file",
        ),
        ('[signatures]\npublic_key = "abc"\n', {}, r"signatures.public_key .* base64"),
        (
            f'[signatures]\npublic_key = "{base64.b64encode(b"short").decode()}"\n',
            {},
            r"decodes to 5 bytes",
        ),
        ("[scan]\nmax_parallel_hosts = 0\n", {}, r"scan.max_parallel_hosts .* between 1 and"),
        ("", {"VSA_MAX_PARALLEL_HOSTS": "many"}, r"VSA_MAX_PARALLEL_HOSTS must be a whole number"),
        ("", {"AWS_EC2_METADATA_DISABLED": "maybe"}, r"imds.disabled .* true or false"),
        ('[scan]\nallow_targets = ["not-a-cidr"]\n', {}, r"scan.allow_targets .* not a CIDR"),
        ("[platform\n", {}, r"not valid TOML"),
        ("[nonsense]\nx = 1\n", {}, r"unknown section \[nonsense\]"),
        ("[platform]\nurll = 1\n", {}, r"unknown key platform.urll"),
    ],
)
def test_errors_name_key_source_and_problem(
    tmp_path: Path, toml: str, env: dict[str, str], words: str
) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError, match=words):
        load_config(path, environ=env)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})
