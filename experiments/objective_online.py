"""Objective online from day 0: the default aurora loss against an ablation, seeds side by side.

Each arm and seed is the ordinary run ``aurora-rl experiment=day0 max_requests=N seed=S
engine.context_copy=false workload.max_tokens=M eval.max_tokens=M <arm overrides>`` (copies off,
so every proposal is the draft's), into ``<out>/<arm>_s<seed>/``. Reported per arm, mean and spread
over seeds: the held-out accept length of the draft alone at the end (the run's own evaluation), the
served accept length over the run's last requests, learner updates per second and stale drops.

    python experiments/objective_online.py --out experiments/results/objective_s9/online \\
        --arm default= --arm no_pg=algorithm.args.pg_coef=0.0 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_arm, say  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arm", action="append", required=False, default=None,
                    help="name=override,override (repeatable; 'default=' for no overrides)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-budget", type=float, default=900.0)
    ap.add_argument("--table", action="store_true")
    return ap.parse_args(argv)


def arms(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        out[name] = [o for o in rest.split(",") if o]
    return out


def table(out: Path) -> str:
    rows: dict[str, list[dict]] = {}
    for f in sorted(out.glob("*_s*/summary.json")):
        name = f.parent.name.rsplit("_s", 1)[0]
        rows.setdefault(name, []).append(json.loads(f.read_text()))
    lines = ["| arm | seeds | requests | held-out accept length (draft alone), mean ± sd | served accept length, "
             "last 16 requests | learner updates/s | stale steps dropped per update |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, runs in rows.items():
        held = [r["eval"]["accept_length"] for r in runs if "eval" in r]
        end = [r["end"]["accept_length"] for r in runs]
        ups = [r.get("learner_updates_per_s", float("nan")) for r in runs]
        drop = [r.get("dropped_stale_per_update", float("nan")) for r in runs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(f"| {name} | {len(runs)} | {min(r['requests_served'] for r in runs)} | "
                     f"{statistics.mean(held):.3f} ± {sd(held):.3f} | {statistics.mean(end):.3f} ± {sd(end):.3f} | "
                     f"{statistics.mean(ups):.3f} | {statistics.mean(drop):.1f} |")
    return "\n".join(lines) + "\n"


def learner_rates(run_dir: Path) -> dict:
    """Updates per second and stale drops per update, from the run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ev.Reload()
    tags = ev.Tags()["scalars"]
    upd = [s.value for s in ev.Scalars("learner/update_s")] if "learner/update_s" in tags else []
    drop = [s.value for s in ev.Scalars("learner/offpolicy/dropped_stale")] \
        if "learner/offpolicy/dropped_stale" in tags else []
    return {"learner_updates_per_s": len(upd) / sum(upd) if upd else float("nan"),
            "dropped_stale_per_update": statistics.mean(drop) if drop else float("nan")}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for seed in args.seeds:
            for name, overrides in arms(args.arm or ["default="]).items():
                run_dir = out / f"{name}_s{seed}"
                if (run_dir / "summary.json").is_file():
                    continue
                ov = ["experiment=day0", f"max_requests={args.requests}", f"seed={seed}", "engine.context_copy=false",
                      f"workload.max_tokens={args.max_tokens}", f"eval.max_tokens={args.max_tokens}",
                      f"time_budget_s={args.time_budget}", *overrides]
                summary = run_arm(run_dir.name, ov, out)
                summary.update(learner_rates(run_dir))
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
                say(f"{run_dir.name}: held-out accept length {summary.get('eval', {}).get('accept_length')}")
    print(table(out))


if __name__ == "__main__":
    main()
