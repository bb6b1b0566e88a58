"""Session 7: the native float32 gemv against F.linear on SmolLM2's weight shapes, 2 threads, same
process; the weights are L3-resident here except the lm_head (113 MB). Median of 15 calls, ms.

    .venv/bin/python experiments/results/gemv_s7/gemv_rows.py
"""
import time

import torch
import torch.nn.functional as F

from aurora_rl.models import cpu_kernels


def med(f, n=15):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


torch.set_num_threads(2)
assert cpu_kernels.available()
print("rows: native / F.linear ms (ratio)")
for n, k in [(49152, 576), (3072, 576), (576, 1536), (960, 576)]:
    w = torch.randn(n, k)
    packed = cpu_kernels.pack(w)
    cells = []
    for m in [1, 2, 5, 6, 8, 20, 48, 128, 256]:
        x = torch.randn(m, k)
        a, b = med(lambda: cpu_kernels.matmul(x, packed, n)), med(lambda: F.linear(x, w))
        cells.append(f"{m}: {a:.2f}/{b:.2f} ({b / a:.1f}x)")
    print(f"{n} x {k}  " + "  ".join(cells), flush=True)
