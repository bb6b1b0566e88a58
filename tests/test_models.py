"""Target model: parity with transformers (tiny models of each family, and SmolLM2-135M), taps, loaders."""

from __future__ import annotations

import json

import pytest
import torch

from aurora_rl.models.config import ModelConfig, UnsupportedModelError
from aurora_rl.models.loader import WeightLoadError, build_target, load_target
from tests.conftest import tiny_hf, tiny_target

FAMILIES = ["llama", "llama3", "qwen2", "qwen3"]


@pytest.mark.parity
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_parity_full_and_incremental(family):
    ours, hf = tiny_target(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    pos = torch.arange(24).expand(2, 24)
    out = ours(ids, pos, ours.new_cache(3, 64), torch.tensor([0, 2]))
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-4)
    taps = torch.cat([ref.hidden_states[i + 1] for i in ours.config.tap_layers], -1)
    torch.testing.assert_close(out.taps, taps, atol=2e-5, rtol=1e-4)
    # Same tokens fed in three chunks through the cache give the same logits (the decode path).
    cache = ours.new_cache(2, 64)
    chunks = [(0, 10), (10, 11), (11, 24)]
    got = [ours(ids[:, a:b], pos[:, a:b], cache, torch.tensor([0, 1])).logits for a, b in chunks]
    torch.testing.assert_close(torch.cat(got, 1), ref.logits, atol=2e-5, rtol=1e-4)


@pytest.mark.unit
def test_rows_with_different_lengths_match_single_rows():
    ours, _ = tiny_target("llama")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (1, 9), generator=g), torch.randint(0, 128, (1, 5), generator=g)
    cache = ours.new_cache(2, 32)
    ours(a[:, :6], torch.arange(6)[None], cache, torch.tensor([0]))
    ours(b[:, :2], torch.arange(2)[None], cache, torch.tensor([1]))
    # Row 0 continues at position 6, row 1 at position 2, three tokens each, in one batch.
    ids = torch.cat([a[:, 6:9], b[:, 2:5]])
    pos = torch.stack([torch.arange(6, 9), torch.arange(2, 5)])
    batched = ours(ids, pos, cache, torch.tensor([0, 1])).logits
    ref_a = ours(a, torch.arange(9)[None], ours.new_cache(1, 32), torch.tensor([0])).logits[:, 6:]
    ref_b = ours(b, torch.arange(5)[None], ours.new_cache(1, 32), torch.tensor([0])).logits[:, 2:]
    torch.testing.assert_close(batched, torch.cat([ref_a, ref_b]), atol=1e-5, rtol=1e-4)


@pytest.mark.unit
def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


@pytest.mark.unit
def test_bad_rope_type_is_refused():
    hf = tiny_hf("llama").config.to_dict()
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf(hf)


@pytest.mark.unit
def test_loader_names_missing_and_misshapen_tensors(tmp_path):
    hf = tiny_hf("qwen2")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    del state["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(WeightLoadError, match="model.layers.3.mlp.up_proj.weight"):
        build_target(cfg, state, torch.float32)
    state = dict(hf.state_dict())
    state["model.norm.weight"] = torch.ones(65)
    with pytest.raises(WeightLoadError, match="norm.weight"):
        build_target(cfg, state, torch.float32)


@pytest.mark.unit
def test_load_hf_folder_round_trip(tmp_path):
    hf = tiny_hf("qwen3")
    hf.save_pretrained(tmp_path)  # safetensors by default
    ours = load_target(tmp_path, torch.float32)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        ref = hf(ids).logits
    out = ours(ids, torch.arange(7)[None], ours.new_cache(1, 16), torch.tensor([0])).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


@pytest.mark.unit
def test_missing_folder_and_pickled_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf("llama").config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_target(tmp_path)


@pytest.mark.parity
def test_smollm2_parity_fp32_and_bf16(smollm2_dir, smollm2_fp32, smollm2_tokenizer):
    """SmolLM2-135M: fp32 logits match transformers to 1e-3. In bf16 our error against the fp32
    reference is no worse than 1.25x transformers' own bf16 error, and the argmax agrees on >= 95%."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    ids = torch.tensor([smollm2_tokenizer.encode(text)])
    T = ids.shape[1]
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    out = smollm2_fp32(ids, torch.arange(T)[None], smollm2_fp32.new_cache(1, 128), torch.tensor([0]))
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-3, rtol=1e-3)
    taps = torch.cat([ref.hidden_states[i + 1] for i in smollm2_fp32.config.tap_layers], -1)
    torch.testing.assert_close(out.taps, taps, atol=1e-3, rtol=1e-3)
    assert smollm2_fp32.config.tap_layers == (1, 14, 26)
    bf16 = load_target(smollm2_dir, torch.bfloat16)
    out16 = bf16(ids, torch.arange(T)[None], bf16.new_cache(1, 128), torch.tensor([0]))
    agree = (out16.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    assert agree >= 0.95, f"bf16 argmax agreement {agree:.3f}"
    hf16 = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref16 = hf16(ids).logits.float()
    ours_err = (out16.logits.float() - ref.logits).abs().mean().item()
    hf_err = (ref16 - ref.logits).abs().mean().item()
    assert ours_err <= 1.25 * hf_err, f"bf16 mean |error|: ours {ours_err:.4f} vs transformers {hf_err:.4f}"


@pytest.mark.unit
def test_native_kernels_build_where_there_is_a_compiler():
    """The kernel tests skip where the kernels are not built: that must mean no compiler (or not x86-64
    Linux), never a source that fails to compile."""
    import os
    import platform
    import shutil

    from aurora_rl.models import cpu_kernels

    if os.environ.get("AURORA_RL_NATIVE_KERNELS") == "0":
        pytest.skip("AURORA_RL_NATIVE_KERNELS=0 turns the kernels off on purpose")
    if shutil.which(os.environ.get("CC", "cc")) and platform.machine() == "x86_64" and platform.system() == "Linux":
        assert cpu_kernels.built(), "a C compiler is here but the native kernels did not build (see the log)"
