"""A target pass of T tokens per row (a long verify chain, a short prefill) on the native path (fused
layer, native attention) against the step-by-step path (per-layer PyTorch with SDPA), paired in one run
on the default target at batch 1, and whether each path's pass equals T one-token decode steps bit
for bit (what keeps speculation exact on the quantized target).

    python experiments/chain_pass_native_vs_stepwise.py [--contexts 0,300,1000] [--tokens 6,9,13,16,32,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aurora_rl.models.target as target_module  # noqa: E402
from aurora_rl.bench_spec import load  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="0,300,1000")
    ap.add_argument("--tokens", default="6,9,13,16,32,64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"])
    a = ap.parse_args(argv)
    args = argparse.Namespace(dtype="auto", quant=a.quant, draft=None, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=1, max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, _, _, _, _ = load(args)
    native_limit = target_module.NATIVE_ATTENTION_MAX_TOKENS
    paths = {"native": native_limit, "step-by-step": 0}  # the limit forward reads: 0 sends every pass step by step
    cache, slot, g = target.new_cache(1, 2048), torch.tensor([0]), torch.Generator().manual_seed(0)
    print(f"native path up to {native_limit} tokens per row; batch 1; median of {a.repeats} paired repeats")
    print("| context | tokens | native ms | step-by-step ms | native speedup | native = decode steps | "
          "step-by-step = decode steps |\n|---:|---:|---:|---:|---:|---|---|")
    try:
        with torch.inference_mode():
            for ctx in (int(c) for c in a.contexts.split(",")):
                cache.lengths[0] = 0
                if ctx:
                    target(torch.randint(0, 1000, (1, ctx), generator=g), torch.arange(ctx)[None], cache, slot)
                for T in (int(t) for t in a.tokens.split(",")):
                    if T > native_limit:
                        continue
                    ids, pos = torch.randint(0, 1000, (1, T), generator=g), (ctx + torch.arange(T))[None]
                    target_module.NATIVE_ATTENTION_MAX_TOKENS = native_limit
                    steps = []
                    for t in range(T):  # the reference: one-token decode steps
                        cache.lengths[0] = ctx + t
                        steps.append(target(ids[:, t:t + 1], pos[:, t:t + 1], cache, slot).logits[0, 0])
                    steps = torch.stack(steps)
                    times, same = {p: [] for p in paths}, {}
                    for r in range(a.repeats):
                        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                            target_module.NATIVE_ATTENTION_MAX_TOKENS = paths[name]
                            cache.lengths[0] = ctx
                            t0 = time.perf_counter()
                            out = target(ids, pos, cache, slot)
                            times[name].append(time.perf_counter() - t0)
                            same[name] = torch.equal(out.logits[0], steps)
                    n, s = (1e3 * statistics.median(times[p]) for p in paths)
                    print(f"| {ctx} | {T} | {n:.2f} | {s:.2f} | {s / n:.2f}x | {same['native']} | {same['step-by-step']} |",
                          flush=True)
    finally:
        target_module.NATIVE_ATTENTION_MAX_TOKENS = native_limit


if __name__ == "__main__":
    main()
