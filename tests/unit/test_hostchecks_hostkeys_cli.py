"""``vsa hostkeys list|forget HOST_KEY`` against pins in the state directory of --config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance import cli
from appliance.state.hostkeys import HostKeyPins

FP_A = "SHA256:" + "A" * 43
FP_B = "SHA256:" + "B" * 43


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("VSA_STATE_DIR", raising=False)
    monkeypatch.delenv("VSA_CONFIG", raising=False)
    path = tmp_path / "appliance.toml"
    path.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n')
    return path


def test_list_and_forget(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = config.parent / "state"
    assert cli.main(["hostkeys", "list", "--config", str(config)]) == 0
    assert f"no pinned SSH host keys in {state / 'ssh_host_keys'}" in capsys.readouterr().out
    pins = HostKeyPins(state)
    pins.check_or_pin("10.77.0.2", "ssh-ed25519", FP_A)
    pins.check_or_pin("i-0abc", "ssh-rsa", FP_B)
    assert cli.main(["hostkeys", "list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [["10.77.0.2", "ssh-ed25519", FP_A],
                                                       ["i-0abc", "ssh-rsa", FP_B]]
    assert cli.main(["hostkeys", "forget", "10.77.0.2", "--config", str(config)]) == 0
    assert "forgot the pinned host key of 10.77.0.2" in capsys.readouterr().out
    assert pins.get("10.77.0.2") is None and pins.get("i-0abc") is not None
    # Forgetting again, or a host never pinned: said, exit 1 (a typo must not pass silently).
    assert cli.main(["hostkeys", "forget", "10.77.0.2", "--config", str(config)]) == 1
    assert "no pinned host key for 10.77.0.2" in capsys.readouterr().err
    assert cli.main(["hostkeys", "forget", "--config", str(config)]) == 2
    assert "forget needs the HOST_KEY" in capsys.readouterr().err


def test_the_console_script_honours_config(config: Path) -> None:
    HostKeyPins(config.parent / "state").check_or_pin("10.77.0.9", "ssh-ed25519", FP_A)
    vsa = Path(sys.executable).parent / "vsa"
    out = subprocess.run([str(vsa), "hostkeys", "list", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"10.77.0.9\tssh-ed25519\t{FP_A}\tpinned ")
