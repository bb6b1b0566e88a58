"""Session 7: the native float32 gemv against F.linear on SmolLM2's weight shapes, 2 threads, same
process; the weights are L3-resident here except the lm_head (113 MB). Median of 15 calls, ms.

    .venv/bin/python experiments/results/gemv_s7/gemv_rows.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import median_ms  # noqa: E402
import torch.nn.functional as F

from aurora_rl.models import cpu_kernels



torch.set_num_threads(2)
assert cpu_kernels.available()
print("rows: native / F.linear ms (ratio)")
for n, k in [(49152, 576), (3072, 576), (576, 1536), (960, 576)]:
    w = torch.randn(n, k)
    packed = cpu_kernels.pack(w)
    cells = []
    for m in [1, 2, 5, 6, 8, 20, 48, 128, 256]:
        x = torch.randn(m, k)
        a, b = median_ms(lambda: cpu_kernels.matmul(x, packed, n)), median_ms(lambda: F.linear(x, w))
        cells.append(f"{m}: {a:.2f}/{b:.2f} ({b / a:.1f}x)")
    print(f"{n} x {k}  " + "  ".join(cells), flush=True)
