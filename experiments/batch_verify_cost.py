"""What extra proposal tokens cost in a verify pass at batch 1, 4, 8 and 16, on the default target.

Every row holds 300 tokens of context. Per batch size B, one target pass (``ModelRunner.extend``, taps on,
as a speculative step runs it) of: one token per row (plain decoding); one row with 4 more tokens (a
copy on one row); two rows with 4 more; every row with 1 more; every row with 4 more. The cases are
timed in turn, the order reversed every round, and each case's median is divided by the plain pass's.
Printed beside each ratio: the extra time per extra token, in plain tokens (the plain pass / B), which is
what a proposal token must be accepted against for speculation to pay. The adaptive controller's CPU
cost prior (``AdaptiveConfig.cpu_prior_slope``, ``cpu_max_prior_slope``) is set from these figures.

    python experiments/batch_verify_cost.py [--batch-sizes 1,4,8,16] [--repeats 25] [--out DIR]
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

from common import write_result  # noqa: E402
from aurora_rl.bench_spec import load  # noqa: E402
from aurora_rl.engine.runner import ModelRunner  # noqa: E402

CONTEXT = 300


def cases(batch: int) -> dict[str, list[int]]:
    """Case name -> extra tokens per row."""
    out = {"plain": [0] * batch, "one row +4": [4] + [0] * (batch - 1)}
    if batch >= 2:
        out["two rows +4"] = [4, 4] + [0] * (batch - 2)
    out["every row +1"] = [1] * batch
    out["every row +4"] = [4] * batch
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    args = argparse.Namespace(dtype="auto", quant=a.quant, draft=None, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=1, max_prompt_tokens=1024)
    target, _, _, _, _ = load(args)
    result = {"context": CONTEXT, "repeats": a.repeats, "quant": target.quant_summary(), "rows": []}
    lines = ["| batch | case | extra tokens | ms per pass | vs plain | extra time per extra token, in plain tokens |",
             "|---:|---|---:|---:|---:|---:|"]
    for batch in (int(b) for b in a.batch_sizes.split(",")):
        runner = ModelRunner(target, batch, 2048)
        for slot in range(batch):
            runner.extend([slot], [list(range(100, 100 + CONTEXT))], last_only=True)
        todo = cases(batch)
        times: dict[str, list[float]] = {n: [] for n in todo}
        for rep in range(a.repeats + 3):
            for name in (list(todo) if rep % 2 == 0 else list(todo)[::-1]):
                t0 = time.perf_counter()
                runner.extend(list(range(batch)), [[7] * (1 + e) for e in todo[name]], with_taps=True)
                seconds = time.perf_counter() - t0
                for slot in range(batch):
                    runner.truncate(slot, CONTEXT)
                if rep >= 3:  # the first rounds warm up
                    times[name].append(seconds)
        plain = statistics.median(times["plain"])
        for name, extra in todo.items():
            ratio = statistics.median(times[name]) / plain
            n = sum(extra)
            row = {"batch": batch, "case": name, "extra_tokens": n, "ms": 1e3 * statistics.median(times[name]),
                   "vs_plain": ratio, "per_extra_token": (ratio - 1) * batch / n if n else None}
            result["rows"].append(row)
            per = f"{row['per_extra_token']:.2f}" if n else "-"
            lines.append(f"| {batch} | {name} | {n} | {row['ms']:.2f} | {ratio:.2f}x | {per} |")
    table = "\n".join(lines)
    print(f"context {CONTEXT} tokens per row, {a.repeats} rounds, medians")
    print(table)
    write_result(a.out, "batch_verify_cost", result, table)
    return result


if __name__ == "__main__":
    main()
