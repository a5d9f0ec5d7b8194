"""SSH host-key pins in the state directory (trust on first use).

The first host key the scanner sees for a ``host_key`` (an EC2 instance ID or an
IP address, PROTOCOL.md) is pinned; later scans compare the key they are shown
with the pin, and a different key stops authentication on that host (the SSH
layer reports status ``error`` and never sends a credential to it). A person
decides what a changed key means; :meth:`HostKeyPins.forget` (``vsa hostkeys
forget HOST_KEY``) drops a pin so that the next scan pins the new key.

Layout: ``<state_dir>/ssh_host_keys/<name>.json``, one small JSON file per host,
so that pinning one host never rewrites the others and a thousand first scans
do not rewrite one growing file. The directory is mode 0700, files 0600; a pin
is written to a temporary file, fsynced, and published with ``link()``, which
fails if another scan pinned the same host first: the first key wins, whatever
the interleaving of threads or processes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from appliance.errors import StateError
from appliance.state.files import DIR_MODE, FILE_MODE, fsync_dir

PINS_DIRNAME = "ssh_host_keys"
MAX_PIN_FILE_BYTES = 4096  # a pin is ~200 bytes; anything larger is not ours
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
_KEY_TYPE = re.compile(r"^[a-z0-9@._-]{3,64}$")

Verdict = Literal["pinned", "match", "changed"]


@dataclass(frozen=True)
class HostKeyPin:
    """The key pinned for one host: its type and SHA256 fingerprint."""

    host_key: str
    key_type: str  # ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa, ...
    fingerprint: str  # SHA256:... (OpenSSH form)
    pinned_at: str  # RFC 3339 UTC


@dataclass(frozen=True)
class PinVerdict:
    """What a presented key means: newly ``pinned``, a ``match``, or ``changed``."""

    status: Verdict
    pin: HostKeyPin  # the pin in force (for ``changed``: the OLD key)
    presented_type: str
    presented_fingerprint: str

    @property
    def ok(self) -> bool:
        """Whether authentication may go on."""
        return self.status != "changed"

    def message(self) -> str:
        """Words for the operator (used as the auth outcome's message when changed)."""
        if self.status == "changed":
            return (
                f"host key changed: {self.pin.host_key} was pinned to {self.pin.key_type} "
                f"{self.pin.fingerprint} on {self.pin.pinned_at}, it now shows "
                f"{self.presented_type} {self.presented_fingerprint}; authentication "
                f"stopped. If the change is expected, run `vsa hostkeys forget {self.pin.host_key}`"
            )
        if self.status == "pinned":
            return f"pinned {self.presented_type} {self.presented_fingerprint} for {self.pin.host_key}"
        return f"host key matches the pin for {self.pin.host_key}"


def pin_filename(host_key: str) -> str:
    """A file name for ``host_key``: as is when plainly safe, else base32 of it."""
    if _SAFE_NAME.match(host_key) and host_key not in (".", ".."):
        return host_key + ".json"
    encoded = base64.b32encode(host_key.encode("utf-8")).decode("ascii").rstrip("=").lower()
    return "b32-" + encoded[:200] + ".json"


class HostKeyPins:
    """Host-key pins under ``state_dir``; safe to share between threads and processes."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / PINS_DIRNAME

    # ---- reading -------------------------------------------------------------------

    def get(self, host_key: str) -> HostKeyPin | None:
        """The pin for ``host_key``, or None when it has none."""
        _check_host_key(host_key)
        path = self.dir / pin_filename(host_key)
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_PIN_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read the host-key pin {path}: {exc.strerror}") from exc
        return _parse_pin(path, raw, host_key)

    # ---- deciding ------------------------------------------------------------------

    def check_or_pin(self, host_key: str, key_type: str, fingerprint: str) -> PinVerdict:
        """Compare a presented key with the pin; pin it when the host has none.

        ``key_type`` is the key's own name (``ssh-ed25519``, ``ssh-rsa``, ...) and
        ``fingerprint`` its ``SHA256:...`` form. Raises :class:`StateError` when
        the state directory cannot be used (the caller then must not trust the key).
        """
        _check_host_key(host_key)
        if not _KEY_TYPE.match(key_type):
            raise StateError(f"not an SSH key type: {key_type[:80]!r}")
        if not _FINGERPRINT.match(fingerprint):
            raise StateError(f"not a SHA256 fingerprint: {fingerprint[:80]!r}")
        pin = self.get(host_key)
        if pin is None:
            new = HostKeyPin(host_key=host_key, key_type=key_type, fingerprint=fingerprint,
                             pinned_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            if self._publish(new):
                return PinVerdict("pinned", new, key_type, fingerprint)
            # Another scan pinned this host between our read and our write: its key wins.
            pin = self.get(host_key)
            if pin is None:
                raise StateError(f"the host-key pin for {host_key} vanished while pinning")
        same = pin.key_type == key_type and pin.fingerprint == fingerprint
        return PinVerdict("match" if same else "changed", pin, key_type, fingerprint)

    def forget(self, host_key: str) -> bool:
        """Drop the pin of ``host_key`` (``vsa hostkeys forget``); True if there was one."""
        _check_host_key(host_key)
        path = self.dir / pin_filename(host_key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StateError(f"cannot remove the host-key pin {path}: {exc.strerror}") from exc
        fsync_dir(self.dir)
        return True

    def pins(self) -> list[HostKeyPin]:
        """Every pin, sorted by host key (for a ``vsa hostkeys list``)."""
        if not self.dir.is_dir():
            return []
        pins = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                raw = path.read_bytes()[: MAX_PIN_FILE_BYTES + 1]
                pins.append(_parse_pin(path, raw, None))
            except (OSError, StateError):
                continue  # a damaged pin shows up when its host is scanned
        return sorted(pins, key=lambda p: p.host_key)

    # ---- writing -------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        try:
            self.state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self.dir.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(self.dir, DIR_MODE)
        except OSError as exc:
            raise StateError(f"cannot create {self.dir}: {exc.strerror}") from exc

    def _publish(self, pin: HostKeyPin) -> bool:
        """Write ``pin`` atomically; False if a pin for that host already exists."""
        self._ensure_dir()
        final = self.dir / pin_filename(pin.host_key)
        body = json.dumps({"host_key": pin.host_key, "key_type": pin.key_type,
                           "fingerprint": pin.fingerprint, "pinned_at": pin.pinned_at},
                          sort_keys=True).encode("utf-8") + b"\n"
        fd, tmp = tempfile.mkstemp(prefix=".pin-", suffix=".tmp", dir=self.dir)
        try:
            os.fchmod(fd, FILE_MODE)
            os.write(fd, body)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            try:
                # link() is atomic and refuses an existing name: the first pin wins.
                os.link(tmp, final)
            except FileExistsError:
                return False
            fsync_dir(self.dir)
            return True
        except OSError as exc:
            raise StateError(f"cannot write the host-key pin {final}: {exc.strerror}") from exc
        finally:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _check_host_key(host_key: str) -> None:
    if not isinstance(host_key, str) or not host_key or len(host_key) > 255 or "\x00" in host_key:
        raise StateError("a host key must be a non-empty string of at most 255 characters")


def _parse_pin(path: Path, raw: bytes, host_key: str | None) -> HostKeyPin:
    if len(raw) > MAX_PIN_FILE_BYTES:
        raise StateError(f"the host-key pin {path} is too large to be a pin")
    try:
        obj = json.loads(raw.decode("utf-8"))
        pin = HostKeyPin(host_key=str(obj["host_key"]), key_type=str(obj["key_type"]),
                         fingerprint=str(obj["fingerprint"]), pinned_at=str(obj.get("pinned_at", "")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise StateError(
            f"the host-key pin {path} is damaged; remove it with `vsa hostkeys forget` "
            "once you have checked the host's key"
        ) from exc
    if host_key is not None and pin.host_key != host_key:
        raise StateError(f"the host-key pin {path} names {pin.host_key!r}, not {host_key!r}")
    return pin


# ---- vsa hostkeys list | forget HOST_KEY ------------------------------------------------------


def main(args: object) -> int:
    """``vsa hostkeys list|forget [HOST_KEY]``: the pins under ``state.dir`` (``--config`` honoured).

    Exit status: 0 done (``list`` with or without pins; ``forget`` removed the
    pin), 1 when ``forget`` found no pin for that host (a mistyped host key must
    not pass silently) or the state directory cannot be used, 2 for bad arguments.
    """
    import sys

    from appliance.config import load_config
    from appliance.errors import ConfigError

    action = getattr(args, "action", None)
    host_key = getattr(args, "host_key", None)
    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"vsa hostkeys: error: {exc}", file=sys.stderr)
        return 2
    pins = HostKeyPins(config.state_dir)
    try:
        if action == "list":
            if host_key:
                print("vsa hostkeys: error: list takes no host key", file=sys.stderr)
                return 2
            found = pins.pins()
            if not found:
                print(f"no pinned SSH host keys in {pins.dir}")
                return 0
            for pin in found:
                print(f"{pin.host_key}\t{pin.key_type}\t{pin.fingerprint}\tpinned {pin.pinned_at}")
            return 0
        if action == "forget":
            if not host_key:
                print("vsa hostkeys: error: forget needs the HOST_KEY (instance ID or IP) whose pin to drop",
                      file=sys.stderr)
                return 2
            if pins.forget(host_key):
                print(f"forgot the pinned host key of {host_key}; the next scan pins the key it is shown")
                return 0
            print(f"vsa hostkeys: no pinned host key for {host_key} in {pins.dir} "
                  "(see `vsa hostkeys list`)", file=sys.stderr)
            return 1
    except StateError as exc:
        print(f"vsa hostkeys: error: {exc}", file=sys.stderr)
        return 1
    print(f"vsa hostkeys: error: unknown action {action!r}; use list or forget", file=sys.stderr)
    return 2
