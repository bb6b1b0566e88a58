"""Build the models a run needs from its ``model`` section: target (+ tokenizer) and the day-0 draft."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from aurora_rl.config import ModelSection
from aurora_rl.models.dtypes import resolve_dtype
from aurora_rl.models.draft import DraftConfig, Eagle3Draft, select_draft_vocab, token_frequencies
from aurora_rl.models.target import TargetModel

log = logging.getLogger(__name__)


def load_target_model(section: ModelSection, seed: int = 0) -> tuple[TargetModel, Any]:
    """The target model and its tokenizer (None for the tiny random model)."""
    dtype = resolve_dtype(section.dtype)
    log.info("target dtype: %s (model.dtype=%s)", str(dtype).removeprefix("torch."), section.dtype)
    if section.target == "tiny":
        from envs.models import tiny_target

        tiny = tiny_target(seed).to_dtype(dtype)
        if section.quant in ("q8_0", "q4_1"):
            from aurora_rl.models.loader import quantize_target

            quantize_target(tiny, section.quant)
        return tiny, None
    from transformers import AutoTokenizer

    from aurora_rl.models.loader import load_target

    if section.target == "smollm2":
        from aurora_rl.assets import ensure_smollm2, smollm2_gguf_path

        # The converted folder holds the tokenizer; quantized weights come from the shipped GGUF itself.
        tok_source: str | Path = ensure_smollm2()
        folder: str | Path = tok_source if section.quant == "none" else smollm2_gguf_path()
    else:
        folder = section.target
        tok_source = Path(folder).parent if str(folder).endswith(".gguf") else folder
    target = load_target(folder, dtype, quant=section.quant)
    log.info("target weights: model.quant=%s -> %s", section.quant, target.quant_summary())
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
    return target, tokenizer


def initial_draft(section: ModelSection, target: TargetModel, vocab_sample: list[list[int]],
                  seed: int = 0) -> Eagle3Draft:
    """Day 0 (``draft: random``) or an EAGLE3 folder; float32 (the learner's copy)."""
    if section.draft != "random":
        from aurora_rl.models.eagle3_io import load_eagle3

        return load_eagle3(section.draft, target_embedding=target.embed.weight.detach().float())
    size = min(section.draft_vocab_size, target.config.vocab_size)
    with torch.random.fork_rng(devices=[]):
        draft = Eagle3Draft(DraftConfig.for_target(target.config, size)).init_from_target(target, seed)
    counts = token_frequencies(vocab_sample, target.config.vocab_size)
    draft.set_vocab(select_draft_vocab(counts, size, always=tuple(target.config.eos_token_ids)))
    if section.draft_head_init == "target":
        # The body stays random; starting the head in the target's output space lets the draft learn
        # to imitate the target's final hidden state instead of a head from scratch.
        with torch.no_grad():
            draft.lm_head.weight.copy_(target.lm_head.weight[draft.draft_to_target].float())
    log.info("day-0 draft: vocab %d of %d, head init %s", size, target.config.vocab_size, section.draft_head_init)
    return draft
