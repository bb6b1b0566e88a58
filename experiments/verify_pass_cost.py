"""What a verify pass of T tokens costs against a one-token step, at batch 1 on the default target, and
what its attention and argmax cost against PyTorch's, all measured in the same run.

- The target's pass over a T-node token tree (chain-shaped: node i sees nodes 0..i) after a context of C
  tokens, T = 1, 2, 5, 9, 13: ms per pass (median) and the ratio to T = 1 at that context.
- One layer's attention of 13 queries over C keys (9 query heads, 3 KV heads, head dim 64, bf16): the
  native kernel against ``torch.nn.functional.scaled_dot_product_attention`` with the same mask, in ns
  per (query head, key).
- The argmax of a verify pass's logits [13, vocabulary] (bf16): ``cpu_kernels.argmax`` against torch's.

    python experiments/verify_pass_cost.py [--contexts 300,1000] [--repeats 30]
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

from aurora_rl.bench_spec import load  # noqa: E402
from aurora_rl.models import cpu_kernels  # noqa: E402
from aurora_rl.models.layers import TreeAttention  # noqa: E402


def median_s(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def chain_tree(ctx: int, T: int) -> tuple[torch.Tensor, TreeAttention]:
    pos = (ctx + torch.arange(T)).view(1, T)
    bits = torch.tensor([[(1 << (i + 1)) - 1 for i in range(T)]], dtype=torch.long)
    return pos, TreeAttention(pos.clone(), bits)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="300,1000")
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args(argv)
    contexts = [int(c) for c in a.contexts.split(",")]
    args = argparse.Namespace(dtype="auto", quant="auto", draft=None, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=1, max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, _, _, _, _ = load(args)
    print(f"target: {target.quant_summary()}, {target.dtype}")
    cache = target.new_cache(1, 2048)
    slot = torch.zeros(1, dtype=torch.long)
    print("\n| context | tokens in the pass | ms per pass (median) | vs one token |\n|---:|---:|---:|---:|")
    with torch.inference_mode():
        for ctx in contexts:
            cache.lengths[0] = 0
            target(torch.randint(0, 1000, (1, ctx)), torch.arange(ctx).view(1, ctx), cache, slot)
            base = None
            for T in (1, 2, 5, 9, 13):
                ids = torch.randint(0, 1000, (1, T))
                pos, tree = chain_tree(ctx, T)

                def run():
                    cache.lengths[0] = ctx
                    target(ids, pos, cache, slot, tree=tree)

                s = median_s(run, a.repeats)
                base = base or s
                print(f"| {ctx} | {T} | {1e3 * s:.2f} | {s / base:.2f}x |")

    nh, nkv, hd, T = 9, 3, 64, 13
    g = torch.Generator().manual_seed(0)
    print("\n| context | attention, ns per (query head, key): native | SDPA | SDPA / native |\n|---:|---:|---:|---:|")
    for ctx in contexts:
        kc, vc = (torch.randn(1, nkv, 2048, hd, generator=g).to(torch.bfloat16) for _ in range(2))
        q = torch.randn(1, T, nh, hd, generator=g).to(torch.bfloat16)
        pos, tree = chain_tree(ctx, T)
        n = ctx + T
        visible = torch.ones(T, n, dtype=torch.bool).tril(ctx)
        k, v = (c[:, :, :n].repeat_interleave(nh // nkv, 1) for c in (kc, vc))
        native = median_s(lambda: cpu_kernels.attention(q, kc, vc, slot, pos, hd ** -0.5,
                                                         tree_mask=tree.mask), a.repeats * 5)
        sdpa = median_s(lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=visible), a.repeats * 5)
        pairs = T * nh * n
        print(f"| {ctx} | {1e9 * native / pairs:.2f} | {1e9 * sdpa / pairs:.2f} | {sdpa / native:.1f}x |")

    logits = torch.randn(1, T, target.config.vocab_size, generator=g).to(torch.bfloat16)
    ours = median_s(lambda: cpu_kernels.argmax(logits), a.repeats * 5)
    theirs = median_s(lambda: logits.argmax(-1), a.repeats * 5)
    assert torch.equal(cpu_kernels.argmax(logits), logits.argmax(-1))
    print(f"\nargmax of [{T}, {logits.shape[-1]}] bf16: native {1e6 * ours:.0f} us, torch {1e6 * theirs:.0f} us "
          f"({theirs / ours:.1f}x)")


if __name__ == "__main__":
    main()
