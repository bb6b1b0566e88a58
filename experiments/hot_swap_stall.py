"""Engine-thread stall of a draft hot swap: inline copy (the old path) vs built in the background (DraftSwapper).

The SmolLM2-135M EAGLE3 draft shape (random weights: the cost does not depend on their values), bf16,
one serving slot. Per swap, paired in one run, alternating:
- inline: ``SpecDecoder.load_draft_state`` on the engine thread, then one draft step, which repacks
  the changed weights for the native kernels;
- background: ``validate_state`` + ``build_draft`` (off the engine thread, timed separately), then on the
  engine thread ``SpecDecoder.swap_draft`` and one draft step (the replaced draft is freed after).
The stall is the engine-thread time minus a steady draft step measured in the same run (so it carries
that step's jitter); the reference swap alone is timed too.

    python experiments/hot_swap_stall.py --swaps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aurora_rl.engine.hot_swap import build_draft, validate_state
from aurora_rl.engine.speculative import SpecDecoder
from aurora_rl.models.config import ModelConfig
from aurora_rl.models.draft import DraftConfig, Eagle3Draft


def smollm2_draft() -> Eagle3Draft:
    target = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_ids=(2,))
    return Eagle3Draft(DraftConfig.for_target(target, 32768)).to_dtype(torch.bfloat16).eval()


def step(decoder: SpecDecoder, pos: int) -> float:
    d = decoder.draft
    t0 = time.perf_counter()
    with torch.inference_mode():
        d(torch.tensor([[5]]), torch.randn(1, 1, d.config.hidden_size, dtype=d.dtype), torch.tensor([[pos]]),
          decoder.cache, torch.tensor([0]))
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--swaps", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(1)
    decoder = SpecDecoder(smollm2_draft(), 1, 4 * a.swaps + 16)
    pos = 0
    for _ in range(3):
        step(decoder, pos)
        pos += 1
    steady, inline, background, build, swap = [], [], [], [], []
    for i in range(a.swaps):
        state = {n: t.detach().float() + 1e-3 * (i + 1) for n, t in decoder.draft.named_parameters()}
        steady.append(step(decoder, pos))
        pos += 1
        if i % 2 == 0:
            t0 = time.perf_counter()
            decoder.load_draft_state(state, i + 1)
            ms = (time.perf_counter() - t0) * 1000 + step(decoder, pos)
            inline.append(ms - steady[-1])
        else:
            t0 = time.perf_counter()
            validate_state(state, decoder.draft)
            new = build_draft(state, decoder.draft)
            build.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            retired = decoder.swap_draft(new, i + 1)  # DraftSwapper frees it in its own thread
            swap.append((time.perf_counter() - t0) * 1000)
            ms = swap[-1] + step(decoder, pos)
            del retired
            background.append(ms - steady[-1])
        pos += 1
    med = statistics.median
    print(f"steady draft step {med(steady):.2f} ms (median of {len(steady)})")
    print(f"inline swap: engine-thread stall {med(inline):.2f} ms median, {max(inline):.2f} max (n={len(inline)})")
    print(f"background swap: engine-thread stall {med(background):.3f} ms median, {max(background):.3f} max "
          f"(n={len(background)}); the reference swap alone {med(swap):.3f} ms median, {max(swap):.3f} max; "
          f"build off the thread {med(build):.1f} ms median")


if __name__ == "__main__":
    main()
