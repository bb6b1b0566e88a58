"""What a speculative step at k = 0 costs over a plain decoding step, by part: the speculative path
alone, with trace capture for the learner, with the context-copy index, and with both (the serving
default when the controller settles at k = 0), and a tree decoder at budget 0 (where the adaptive tree
budget settles).

Every configuration is an engine of its own serving the same requests (ShareGPT code prompts, greedy,
``--steps`` tokens each, ``--batch`` at a time), and the engines are stepped in turn, one engine step
each, the order reversed every round: each step of a configuration is paired with the plain engine's
step at the same position of the same requests, a few milliseconds apart. The VM's speed moves by
~10% between minutes; paired this closely, the ratio resolves about 0.5%. Printed: the median step
time, tokens committed per step, the median of the paired per-step ratios of time per token against
plain (steps that speculate are paired with plain steps at the same index), and the ratio of time per
token over all steps (what throughput sees, rare dear steps included).

    python experiments/k0_step_cost.py [--batch-sizes 1,8] [--steps 200] [--prompts 3] [--draft DIR] [--out DIR]
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
from aurora_rl.bench_spec import Cell, load  # noqa: E402
from aurora_rl.engine import SamplingParams  # noqa: E402

CONFIGS = {  # name -> (lookahead for bench_spec.Cell, trace capture, tree settings)
    "plain": (None, False, None),
    "k=0": (0, False, None),
    "k=0 + capture": (0, True, None),
    "k=0 + copy index": ("0+copy", False, None),
    "k=0 + copy index + capture": ("0+copy", True, None),
    "tree decoder, budget 0 + copy index + capture": ("tree+copy", True, {"budget": 0}),
    "adaptive chain + copy + capture": ("adaptive+copy", True, None),
    "adaptive tree + copy + capture": ("adaptive-tree+copy", True, None),
}
"""The adaptive rows are the serving default's own steps, exploration and draft catch-ups included: with a
draft that does not pay they sit at k = 0 with rare dearer steps, which the median of paired steps
leaves out and the time per token over all steps counts."""


def paired_steps(cells: dict, prompts: list[list[int]], batch: int, steps: int) -> dict[str, list[tuple[float, int]]]:
    """Per configuration, (seconds, tokens committed) of each engine step after the prefill, the engines
    stepped in turn until every one has served the wave (one that speculates finishes in fewer steps)."""
    times: dict[str, list[tuple[float, int]]] = {n: [] for n in cells}
    committed = {n: [0] for n in cells}
    for n, c in cells.items():  # count what each step commits (the plain engine has no decoder to ask)
        def append_tokens(seq, tokens, _inner=c.engine.append_tokens, _count=committed[n]):
            _count[0] += len(tokens)
            _inner(seq, tokens)
        c.engine.append_tokens = append_tokens
    sp = SamplingParams(max_tokens=steps, ignore_eos=True)
    names = list(cells)
    for w in range(0, len(prompts) - batch + 1, batch):
        for c in cells.values():
            for p in prompts[w:w + batch]:
                c.engine.add_request(p, sp)
            c.engine.step()  # prefill of the wave's requests (the first decode step runs after it)
        i = 0
        while any(c.engine.has_work() for c in cells.values()):
            for n in (names if i % 2 == 0 else names[::-1]):
                if not cells[n].engine.has_work():
                    continue
                before = committed[n][0]
                t0 = time.perf_counter()
                cells[n].engine.step()
                times[n].append((time.perf_counter() - t0, committed[n][0] - before))
            i += 1
    return times


def per_token(xs: list[tuple[float, int]]) -> float:
    """Seconds per committed token over the steps."""
    return sum(t for t, _ in xs) / max(sum(k for _, k in xs), 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=3, help="waves of requests per batch size")
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"])
    ap.add_argument("--draft", default=None, help="draft for the adaptive rows (default: a random one)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    args = argparse.Namespace(dtype="auto", quant=a.quant, draft=a.draft, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=a.prompts * max(batches),
                              max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, tokenizer, draft, prompts, _ = load(args)
    result = {"draft": a.draft, "steps": a.steps, "waves": a.prompts, "quant": target.quant_summary(), "rows": []}
    lines = ["| batch | configuration | ms per step (median) | tokens per step | vs plain: median of paired steps, "
             "per token | time per token |", "|---:|---|---:|---:|---:|---:|"]
    for batch in batches:
        cells = {n: Cell(target, tokenizer, draft, batch, k, capture=cap, tree=tree)
                 for n, (k, cap, tree) in CONFIGS.items()}
        for c in cells.values():
            c.serve(prompts[:batch], 8, record=False)  # warm-up
        times = paired_steps(cells, prompts[: a.prompts * batch], batch, a.steps)
        base = times["plain"]
        for n, xs in times.items():
            paired = [(t / k) / (tb / kb) for (t, k), (tb, kb) in zip(xs, base) if k and kb]
            row = {"batch": batch, "config": n, "median_ms": 1e3 * statistics.median(t for t, _ in xs),
                   "tokens_per_step": sum(k for _, k in xs) / len(xs),
                   "paired_median": statistics.median(paired),
                   "per_token_ratio": per_token(xs) / per_token(base), "steps": len(xs)}
            result["rows"].append(row)
            lines.append(f"| {batch} | {n} | {row['median_ms']:.3f} | {row['tokens_per_step']:.2f} | "
                         f"{row['paired_median']:.4f} | {row['per_token_ratio']:.4f} |")
    table = "\n".join(lines)
    print(f"{a.prompts} waves x {a.steps} greedy tokens per batch size, engines stepped in turn; "
          "ratios are of time per committed token against plain")
    print(table)
    write_result(a.out, "k0_step_cost", result, table)
    return result


if __name__ == "__main__":
    main()
