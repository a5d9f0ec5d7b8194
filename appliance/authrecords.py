"""Typed authentication records (PROTOCOL.md, Authentication records).

The platform sends each record as a JWE; once decrypted, the plaintext JSON is
parsed here into a :class:`UnixRecord` or :class:`WindowsRecord`. Every secret
a record holds is registered with the console's scrubber as it is parsed, so
it can never reach a log line or the console. Records live only in memory.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.console import register_secret
from appliance.errors import VsaError

NT_HASH_RE = re.compile(r"^[0-9A-Fa-f]{32}$")
DelegationMethod = Literal["none", "sudo", "su"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthRecordError(VsaError):
    """A decrypted authentication record is malformed (the message names the field)."""


@dataclass(frozen=True)
class PrivateKeySpec:
    """One private key of a unix record, with its optional passphrase and certificate."""

    pem: str = field(repr=False)
    passphrase: str | None = field(default=None, repr=False)
    certificate: str | None = None  # the "*-cert-v01@openssh.com" line


@dataclass(frozen=True)
class RootDelegation:
    """How to become root after login."""

    method: DelegationMethod = "none"
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UnixRecord:
    """A ``unix`` record: SSH login by key(s) or password, then root delegation."""

    id: str
    title: str
    username: str
    password: str | None = field(default=None, repr=False)
    private_keys: tuple[PrivateKeySpec, ...] = ()
    root_delegation: RootDelegation = RootDelegation()
    port: int = 22
    targets: tuple[Network, ...] = ()
    type: Literal["unix"] = "unix"

    def applies_to(self, ip: str) -> bool:
        """Whether this record's ``targets`` include ``ip``."""
        return _applies(self.targets, ip)


@dataclass(frozen=True)
class WindowsRecord:
    """A ``windows`` record: NTLM login with a password or an NT hash."""

    id: str
    title: str
    username: str
    domain: str | None = None
    password: str | None = field(default=None, repr=False)
    nt_hash: str | None = field(default=None, repr=False)
    protocols: tuple[Literal["ntlmv2", "ntlmv1"], ...] = ("ntlmv2",)
    targets: tuple[Network, ...] = ()
    type: Literal["windows"] = "windows"

    def applies_to(self, ip: str) -> bool:
        """Whether this record's ``targets`` include ``ip``."""
        return _applies(self.targets, ip)


AuthRecord = UnixRecord | WindowsRecord


def _applies(targets: tuple[Network, ...], ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in targets)


def parse_auth_record(obj: Any) -> AuthRecord:
    """Parse one decrypted record; raise :class:`AuthRecordError` naming the bad field."""
    if not isinstance(obj, dict):
        raise AuthRecordError("an authentication record must be a JSON object")
    _register_secrets(obj)
    kind = obj.get("type")
    rid = _str(obj, "id")
    title = _opt_str(obj, "title") or rid
    targets = _targets(obj)
    if kind == "unix":
        keys = obj.get("private_keys") or []
        if not isinstance(keys, list):
            raise AuthRecordError(f"record {rid}: private_keys must be a list")
        parsed_keys = tuple(_private_key(rid, k) for k in keys)
        password = _opt_str(obj, "password")
        if not parsed_keys and password is None:
            raise AuthRecordError(f"record {rid}: a unix record needs private_keys or a password")
        delegation = obj.get("root_delegation") or {"method": "none"}
        if not isinstance(delegation, dict):
            raise AuthRecordError(f"record {rid}: root_delegation must be an object")
        method = delegation.get("method", "none")
        if method not in ("none", "sudo", "su"):
            raise AuthRecordError(f"record {rid}: root_delegation.method must be none, sudo or su")
        port = obj.get("port", 22)
        if port is None:
            port = 22
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise AuthRecordError(f"record {rid}: port must be a number from 1 to 65535")
        return UnixRecord(
            id=rid,
            title=title,
            username=_str(obj, "username"),
            password=password,
            private_keys=parsed_keys,
            root_delegation=RootDelegation(
                method=method, password=_opt_str(delegation, "password")
            ),
            port=port,
            targets=targets,
        )
    if kind == "windows":
        password = _opt_str(obj, "password")
        nt_hash = _opt_str(obj, "nt_hash")
        if nt_hash is not None and not NT_HASH_RE.match(nt_hash):
            raise AuthRecordError(f"record {rid}: nt_hash must be 32 hex digits")
        if password is None and nt_hash is None:
            raise AuthRecordError(f"record {rid}: a windows record needs a password or an nt_hash")
        protocols = obj.get("protocols") or ["ntlmv2"]
        if (
            not isinstance(protocols, list)
            or not protocols
            or any(p not in ("ntlmv2", "ntlmv1") for p in protocols)
        ):
            raise AuthRecordError(f"record {rid}: protocols must list ntlmv2 and/or ntlmv1")
        return WindowsRecord(
            id=rid,
            title=title,
            username=_str(obj, "username"),
            domain=_opt_str(obj, "domain"),
            password=password,
            nt_hash=nt_hash.lower() if nt_hash else None,
            protocols=tuple(protocols),
            targets=targets,
        )
    raise AuthRecordError(f"record {rid}: type must be unix or windows")


def _register_secrets(obj: dict[str, Any]) -> None:
    """Register every secret the record holds before anything can print it."""
    for key in ("password", "nt_hash"):
        if isinstance(obj.get(key), str):
            register_secret(obj[key])
    delegation = obj.get("root_delegation")
    if isinstance(delegation, dict) and isinstance(delegation.get("password"), str):
        register_secret(delegation["password"])
    keys = obj.get("private_keys")
    # Only a list holds keys; anything else is refused by parse_auth_record after this.
    for key in keys if isinstance(keys, list) else []:
        if isinstance(key, dict):
            for name in ("pem", "passphrase"):
                if isinstance(key.get(name), str):
                    register_secret(key[name])


def _private_key(rid: str, obj: Any) -> PrivateKeySpec:
    if not isinstance(obj, dict) or not isinstance(obj.get("pem"), str) or not obj["pem"].strip():
        raise AuthRecordError(f"record {rid}: each private key needs a pem")
    return PrivateKeySpec(
        pem=obj["pem"],
        passphrase=_opt_str(obj, "passphrase"),
        certificate=_opt_str(obj, "certificate"),
    )


def _targets(obj: dict[str, Any]) -> tuple[Network, ...]:
    rid = obj.get("id")
    raw = obj.get("targets")
    if not isinstance(raw, list):
        raise AuthRecordError(f"record {rid}: targets must be a list of addresses or CIDRs")
    networks = []
    for item in raw:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise AuthRecordError(
                f"record {rid}: target {item!r} is not an address or CIDR"
            ) from None
    return tuple(networks)


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise AuthRecordError(f"authentication record field {key} must be a non-empty string")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AuthRecordError(f"authentication record field {key} must be a string or null")
    return value
