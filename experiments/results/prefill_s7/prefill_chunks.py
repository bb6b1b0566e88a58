"""Session 7: prefill of one prompt in one pass against passes of 128 tokens (the native gemv's row
limit), SmolLM2 float32 with taps, 2 threads, same process; median of 5, ms.

    .venv/bin/python experiments/results/prefill_s7/prefill_chunks.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import median_ms  # noqa: E402

from aurora_rl.config import ModelSection
from aurora_rl.runtime.factory import load_target_model

torch.set_num_threads(2)
target, _ = load_target_model(ModelSection(dtype="auto"))
cache = target.new_cache(1, 2048)
slot = torch.tensor([0])


def prefill(n: int, chunk: int | None) -> None:
    ids = torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(n))
    step = chunk or n
    for s in range(0, n, step):
        e = min(n, s + step)
        target(ids[:, s:e], torch.arange(s, e).view(1, -1), cache, slot,
               logit_index=torch.tensor([e - s - 1]), with_taps=True)



print("prompt tokens: one pass / chunks of 128 / chunks of 64 (ms)")
for n in (128, 300, 600, 1000):
    one, c128, c64 = (median_ms(lambda c=c: prefill(n, c), 5) for c in (None, 128, 64))
    print(f"{n:5d}: {one:7.1f} / {c128:7.1f} ({one / c128:.2f}x) / {c64:7.1f} ({one / c64:.2f}x)", flush=True)
