"""Secrets at the platform: JWE auth records for appliances, and a vault for data at rest.

Authentication records arrive at the platform in clear (from the operator) and
leave it only as JWE compact serializations, ``alg`` ECDH-ES, ``enc`` A256GCM,
encrypted to the P-256 key in the appliance's client certificate (PROTOCOL.md,
Authentication records). Between submission and offer they are kept in the
SQLite file sealed with AES-256-GCM under a key of the data directory
(``vault.key``, mode 0600), so that no credential sits on disk in clear.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc import jwe
from joserfc.jwk import ECKey

from appliance.lab.platform.ca import write_private
from appliance.lab.platform.errors import LabPlatformError

JWE_PROTECTED_HEADER = {"alg": "ECDH-ES", "enc": "A256GCM", "cty": "application/json"}
VAULT_NONCE_BYTES = 12
VAULT_KEY_BYTES = 32


def encrypt_auth_record(record: dict[str, Any], public_key_pem: str) -> str:
    """One plaintext auth record as a JWE compact string for the holder of ``public_key_pem``.

    The protected header carries ``kid``, the RFC 7638 thumbprint of the
    recipient key, so that an appliance can tell a record meant for a key it
    no longer holds (after re-registration) from a corrupt one.
    """
    key = ECKey.import_key(public_key_pem)
    header = dict(JWE_PROTECTED_HEADER, kid=key.thumbprint())
    plaintext = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return jwe.encrypt_compact(header, plaintext, key)


def decrypt_auth_record(token: str, private_key_pem: bytes | str) -> dict[str, Any]:
    """Decrypt one JWE auth record with the appliance's private key (tests and demo use this)."""
    key = ECKey.import_key(private_key_pem)
    result = jwe.decrypt_compact(token, key, algorithms=["ECDH-ES", "A256GCM"])
    obj = json.loads(result.plaintext or b"null")
    if not isinstance(obj, dict):
        raise LabPlatformError("the auth record does not decrypt to a JSON object")
    return obj


class Vault:
    """AES-256-GCM sealing of small secrets stored in the platform's database."""

    def __init__(self, key_file: Path) -> None:
        self._key_file = key_file
        self._key: bytes | None = None

    def create(self) -> None:
        """Create the vault key if the data directory has none yet."""
        if not self._key_file.exists():
            write_private(self._key_file, os.urandom(VAULT_KEY_BYTES))

    def _aead(self) -> AESGCM:
        if self._key is None:
            self._key = self._key_file.read_bytes()
        return AESGCM(self._key)

    def seal(self, value: Any) -> bytes:
        """JSON-encode ``value`` and encrypt it; nonce first."""
        nonce = os.urandom(VAULT_NONCE_BYTES)
        data = json.dumps(value, separators=(",", ":")).encode("utf-8")
        return nonce + self._aead().encrypt(nonce, data, b"vsa-lab-platform")

    def open(self, blob: bytes) -> Any:
        """Decrypt what :meth:`seal` produced."""
        nonce, ciphertext = blob[:VAULT_NONCE_BYTES], blob[VAULT_NONCE_BYTES:]
        return json.loads(self._aead().decrypt(nonce, ciphertext, b"vsa-lab-platform"))
