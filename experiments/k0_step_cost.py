"""What a speculative step at k = 0 costs over a plain decoding step, by part: the speculative path
alone, with trace capture for the learner, with the context-copy index, and with both (the serving
default when the controller settles at k = 0), and a tree decoder at budget 0 (where the adaptive tree
budget settles).

Every configuration is an engine of its own serving the same requests (ShareGPT code prompts, greedy,
``--steps`` tokens each, ``--batch`` at a time), and the engines are stepped in turn, one engine step
each, the order reversed every round: each step of a configuration is paired with the plain engine's
step at the same position of the same requests, a few milliseconds apart. The VM's speed moves by
~10% between minutes; paired this closely, the ratio resolves about 0.5%. Printed: the median step
time, the median of the paired per-step ratios against plain, and the ratio of mean step times.

    python experiments/k0_step_cost.py [--batch-sizes 1,8] [--steps 200] [--prompts 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aurora_rl.bench_spec import Cell, load  # noqa: E402
from aurora_rl.engine import SamplingParams  # noqa: E402

CONFIGS = {  # name -> (lookahead for bench_spec.Cell, trace capture, tree settings)
    "plain": (None, False, None),
    "k=0": (0, False, None),
    "k=0 + capture": (0, True, None),
    "k=0 + copy index": ("0+copy", False, None),
    "k=0 + copy index + capture": ("0+copy", True, None),
    "tree decoder, budget 0 + copy index + capture": ("tree+copy", True, {"budget": 0}),
}


def paired_steps(cells: dict, prompts: list[list[int]], batch: int, steps: int) -> dict[str, list[float]]:
    """Seconds per engine step, per configuration, the engines stepped in turn (prefills left out)."""
    times: dict[str, list[float]] = {n: [] for n in cells}
    sp = SamplingParams(max_tokens=steps, ignore_eos=True)
    names = list(cells)
    for w in range(0, len(prompts) - batch + 1, batch):
        for c in cells.values():
            for p in prompts[w:w + batch]:
                c.engine.add_request(p, sp)
            c.engine.step()  # prefill of the wave's requests (the first decode step runs after it)
        for i in range(steps - 2):
            for n in (names if i % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                cells[n].engine.step()
                times[n].append(time.perf_counter() - t0)
        for c in cells.values():
            while c.engine.has_work():
                c.engine.step()
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=3, help="waves of requests per batch size")
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    args = argparse.Namespace(dtype="auto", quant=a.quant, draft=None, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=a.prompts * max(batches),
                              max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, tokenizer, draft, prompts, _ = load(args)
    result = {"steps": a.steps, "waves": a.prompts, "quant": target.quant_summary(), "rows": []}
    lines = ["| batch | configuration | ms per step (median) | vs plain: median of paired steps | ratio of means |",
             "|---:|---|---:|---:|---:|"]
    for batch in batches:
        cells = {n: Cell(target, tokenizer, draft, batch, k, capture=cap, tree=tree)
                 for n, (k, cap, tree) in CONFIGS.items()}
        for c in cells.values():
            c.serve(prompts[:batch], 8, record=False)  # warm-up
        times = paired_steps(cells, prompts[: a.prompts * batch], batch, a.steps)
        base = times["plain"]
        for n, xs in times.items():
            row = {"batch": batch, "config": n, "median_ms": 1e3 * statistics.median(xs),
                   "paired_median": statistics.median(x / b for x, b in zip(xs, base)),
                   "ratio_of_means": statistics.mean(xs) / statistics.mean(base), "steps": len(xs)}
            result["rows"].append(row)
            lines.append(f"| {batch} | {n} | {row['median_ms']:.3f} | {row['paired_median']:.4f} | "
                         f"{row['ratio_of_means']:.4f} |")
    table = "\n".join(lines)
    print(f"{a.prompts} waves x {a.steps} greedy tokens per batch size, engines stepped in turn")
    print(table)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "k0_step_cost.json").write_text(json.dumps(result, indent=1))
        (out / "k0_step_cost.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
