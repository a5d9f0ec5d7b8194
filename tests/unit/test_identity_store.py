"""Identity storage: P-256 key and CSR, modes 0700/0600, binding and clone detection, wipe and reset."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.console import redact
from appliance.errors import StateError
from appliance.state import identity as identity_module
from appliance.state.files import atomic_write, read_json_file
from appliance.state.identity import IdentityStore, binding_verdict, clone_message


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def issue(csr_pem: str, *, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    """A client certificate for the CSR's key (or for another ``key``), from a throw-away CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject).issuer_name(name)
        .public_key(key.public_key() if key else csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_create_makes_a_p256_key_and_a_valid_csr_with_private_modes(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path / "state")
    ident = store.create("i-0aaa")
    assert mode(tmp_path / "state") == 0o700 and mode(store.directory) == 0o700
    for f in store.directory.iterdir():
        assert mode(f) == 0o600, f
    key = serialization.load_pem_private_key(ident.key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(ident.csr_pem().encode())
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    assert ident.instance_id == "i-0aaa" and not ident.registered
    # the key is registered as a secret: a line of it never reaches a log
    key_line = ident.key_path.read_text().splitlines()[1]
    assert redact(f"oops {key_line}") == "oops ***"


def test_registration_round_trip(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    ident = store.create("i-0aaa")
    ident = store.save_registration(ident, appliance_id="vsa-1", certificate_pem=issue(ident.csr_pem()),
                                    ca_pem="-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
                                    platform_url="https://p:8443", poll_interval_s=180, mqtt=None)
    assert ident.registered
    again = store.load()
    assert again is not None and again.registered and again.registration is not None
    assert again.registration.appliance_id == "vsa-1" and again.instance_id == "i-0aaa"
    assert again.registration.poll_interval_s == 180
    updated = store.update_poll_interval(again, 60)
    assert store.load().registration.poll_interval_s == 60  # type: ignore[union-attr]
    assert updated.registration is not None and updated.registration.poll_interval_s == 60
    for f in store.directory.iterdir():
        assert mode(f) == 0o600, f
    meta = read_json_file(store.directory / "identity.json")
    assert "PRIVATE" not in str(meta)


def test_a_certificate_for_another_key_is_refused(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    ident = store.create("i-0aaa")
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(StateError, match="not for this appliance's key"):
        store.save_registration(ident, appliance_id="vsa-1", certificate_pem=issue(ident.csr_pem(), key=other),
                                ca_pem=None, platform_url=None, poll_interval_s=None, mqtt=None)
    assert not store.load().registered  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("bound", "current", "verdict"),
    [
        ("i-A", "i-A", "same"),
        ("i-A", "i-B", "moved"),
        (None, "i-B", "moved"),  # made without IMDS, now on a known instance: not provably ours
        ("i-A", None, "unchecked"),
        (None, None, "same"),
    ],
)
def test_binding_verdict(bound: str | None, current: str | None, verdict: str) -> None:
    assert binding_verdict(bound, current) == verdict


def test_clone_message_names_both_instances() -> None:
    text = clone_message("i-0aaa", "i-0bbb", registered=True)
    assert text == ("this disk was registered as i-0aaa but runs on i-0bbb (a clone, a snapshot restored "
                    "elsewhere or a moved disk): setting the old identity aside and registering afresh")
    assert "i-0aaa" in clone_message("i-0aaa", "i-0bbb", registered=False)


def test_set_aside_keeps_the_old_identity_out_of_the_way(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    store.create("i-A")
    aside = store.set_aside()
    assert aside.name.startswith("identity.old-") and (aside / "key.pem").exists()
    assert mode(aside) == 0o700
    assert store.load() is None
    store.create("i-A")
    second = store.set_aside()
    assert second != aside and second.exists()


def test_wipe_removes_the_identity_only(tmp_path: Path) -> None:
    store = IdentityStore(tmp_path)
    store.create("i-A")
    atomic_write(tmp_path / "spool.db", b"spool")
    (tmp_path / "journal").mkdir()
    assert store.wipe() is True
    assert not store.directory.exists()
    assert (tmp_path / "spool.db").read_bytes() == b"spool" and (tmp_path / "journal").is_dir()
    assert store.wipe() is False


def test_atomic_write_replaces_whole_files_with_0600(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and mode(target) == 0o600 and mode(target.parent) == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]  # no temporary left behind


def _reset_args(tmp_path: Path, yes: bool) -> argparse.Namespace:
    config = tmp_path / "appliance.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    return argparse.Namespace(config=str(config), yes=yes)


def test_reset_with_yes_wipes_identity_not_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = IdentityStore(tmp_path / "state")
    store.create("i-A")
    atomic_write(tmp_path / "state" / "spool.db", b"x")
    assert identity_module.reset_main(_reset_args(tmp_path, yes=True)) == 0
    assert not store.directory.exists() and (tmp_path / "state" / "spool.db").exists()
    assert "vsa: reset: wiped the identity" in capsys.readouterr().out


def test_reset_without_yes_asks_and_refuses_without_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = IdentityStore(tmp_path / "state")
    store.create("i-A")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert identity_module.reset_main(_reset_args(tmp_path, yes=False)) == 1
    assert store.directory.exists()
    assert "--yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert identity_module.reset_main(_reset_args(tmp_path, yes=False)) == 1
    assert store.directory.exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert identity_module.reset_main(_reset_args(tmp_path, yes=False)) == 0
    assert not store.directory.exists()


def test_reset_with_nothing_to_wipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert identity_module.reset_main(_reset_args(tmp_path, yes=True)) == 0
    assert "nothing to do" in capsys.readouterr().out
