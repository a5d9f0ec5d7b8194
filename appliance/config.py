"""The appliance's configuration: one typed value, loaded in layers.

Layers, later wins (RUNTIME.md, Configuration): built-in defaults < the TOML
file (``/etc/vsa/appliance.toml``, ``--config FILE`` or ``VSA_CONFIG``) <
environment variables. User-data (PERSCODE, PROXY_URL) is not configuration:
it is parsed by :mod:`appliance.userdata`.

Every error names the key, the layer it came from and what is wrong.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/vsa/appliance.toml")
DEFAULT_STATE_DIR = Path("/var/lib/vsa")
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
MAX_PARALLEL_HOSTS_CAP = 256


@dataclass(frozen=True)
class Config:
    """Everything the daemon and the commands read from configuration."""

    platform_url: str | None = None
    platform_ca_file: Path | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    signatures_public_key: bytes | None = None
    imds_endpoint: str = DEFAULT_IMDS_ENDPOINT
    imds_disabled: bool = False
    sts_endpoint: str | None = None
    ec2_endpoint: str | None = None
    max_parallel_hosts: int | None = None
    allow_targets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    mqtt_url: str | None = None
    # Where each value came from, for `vsa doctor` and error messages.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def platform_host_port(self) -> tuple[str, int] | None:
        """The platform's host and port, or None when no URL is configured."""
        if self.platform_url is None:
            return None
        parts = urlsplit(self.platform_url)
        return parts.hostname or "", parts.port or 443


# --- value parsers: each takes the raw value and returns the typed one or raises ValueError ---


def _https_url(value: Any) -> str:
    text = _string(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme != "https":
        raise ValueError("must be an https:// URL (the platform is only spoken to over TLS)")
    if not parts.hostname:
        raise ValueError("has no host name")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"has an invalid port ({exc})") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be a base URL, https://host[:port], without a path")
    return text


def _http_url(value: Any) -> str:
    text = _string(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text


def _mqtt_url(value: Any) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("mqtts", "mqtt") or not parts.hostname:
        raise ValueError("must be an mqtts://host[:port] URL")
    return text


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value.strip()


def _path(value: Any) -> Path:
    return Path(_string(value))


def _existing_file(value: Any) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ValueError(f"names {path}, which is not a readable file")
    return path


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    raise ValueError("must be true or false")


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError("must be a whole number") from None
    if not 1 <= number <= MAX_PARALLEL_HOSTS_CAP:
        raise ValueError(f"must be between 1 and {MAX_PARALLEL_HOSTS_CAP}")
    return number


def _ed25519_public_key(value: Any) -> bytes:
    try:
        raw = base64.b64decode(_string(value), validate=True)
    except (ValueError, TypeError):
        raise ValueError("must be base64 of a raw 32-byte Ed25519 public key") from None
    if len(raw) != 32:
        raise ValueError(f"decodes to {len(raw)} bytes; an Ed25519 public key has 32")
    return raw


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, list):
        raise ValueError("must be a list of CIDR blocks")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_string(item), strict=False))
        except ValueError:
            raise ValueError(f"has {item!r}, which is not a CIDR block") from None
    return tuple(networks)


@dataclass(frozen=True)
class _Key:
    toml: str  # dotted key in the TOML file
    attr: str  # Config attribute
    env: str | None  # environment variable, if any
    parse: Callable[[Any], Any]


KEYS: tuple[_Key, ...] = (
    _Key("platform.url", "platform_url", "VSA_PLATFORM_URL", _https_url),
    _Key("platform.ca_file", "platform_ca_file", "VSA_PLATFORM_CA_FILE", _existing_file),
    _Key("state.dir", "state_dir", "VSA_STATE_DIR", _path),
    _Key(
        "signatures.public_key",
        "signatures_public_key",
        "VSA_SIGNATURES_PUBLIC_KEY",
        _ed25519_public_key,
    ),
    _Key("imds.endpoint", "imds_endpoint", "AWS_EC2_METADATA_SERVICE_ENDPOINT", _http_url),
    _Key("imds.disabled", "imds_disabled", "AWS_EC2_METADATA_DISABLED", _bool),
    _Key("aws.sts_endpoint", "sts_endpoint", "AWS_ENDPOINT_URL_STS", _http_url),
    _Key("aws.ec2_endpoint", "ec2_endpoint", "AWS_ENDPOINT_URL_EC2", _http_url),
    _Key("scan.max_parallel_hosts", "max_parallel_hosts", "VSA_MAX_PARALLEL_HOSTS", _positive_int),
    _Key("scan.allow_targets", "allow_targets", None, _networks),
    _Key("mqtt.url", "mqtt_url", "VSA_MQTT_URL", _mqtt_url),
)
# The sections and key names the TOML file may use; anything else is a typo.
_KNOWN_SECTIONS: dict[str, set[str]] = {}
for _k in KEYS:
    _section, _name = _k.toml.split(".")
    _KNOWN_SECTIONS.setdefault(_section, set()).add(_name)


def config_file_path(explicit: str | Path | None, environ: Mapping[str, str]) -> Path:
    """The TOML file to read: ``--config``, else ``VSA_CONFIG``, else the default."""
    if explicit:
        return Path(explicit)
    if environ.get("VSA_CONFIG"):
        return Path(environ["VSA_CONFIG"])
    return DEFAULT_CONFIG_FILE


def load_config(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load the layered configuration and return one validated :class:`Config`.

    A file named explicitly (``--config`` or ``VSA_CONFIG``) must exist; the
    default file is optional. Raises :class:`ConfigError` naming the key, the
    source and the problem.
    """
    env = dict(os.environ if environ is None else environ)
    explicit = bool(config_file) or bool(env.get("VSA_CONFIG"))
    path = config_file_path(config_file, env)
    file_values = _read_toml(path, required=explicit)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        section, name = key.toml.split(".")
        raw = file_values.get(section, {}).get(name)
        if raw is not None:
            values[key.attr] = _parse(key, raw, f"{path} ({key.toml})")
            sources[key.attr] = str(path)
        if key.env and env.get(key.env, "").strip():
            values[key.attr] = _parse(key, env[key.env], f"environment variable {key.env}")
            sources[key.attr] = f"environment ({key.env})"
    for key in KEYS:
        sources.setdefault(key.attr, "built-in default")
    return replace(Config(), **values, sources=sources)


def _parse(key: _Key, raw: Any, source: str) -> Any:
    try:
        return key.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{key.toml} from {source} {exc}") from None


def _read_toml(path: Path, *, required: bool) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"configuration file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    for section, table in data.items():
        if section not in _KNOWN_SECTIONS:
            raise ConfigError(f"configuration file {path} has an unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"configuration file {path}: {section} must be a table")
        for name in table:
            if name not in _KNOWN_SECTIONS[section]:
                raise ConfigError(f"configuration file {path} has an unknown key {section}.{name}")
    return data
