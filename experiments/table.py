"""table: the Aurora model-card table for our engine with a trained draft.

Batch 1, 4, 8, 16 x {no speculation, a plain control, lookahead 3, 4, 5, adaptive}: mean / p50 / p5 /
p95 tokens/s per request, speedup over no speculation (median of paired per-wave ratios, measured in
the same run), accept length and the mean lookahead used. The draft is the one the day0 experiment trained online (``experiments/results/day0/aurora/draft``)
unless ``--draft`` names another EAGLE3 folder. This is ``python -m aurora_rl.bench_spec`` with the
experiment's defaults.

    python experiments/table.py --repeats 2     # full: 16 ShareGPT code prompts, 64 tokens each, twice
    python experiments/table.py --short         # minutes: batch 1 and 4, lookahead 4 and adaptive

Writes ``<out>/bench_spec.json``, ``<out>/bench_spec.png`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, say, write_json  # noqa: E402

DAY0_DRAFT = ROOT / "experiments" / "results" / "day0" / "aurora" / "draft"


def main(argv: list[str] | None = None) -> dict:
    from aurora_rl.bench_spec import main as bench, markdown_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="the benchmark's quick mode")
    p.add_argument("--draft", default=None,
                   help=f"EAGLE3 draft folder, or 'random' for a day-0 draft (default {DAY0_DRAFT} if it exists)")
    p.add_argument("--out", default=None, help="default experiments/results/table[_short]")
    p.add_argument("--threads", type=int, default=2)
    args, rest = p.parse_known_args(argv)
    draft = args.draft or (str(DAY0_DRAFT) if DAY0_DRAFT.is_dir() else None)
    draft = None if draft == "random" else draft
    out = Path(args.out or ROOT / "experiments" / "results" / ("table_short" if args.short else "table"))
    if draft is None and args.draft != "random":
        say("no trained draft found (run experiments/day0.py first): the table uses a day-0 random draft")
    argv2 = [*(["--quick"] if args.short else []), "--threads", str(args.threads), "--out", str(out),
             *(["--draft", draft] if draft else []), *rest]
    result = bench(argv2)
    result["machine"] = machine()
    write_json(out / "bench_spec.json", result)
    (out / "results.md").write_text(markdown_table(result["table"]) + "\n")
    return result


if __name__ == "__main__":
    main()
