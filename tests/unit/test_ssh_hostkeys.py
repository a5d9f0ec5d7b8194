"""Host-key pins: first key wins, changes are reported, modes and atomic writes."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from appliance.errors import StateError
from appliance.state.hostkeys import HostKeyPins, pin_filename

FP1 = "SHA256:" + "A" * 43
FP2 = "SHA256:" + "B" * 43


def test_first_key_is_pinned_then_matches(tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path / "state")
    v = pins.check_or_pin("10.77.0.10", "ssh-ed25519", FP1)
    assert v.status == "pinned" and v.ok
    v = pins.check_or_pin("10.77.0.10", "ssh-ed25519", FP1)
    assert v.status == "match" and v.ok
    assert pins.get("10.77.0.10").fingerprint == FP1  # type: ignore[union-attr]


def test_changed_key_is_refused_with_words(tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path)
    pins.check_or_pin("i-0abc1234", "ssh-ed25519", FP1)
    v = pins.check_or_pin("i-0abc1234", "ssh-ed25519", FP2)
    assert v.status == "changed" and not v.ok
    msg = v.message()
    assert "host key changed" in msg and FP1 in msg and FP2 in msg
    assert "vsa hostkeys forget i-0abc1234" in msg
    # A different key type is a change too.
    assert pins.check_or_pin("i-0abc1234", "ssh-rsa", FP1).status == "changed"
    # The pin is untouched by a refused key.
    assert pins.get("i-0abc1234").fingerprint == FP1  # type: ignore[union-attr]


def test_forget_then_repin(tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path)
    pins.check_or_pin("10.0.0.1", "ssh-ed25519", FP1)
    assert pins.forget("10.0.0.1") is True
    assert pins.forget("10.0.0.1") is False
    assert pins.check_or_pin("10.0.0.1", "ssh-ed25519", FP2).status == "pinned"


def test_modes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pins = HostKeyPins(state)
    pins.check_or_pin("10.0.0.1", "ssh-ed25519", FP1)
    assert stat.S_IMODE(os.stat(pins.dir).st_mode) == 0o700
    files = list(pins.dir.iterdir())
    assert len(files) == 1, "no temporary file is left behind"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


def test_unsafe_host_keys_are_encoded(tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path)
    for key in ("../../etc/passwd", "fe80::1%eth0", ".", "a/b"):
        name = pin_filename(key)
        assert "/" not in name and name not in (".json", "..json")
        assert pins.check_or_pin(key, "ssh-ed25519", FP1).status == "pinned"
        assert pins.get(key).host_key == key  # type: ignore[union-attr]
    assert {p.host_key for p in pins.pins()} == {"../../etc/passwd", "fe80::1%eth0", ".", "a/b"}
    assert not (tmp_path.parent / "etc").exists()


def test_concurrent_first_sightings_agree(tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path)
    verdicts = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        verdicts.append(pins.check_or_pin("10.0.0.9", "ssh-ed25519", FP1 if i % 2 else FP2))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = pins.get("10.0.0.9")
    assert winner is not None
    assert sum(v.status == "pinned" for v in verdicts) == 1
    for v in verdicts:
        assert (v.presented_fingerprint == winner.fingerprint) == v.ok


def test_bad_inputs_and_damaged_pin(tmp_path: Path) -> None:
    pins = HostKeyPins(tmp_path)
    with pytest.raises(StateError):
        pins.check_or_pin("", "ssh-ed25519", FP1)
    with pytest.raises(StateError):
        pins.check_or_pin("h", "ssh-ed25519", "MD5:aa")
    pins.check_or_pin("h", "ssh-ed25519", FP1)
    (pins.dir / pin_filename("h")).write_text("{not json")
    with pytest.raises(StateError, match="damaged"):
        pins.check_or_pin("h", "ssh-ed25519", FP1)
