"""Shared fixtures: tiny random models of each family (built by transformers, loaded into ours) and
the embedded SmolLM2-135M target, loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and on a busy 2-core machine an OpenMP barrier can
# stall every small op by milliseconds; tests that want more threads set them themselves.
torch.set_num_threads(1)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, bos_token_id=0)


def tiny_hf(family: str, seed: int = 0):
    """A tiny random transformers model of ``family`` (llama, llama3, qwen2, qwen3)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(**TINY, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    if family == "llama3":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)
        return LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=rope)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32)).eval()
    raise KeyError(family)


def tiny_target(family: str = "llama", seed: int = 0, dtype=torch.float32):
    from aurora_rl.models.config import ModelConfig
    from aurora_rl.models.loader import build_target

    hf = tiny_hf(family, seed)
    return build_target(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict(), dtype), hf


@pytest.fixture(scope="session")
def smollm2_dir():
    from aurora_rl.assets import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    from aurora_rl.models.loader import load_target

    return load_target(smollm2_dir, torch.float32)
