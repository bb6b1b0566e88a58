"""day0: accept length and tokens/s vs requests served, from a random draft, per learning rule.

Arms (same traffic order, same seed, same number of requests): ``aurora``, ``eagle3_kl``, ``osd``
(each learning online while serving at the experiment's lookahead) and ``no_spec`` (plain decoding,
the baseline). Each arm is the run ``aurora-rl experiment=day0 algorithm=<arm> max_requests=N``.
Speedup is paired: request i of an arm against request i of ``no_spec`` (the same prompt).

    python experiments/day0.py                      # full: SmolLM2-135M, ShareGPT code, 96 requests per arm
    python experiments/day0.py --short              # minutes: tiny random model (CI smoke test)

Writes ``<out>/results.json`` (figures and curves), ``<out>/results.md`` (the table), ``<out>/day0.png``
and one run directory per arm (TensorBoard events, summary.json, requests.jsonl, the EAGLE3 draft).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, fmt, load_requests, machine, mean, pyplot, rolling, run_arm, save_figure, say,
                    write_json)  # noqa: E402

ARMS = {
    "aurora": ["algorithm=aurora"],
    "eagle3_kl": ["algorithm=eagle3_kl"],
    "osd": ["algorithm=osd"],
    "no_spec": ["algorithm=frozen", "engine.lookahead=0", "eval.enabled=false"],
}
WINDOW = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="tiny random model, a few requests (CI smoke test)")
    p.add_argument("--requests", type=int, default=None, help="requests per arm (full 96, short 6)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per arm at most (full 1200, short 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {list(ARMS)}")
    p.add_argument("--out", default=None, help="default experiments/results/day0[_short]")
    p.add_argument("--reuse", action="store_true", help="keep arms that already finished in --out")
    p.add_argument("overrides", nargs="*", help="extra aurora-rl overrides for every arm, e.g. engine.lookahead=5")
    args = p.parse_args(argv)
    args.requests = args.requests or (6 if args.short else 96)
    args.time_budget = args.time_budget or (120.0 if args.short else 1200.0)
    args.out = Path(args.out or ROOT / "experiments" / "results" / ("day0_short" if args.short else "day0"))
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return args


def base_overrides(args) -> list[str]:
    base = ["experiment=smoke", "workload.max_tokens=8"] if args.short else ["experiment=day0"]
    return [*base, f"max_requests={args.requests}", f"time_budget_s={args.time_budget}", f"seed={args.seed}",
            "progress=false", *args.overrides]


def analyse(out: Path, arms: list[str], summaries: dict[str, dict]) -> dict:
    loaded = {a: load_requests(out / a) for a in arms}
    finish_order = {a: rs for a, (rs, _) in loaded.items()}
    base = {r["index"]: r["tokens_per_s"] for r in finish_order.get("no_spec", [])}
    result = {"arms": {}, "window": WINDOW}
    for a in arms:
        served = finish_order[a]
        acc = [r["accept_length"] for r in served]
        tps = [r["tokens_per_s"] for r in served]
        paired = [r["tokens_per_s"] / base[r["index"]] if r["index"] in base else None for r in served]
        s = summaries[a]
        ev = s.get("eval") or {}
        result["arms"][a] = {
            "requests": len(served), "not_finished": loaded[a][1], "learner_steps": s["learner_steps"],
            "final_policy_version": s["final_policy_version"],
            "accept_length_first": mean(acc[:WINDOW]), "accept_length_last": mean(acc[-WINDOW:]),
            "tokens_per_s_first": mean(tps[:WINDOW]), "tokens_per_s_last": mean(tps[-WINDOW:]),
            "paired_speedup_first": mean(paired[:WINDOW]) if base else None,
            "paired_speedup_last": mean(paired[-WINDOW:]) if base else None,
            "eval": ev, "counters": s["counters"],
            "curve": {"accept_length": rolling(acc, WINDOW), "tokens_per_s": rolling(tps, WINDOW),
                      "paired_speedup": rolling([p if p is not None else float("nan") for p in paired], WINDOW)
                      if base else None,
                      "policy_version": [r["policy_version"] for r in served]},
        }
    return result


def markdown(result: dict, args) -> str:
    rows = ["| arm | requests | draft versions | accept length (first → last 16) | tokens/s per request "
            "(first → last 16) | speedup vs no_spec, paired (first → last 16) | held-out accept length | "
            "held-out speedup |", "|---|---:|---:|---|---|---|---:|---:|"]
    for a, r in result["arms"].items():
        ev = r["eval"] or {}
        sp = (f"{fmt(r['paired_speedup_first'])}x → {fmt(r['paired_speedup_last'])}x"
              if r["paired_speedup_first"] is not None else "n/a")
        rows.append(f"| {a} | {r['requests']} | {r['final_policy_version']} | {fmt(r['accept_length_first'])} → "
                    f"{fmt(r['accept_length_last'])} | {fmt(r['tokens_per_s_first'], 1)} → "
                    f"{fmt(r['tokens_per_s_last'], 1)} | {sp} | {fmt(ev.get('accept_length', float('nan')))} | "
                    f"{fmt(ev.get('speedup', float('nan')))}{'x' if ev.get('speedup') else ''} |")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for a, r in result["arms"].items():
        n = list(range(1, r["requests"] + 1))
        axes[0].plot(n, r["curve"]["accept_length"], label=a)
        axes[1].plot(n, r["curve"]["tokens_per_s"], label=a)
        if r["curve"]["paired_speedup"] is not None:
            axes[2].plot(n, r["curve"]["paired_speedup"], label=a)
    labels = ("accept length (moving mean)", "tokens/s per request (moving mean)", "speedup vs no_spec, same prompt")
    for ax, label in zip(axes, labels):
        ax.set_xlabel("requests served")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"day 0: learning online from a random draft (window {result['window']})")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = {a: run_arm(a, [*base_overrides(args), *ARMS[a]], args.out, args.reuse) for a in args.arms}
    result = analyse(args.out, args.arms, summaries)
    result.update({"mode": "short" if args.short else "full", "requests_per_arm": args.requests,
                   "overrides": base_overrides(args), "arms_overrides": {a: ARMS[a] for a in args.arms},
                   "machine": machine()})
    write_json(args.out / "results.json", result)
    table = markdown(result, args)
    (args.out / "results.md").write_text(table + "\n")
    plot(result, args.out / "day0.png")
    say(f"results in {args.out}\n{table}")
    return result


if __name__ == "__main__":
    main()
