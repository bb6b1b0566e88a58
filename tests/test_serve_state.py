"""The serve state folder (one per target, resume or move aside), the stop signals, the API key file.

Pure filesystem and signal checks in this process; the end-to-end restart is in tests/test_serve_recovery.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from aurora_rl.cli import ConfigError, ServeSection, read_api_key
from aurora_rl.runtime.serve import DEFAULT_STATE_ROOT, _StopOnSignal, prepare_state, state_dir


@pytest.mark.unit
def test_state_dir_is_one_folder_per_target_unless_given(tmp_path):
    root = DEFAULT_STATE_ROOT.expanduser()
    assert state_dir("smollm2", None) == root / "smollm2"
    assert state_dir("/models/Qwen3 8B/", None) == root / "models_Qwen3_8B"
    assert state_dir("tiny", str(tmp_path)) == tmp_path


@pytest.mark.unit
def test_resume_keeps_the_state_and_a_fresh_start_moves_it_aside(tmp_path):
    ckpt = prepare_state(tmp_path, resume=True)
    assert ckpt == tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step-00000003\n")
    (tmp_path / "draft").mkdir()
    assert prepare_state(tmp_path, resume=True) == ckpt and (ckpt / "latest").exists()
    assert prepare_state(tmp_path, resume=False) == ckpt
    assert not ckpt.exists() and not (tmp_path / "draft").exists()
    (aside,) = tmp_path.glob("previous-*")
    assert (aside / "checkpoints" / "latest").read_text() == "step-00000003\n" and (aside / "draft").is_dir()


@pytest.mark.unit
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_ask_for_a_clean_stop(sig):
    before = signal.getsignal(sig)
    with _StopOnSignal() as stop:
        os.kill(os.getpid(), sig)
        assert stop.event.wait(5) and stop.signum == sig  # no KeyboardInterrupt, no exit
    assert signal.getsignal(sig) is before


@pytest.mark.unit
def test_api_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-file\nignored\n")
    assert read_api_key(ServeSection(api_key_file=str(key))) == "sk-file"
    assert read_api_key(ServeSection(api_key="sk-env")) == "sk-env"
    with pytest.raises(ConfigError, match="both set"):
        read_api_key(ServeSection(api_key="a", api_key_file=str(key)))
    with pytest.raises(ConfigError, match="cannot read it"):
        read_api_key(ServeSection(api_key_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key(ServeSection(api_key_file=str(tmp_path / "empty")))
