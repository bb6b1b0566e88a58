"""Where a tree step's time goes at batch 1: the target's verify pass, the draft's expansion, the draft
feed, copies, and the rest (verification, trace recording, bookkeeping), in ms per verify step, beside a
plain engine's ms per step on the same prompts. Prefill is timed apart and left out of the steps.

Wraps the runner's and proposers' calls of a ``bench_spec`` cell with timers (one engine of each kind,
one warm-up request first). The prompts are ShareGPT code prompts the draft's run never served.

    python experiments/tree_step_profile.py --draft outputs/day0/<run>/draft [--quant none] [--budget 12]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aurora_rl.bench_spec import Cell, load  # noqa: E402


def timed(obj, name: str, key: str, totals: collections.Counter) -> None:
    """Replace ``obj.name`` by a wrapper that adds its wall time to ``totals[key]``."""
    inner = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        totals[key] += time.perf_counter() - t0
        return out

    setattr(obj, name, wrapper)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", required=True)
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"])
    ap.add_argument("--budget", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    args = argparse.Namespace(dtype="auto", quant=a.quant, draft=a.draft, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=a.prompts,
                              max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, tokenizer, draft, prompts, _ = load(args)
    totals: collections.Counter = collections.Counter()
    for label, lookahead in (("plain", None), ("tree + copy", "tree+copy")):
        cell = Cell(target, tokenizer, draft, 1, lookahead, tree={"topk": 4, "budget": a.budget, "depth": 5})
        cell.serve(prompts[:1], 8, record=False)
        totals.clear()
        timed(cell.engine.decoder, "prefill", "prefill", totals)
        timed(cell.engine.runner, "extend_tree", "target verify pass", totals)
        if cell.decoder is not None:
            timed(cell.decoder.tree_proposer, "propose", "draft expansion", totals)
            timed(cell.decoder.proposer, "extend", "draft feed", totals)
            timed(cell.decoder.proposer, "copies", "copies", totals)
        t0 = time.perf_counter()
        cell.serve(prompts, a.max_tokens)
        wall = time.perf_counter() - t0
        steps = sum(o.verify_steps for o in cell.outs) or sum(o.num_output_tokens for o in cell.outs)
        prefill = totals.pop("prefill", 0.0)
        step_ms = 1e3 * (wall - prefill) / steps
        parts = {k: round(1e3 * v / steps, 2) for k, v in totals.items()}
        rest = step_ms - sum(parts.values())
        accept = sum(o.accept_length for o in cell.outs) / len(cell.outs)
        print(f"{label}: {step_ms:.2f} ms per step over {steps} steps (prefill {prefill:.2f} s apart), "
              f"accept length {accept:.2f}; {parts}{f', rest {rest:.2f}' if parts else ''}")


if __name__ == "__main__":
    main()
