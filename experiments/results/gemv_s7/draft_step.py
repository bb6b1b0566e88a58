"""Session 7: one proposal step of the session-5 draft (batch 1, context 300), its layer in one native
call against the step-by-step path, same process; median of 101 calls, ms.

    .venv/bin/python experiments/results/gemv_s7/draft_step.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import median_ms  # noqa: E402

from aurora_rl.config import ModelSection
from aurora_rl.runtime.factory import initial_draft, load_target_model

torch.set_num_threads(2)
target, _ = load_target_model(ModelSection(dtype="auto"))
draft = initial_draft(ModelSection(dtype="auto", draft="experiments/results/day0_s5/aurora/draft"), target, [])
draft = draft.to_dtype(target.dtype).eval()
cache = draft.new_cache(1, 2048)
slots, pos, toks = torch.tensor([0]), torch.tensor([[300]]), torch.tensor([[5]])
hidden = torch.randn(1, 1, draft.config.hidden_size).to(target.dtype)



with torch.inference_mode():
    fused = median_ms(lambda: draft(toks, hidden, pos, cache, slots), 101)
    draft._fused_weights = lambda: None
    steps = median_ms(lambda: draft(toks, hidden, pos, cache, slots), 101)
print(f"draft step: one native call {fused:.2f} ms, step by step {steps:.2f} ms ({steps / fused:.2f}x)")
