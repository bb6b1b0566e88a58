"""What the speculative path's target pass costs against the plain engine's: one-token steps at batch 1
on the default target (300 tokens of context), with and without taps and with last-position or all
logits, median over 60 rounds of 5 steps, the modes interleaved within each round.

    python experiments/target_pass_with_taps.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aurora_rl.config import ModelSection  # noqa: E402
from aurora_rl.engine.runner import ModelRunner  # noqa: E402
from aurora_rl.runtime.factory import load_target_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    target, _ = load_target_model(ModelSection(dtype="auto", quant="auto", draft="random"))
    runner = ModelRunner(target, 1, 2048, False)
    runner.extend([0], [list(range(100, 400))], last_only=True)
    modes = {"plain engine (last logits, no taps)": dict(last_only=True, with_taps=False),
             "speculative path (all logits, taps)": dict(with_taps=True),
             "last logits, taps": dict(last_only=True, with_taps=True),
             "all logits, no taps": dict(with_taps=False)}
    ms: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(60):
        for name, kw in modes.items():
            n = int(runner.lengths[0])
            t0 = time.perf_counter()
            for _ in range(5):
                runner.extend([0], [[123]], **kw)
            ms[name].append((time.perf_counter() - t0) / 5 * 1e3)
            runner.truncate(0, n)
    for name, xs in ms.items():
        print(f"{name}: median {statistics.median(xs):.3f} ms per step")


if __name__ == "__main__":
    main()
