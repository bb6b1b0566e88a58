"""Native float32 attention over the slot cache against PyTorch's grouped SDPA (the fallback path), same
inputs, same process; then whole target forwards with taps at batch 1 and 4 for several context lengths.
    .venv/bin/python experiments/results/attention_s6/attention_microbench.py
"""
import time

import torch

from aurora_rl.assets import ensure_smollm2
from aurora_rl.models import cpu_kernels
from aurora_rl.models.layers import attend_grouped, causal_mask, group_mask
from aurora_rl.models.loader import load_target

torch.set_num_threads(2)


def med(f, n=31):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


with torch.inference_mode():
    print("attention, one layer of SmolLM2 (9 heads, 3 KV heads, hd 64), ms")
    for L in (300, 1000):
        kc, vc = torch.randn(4, 3, 1100, 64), torch.randn(4, 3, 1100, 64)
        for B, T in ((1, 1), (1, 5), (4, 1), (4, 2)):
            q = torch.randn(B, T, 9, 64)
            pos = torch.arange(L, L + T).expand(B, T).contiguous()
            slots = torch.arange(B)
            native = med(lambda: cpu_kernels.attention(q, kc, vc, slots, pos, 0.125, L + T))
            mask = group_mask(causal_mask(pos, L + T), 3)
            ref = med(lambda: attend_grouped(q, kc[:B, :, :L + T], vc[:B, :, :L + T], mask))
            print(f"  context {L:4d} batch {B} x {T} tokens: native {native:.3f}  pytorch {ref:.3f}  ratio {ref / native:.2f}x")
    m = load_target(ensure_smollm2(), torch.float32)
    cache = m.new_cache(4, 1100)
    print("target forward with taps, ms (T tokens per row)")
    for L in (16, 300, 1000):
        ids = torch.randint(0, 40000, (4, L))
        m(ids, torch.arange(L).expand(4, L), cache, torch.arange(4), with_taps=False)
        row = []
        for B, T in ((1, 1), (1, 2), (1, 3), (1, 5), (4, 1), (4, 2)):
            p = torch.arange(L, L + T).expand(B, T)
            row.append(f"{B}x{T} {med(lambda: m(ids[:B, :T], p, cache, torch.arange(B)), 15):.1f}")
        print(f"  context {L:4d}: " + "  ".join(row))
