"""Target and draft models for the envs, built from a name so that env workers can make their own.

``build_models("tiny", seed)`` makes a tiny random Llama target (vocab 128, 6 layers, hidden 64) and a
random day-0 EAGLE3 draft deterministically from ``seed`` without touching the global torch RNG: RLlib
builds envs inside its workers, so weights cannot be passed in. ``build_models("smollm2", seed)``
loads the embedded SmolLM2-135M-Instruct target (float32 on CPU) with its tokenizer and a random draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aurora_rl.models.config import ModelConfig
from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.models.target import TargetModel

MODEL_NAMES = ("tiny", "smollm2")
TINY_INIT_STD = 0.1
TINY_CONFIG = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                          bos_token_id=0, eos_token_ids=(1,))


@dataclass
class ServingModels:
    target: TargetModel
    draft: Eagle3Draft
    tokenizer: Any = None
    """None for the tiny model (token-id prompts only)."""


def tiny_target(seed: int = 0) -> TargetModel:
    """A tiny random Llama target, 2-D weights ~ N(0, 0.1).

    transformers' N(0, 0.02) makes a tiny random model repeat one token forever; 0.1 gives greedy
    outputs that vary yet repeat now and then, closer to what a draft meets on real traffic.
    """
    g = torch.Generator().manual_seed(seed)
    # Module construction draws default inits from the global RNG; keep the caller's stream untouched.
    with torch.random.fork_rng(devices=[]):
        model = TargetModel(TINY_CONFIG.replace())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * TINY_INIT_STD)
    return model.eval()


def random_draft(target: TargetModel, seed: int = 0, draft_vocab_size: int | None = None) -> Eagle3Draft:
    """A day-0 draft: random weights, the target's embedding, a random draft vocabulary of the given size."""
    cfg = DraftConfig.for_target(target.config, draft_vocab_size=draft_vocab_size)
    draft = Eagle3Draft(cfg).init_from_target(target, seed)
    if cfg.draft_vocab_size < cfg.vocab_size:
        perm = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(seed))
        draft.set_vocab(perm[: cfg.draft_vocab_size])
    return draft.to_dtype(target.dtype).eval()


def build_models(name: str, seed: int = 0, draft_vocab_size: int | None = None) -> ServingModels:
    """Target, random draft and tokenizer for ``name`` in ``MODEL_NAMES``."""
    if name == "tiny":
        target = tiny_target(seed)
        return ServingModels(target, random_draft(target, seed, draft_vocab_size))
    if name == "smollm2":
        from transformers import AutoTokenizer

        from aurora_rl.assets import ensure_smollm2
        from aurora_rl.models.loader import load_target

        folder = ensure_smollm2()
        target = load_target(folder, torch.float32)
        return ServingModels(target, random_draft(target, seed, draft_vocab_size),
                             AutoTokenizer.from_pretrained(str(folder)))
    raise ValueError(f"model={name!r}; choose one of {MODEL_NAMES}")
