"""shift: the traffic changes domain twice (code -> chat -> non-English); online aurora vs a frozen draft.

Both arms start from the same draft trained on the first domain (default: the ``aurora`` arm of the
day0 experiment, trained online on code) and serve the same traffic in the same order. ``frozen``
keeps it; ``online`` goes on learning with aurora. Per phase: mean accept length; after each shift, the
recovery (requests served until the moving mean is back within 90% of the last pre-shift level; "not
recovered" when it never is) and the online/frozen ratio of accept length on the shifted phases.

    python experiments/shift.py                    # full: SmolLM2-135M, 32 code + 48 chat + 32 non-English
    python experiments/shift.py --short            # minutes: tiny random model, random-token "domains"

Writes ``<out>/results.json``, ``<out>/results.md``, ``<out>/shift.png`` and one run directory per arm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, fmt, load_requests, machine, mean, pyplot, rolling, run_arm, save_figure, say,
                    write_json)  # noqa: E402

ARMS = {"online": ["algorithm=aurora"], "frozen": ["algorithm=frozen"]}
WINDOW = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="tiny random model, a few requests (CI smoke test)")
    p.add_argument("--phases", default=None,
                   help="domain:requests,... (full code:32,chat:48,non_english:32; short code:4,chat:6,all:6 of random tokens)")
    p.add_argument("--start-draft", default=None,
                   help="EAGLE3 folder both arms start from (default: experiments/results/day0/aurora/draft, "
                        "else a random day-0 draft)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds per arm at most (full 1800, short 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default experiments/results/shift[_short]")
    p.add_argument("--reuse", action="store_true", help="keep arms that already finished in --out")
    p.add_argument("overrides", nargs="*", help="extra aurora-rl overrides for both arms")
    args = p.parse_args(argv)
    text = args.phases or ("code:4,chat:6,all:6" if args.short else "code:32,chat:48,non_english:32")
    try:
        args.phases = [(d.strip(), int(n)) for d, n in (item.split(":") for item in text.split(","))]
    except ValueError:
        p.error(f"--phases {text!r}: expected domain:requests,domain:requests,...")
    if len(args.phases) < 2:
        p.error("--phases needs at least two phases (one shift)")
    args.time_budget = args.time_budget or (120.0 if args.short else 1800.0)
    args.out = Path(args.out or ROOT / "experiments" / "results" / ("shift_short" if args.short else "shift"))
    if args.start_draft is None and not args.short:
        default = ROOT / "experiments" / "results" / "day0" / "aurora" / "draft"
        args.start_draft = str(default) if default.is_dir() else None
    return args


def base_overrides(args) -> list[str]:
    phases = ",".join(f"{{domain:{d},requests:{n}}}" for d, n in args.phases)
    total = sum(n for _, n in args.phases)
    base = ["experiment=smoke", "workload.max_tokens=8", "workload.held_out=1"] if args.short else ["experiment=shift"]
    draft = [f"model.draft={args.start_draft}"] if args.start_draft else []
    return [*base, f"workload.phases=[{phases}]", f"max_requests={total}", f"time_budget_s={args.time_budget}",
            f"seed={args.seed}", "progress=false", "eval.enabled=false", *draft, *args.overrides]


def recovery(acc: list[float], start: int, pre_level: float, window: int) -> int | None:
    """Requests after ``start`` until the moving mean (over requests since ``start``) reaches 90% of
    ``pre_level``; None when it never does."""
    for i in range(start, len(acc)):
        if mean(acc[max(start, i - window + 1): i + 1]) >= 0.9 * pre_level:
            return i - start + 1
    return None


def analyse(out: Path, args) -> dict:
    result: dict = {"phases": [{"domain": d, "requests": n} for d, n in args.phases], "window": WINDOW, "arms": {}}
    bounds, start = [], 0
    for _, n in args.phases:
        bounds.append((start, start + n))
        start += n
    for arm in ARMS:
        served, not_finished = load_requests(out / arm)
        served = sorted(served, key=lambda r: r["index"])
        acc = [r["accept_length"] for r in served]
        idx = [r["index"] for r in served]
        per_phase, recoveries = [], []
        for p, (lo, hi) in enumerate(bounds):
            in_phase = [a for a, i in zip(acc, idx) if lo <= i < hi]
            per_phase.append(mean(in_phase))
            if p > 0:
                pre = [a for a, i in zip(acc, idx) if bounds[p - 1][0] <= i < bounds[p - 1][1]][-WINDOW:]
                first = next((k for k, i in enumerate(idx) if i >= lo), len(acc))
                recoveries.append(recovery(acc[: first + len(in_phase)], first, mean(pre), WINDOW))
        result["arms"][arm] = {"requests": len(served), "not_finished": not_finished,
                               "accept_length_per_phase": per_phase,
                               "recovery_requests": recoveries,
                               "domains": [r["domain"] for r in served],
                               "curve": rolling(acc, WINDOW), "policy_version": [r["policy_version"] for r in served]}
    on, fr = result["arms"]["online"], result["arms"]["frozen"]
    shifted = range(1, len(args.phases))
    result["online_over_frozen_per_phase"] = [on["accept_length_per_phase"][p] / fr["accept_length_per_phase"][p]
                                              for p in range(len(args.phases))]
    result["online_over_frozen_shifted"] = (mean([on["accept_length_per_phase"][p] for p in shifted]) /
                                            mean([fr["accept_length_per_phase"][p] for p in shifted]))
    return result


def markdown(result: dict) -> str:
    names = [p["domain"] for p in result["phases"]]
    head = "| arm | " + " | ".join(f"accept length, {d} ({p['requests']} req)" for d, p in zip(names, result["phases"]))
    head += " | " + " | ".join(f"recovery after → {d} (requests)" for d in names[1:]) + " |"
    rows = [head, "|---|" + "---:|" * (2 * len(names) - 1)]
    for arm, r in result["arms"].items():
        rec = ["not recovered" if x is None else str(x) for x in r["recovery_requests"]]
        rows.append(f"| {arm} | " + " | ".join(fmt(x) for x in r["accept_length_per_phase"]) + " | " +
                    " | ".join(rec) + " |")
    ratio = " | ".join(fmt(x) for x in result["online_over_frozen_per_phase"])
    rows.append(f"| online / frozen | {ratio} |" + " |" * (len(names) - 1))
    rows.append("")
    rows.append(f"Online / frozen accept length on the shifted phases (mean of phase means): "
                f"**{fmt(result['online_over_frozen_shifted'])}x**")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for arm, r in result["arms"].items():
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=arm)
    start = 0
    for p in result["phases"]:
        if start:
            ax.axvline(start + 0.5, color="grey", ls="--", lw=0.8)
        ax.text(start + 1, ax.get_ylim()[1], p["domain"], va="top", fontsize=8)
        start += p["requests"]
    ax.set_xlabel("request (traffic order)")
    ax.set_ylabel(f"accept length (moving mean of {result['window']})")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("traffic shift: online aurora vs frozen draft")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for arm, extra in ARMS.items():
        run_arm(arm, [*base_overrides(args), *extra], args.out, args.reuse)
    result = analyse(args.out, args)
    result.update({"mode": "short" if args.short else "full", "start_draft": args.start_draft or "day-0 random",
                   "overrides": base_overrides(args), "machine": machine()})
    write_json(args.out / "results.json", result)
    table = markdown(result)
    (args.out / "results.md").write_text(table + "\n")
    plot(result, args.out / "shift.png")
    say(f"results in {args.out}\n{table}")
    return result


if __name__ == "__main__":
    main()
