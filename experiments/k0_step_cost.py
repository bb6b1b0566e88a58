"""What a speculative step at k = 0 costs over a plain decoding step, by part: the speculative path
alone, with trace capture for the learner, with the context-copy index, and with both (the serving
default when the controller settles at k = 0). ms per generated token at batch 1 (``--batch``), the
configurations interleaved round by round on the same prompts (ShareGPT code), decoding only (each
request's rate after its first token), each round's ratio against the plain engine of that round;
the median over rounds is printed.

    python experiments/k0_step_cost.py [--rounds 5] [--prompts 4] [--max-tokens 64] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aurora_rl.bench_spec import Cell, load  # noqa: E402
from aurora_rl.engine import SamplingParams  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"])
    a = ap.parse_args(argv)
    args = argparse.Namespace(dtype="auto", quant=a.quant, draft=None, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=a.prompts,
                              max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, tokenizer, draft, prompts, _ = load(args)
    cells = {"plain": Cell(target, tokenizer, draft, a.batch, None),
             "k=0": Cell(target, tokenizer, draft, a.batch, 0, capture=False),
             "k=0 + capture": Cell(target, tokenizer, draft, a.batch, 0, capture=True),
             "k=0 + copy index": Cell(target, tokenizer, draft, a.batch, "0+copy", capture=False),
             "k=0 + copy index + capture": Cell(target, tokenizer, draft, a.batch, "0+copy", capture=True)}
    for c in cells.values():
        c.serve(prompts[:1], 8, record=False)
    ms: dict[str, list[float]] = {k: [] for k in cells}
    sp = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    for r in range(a.rounds):
        order = list(cells) if r % 2 == 0 else list(cells)[::-1]
        for name in order:
            outs = cells[name].engine.generate(prompts, sp)
            # the decoding rate after each request's first token (prefill left out), mean over requests
            ms[name].append(1e3 * statistics.mean(1 / o.decode_tokens_per_s for o in outs))
    print(f"batch {a.batch}, {len(prompts)} prompts x {a.max_tokens} tokens, {a.rounds} rounds (decode only)")
    print("| configuration | decode ms per token (median) | vs plain, median of rounds | per-round ratios |")
    print("|---|---:|---:|---|")
    for name, xs in ms.items():
        ratios = [x / p for x, p in zip(xs, ms["plain"])]
        print(f"| {name} | {statistics.median(xs):.2f} | {statistics.median(ratios):.3f} | "
              f"{' '.join(f'{x:.3f}' for x in ratios)} |")


if __name__ == "__main__":
    main()
