"""Objective ablation, offline: held-out accept length of the draft alone after training each objective.

Every arm starts from the same day-0 draft and trains on the same recorded traces
(``record_objective_traces.py``: one greedy set, one sampled at T=0.8 top-p 0.95) with the same batch
order for a given seed, for ``--updates`` learner updates of ``--batch-traces`` traces. It is then
scored on the set's held-out traces by the accept length of the draft alone at lookahead ``--depth``
(no copies), teacher-forced along the target's stream: greedy set, 1 + the expected run of draft argmax
= target token (what greedy serving gets); sampled set, 1 + Σ_j Π_{l≤j} α_l with α the exact
acceptance probability at the served distribution (what sampled serving gets in expectation).
Learner updates per second are timed around ``Learner.update``.

Arms: ``full`` (the aurora loss, all terms), ``no_pg`` (the shipped default: NTP + RKL + expected
accept length), ``no_accept`` (without the expected accept length), ``ntp_only``, ``ntp_rkl`` (the
default without the expected accept length), ``no_rkl`` (the default without RKL), ``eagle3_kl``,
``osd``, and ``full_all_logs`` (``full`` with no logged step ever too stale: offline the logs are
never refreshed, so with the default ``max_lag`` the policy gradient sees them only in the first
updates). The table gives each arm's difference to ``full`` and to the default, paired by seed. Results append to ``<out>/runs.jsonl`` (one
line per set, arm and seed; finished ones are skipped, so the work can be done in chunks);
``--table`` prints the mean and spread over seeds.

    python experiments/objective_ablation.py --traces T --out O --set greedy --seeds 0 1 2
    python experiments/objective_ablation.py --out O --table
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record_objective_traces import day0  # noqa: E402

from algorithms.base import acceptance  # noqa: E402
from aurora_rl.training.batching import collate  # noqa: E402
from aurora_rl.training.learner import Learner, LearnerConfig  # noqa: E402
from aurora_rl.training.offline import batch_schedule  # noqa: E402
from aurora_rl.training.trace_io import load_traces  # noqa: E402
from aurora_rl.training.ttt import unroll  # noqa: E402

ARMS = {
    "full": ("aurora", {}),
    "no_pg": ("aurora", {"pg_coef": 0.0}),
    "no_accept": ("aurora", {"accept_coef": 0.0}),
    "ntp_only": ("aurora", {"rkl_coef": 0.0, "accept_coef": 0.0, "pg_coef": 0.0}),
    "ntp_rkl": ("aurora", {"accept_coef": 0.0, "pg_coef": 0.0}),
    "no_rkl": ("aurora", {"rkl_coef": 0.0, "pg_coef": 0.0}),
    "full_all_logs": ("aurora", {"max_lag": 10_000}),
    "eagle3_kl": ("eagle3_kl", {}),
    "osd": ("osd", {}),
}
DEFAULT = "no_pg"
"""The arm that is the shipped ``aurora`` default (``conf/algorithm/aurora.yaml``: PG off)."""
FULL = {"ntp_coef": 1.0, "rkl_coef": 1.0, "accept_coef": 1.0, "pg_coef": 0.5}
"""What ``full`` means, written out so a later change of the defaults does not change the arm."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--traces", help="folder written by record_objective_traces.py")
    ap.add_argument("--set", choices=("greedy", "sampled"))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--batch-traces", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--prompt-bases", type=int, default=32)
    ap.add_argument("--replay-ratio", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="print the table of runs.jsonl and exit")
    return ap.parse_args(argv)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def held_out_accept_length(draft, traces, head, depth: int) -> float:
    """1 + the expected accepted run at lookahead ``depth`` over rows with all depths (module doc)."""
    draft.eval()
    total, rows = 0.0, 0
    for i in range(0, len(traces), 4):
        batch = collate(traces[i:i + 4], draft, head, depth)
        lb = batch.loss_batch(unroll(draft, batch.ttt, depth), 0)
        greedy = lb.greedy.unsqueeze(1)
        hit = (lb.draft_logits.argmax(-1) == lb.target_tokens).float()  # greedy: exact, not relaxed
        alpha = torch.where(greedy, hit * lb.mask, acceptance(lb))
        full = lb.mask.all(-1) & lb.nucleus_known.all(-1)
        total += float(alpha.cumprod(-1).sum(-1)[full].sum())
        rows += int(full.sum())
    draft.train()
    return 1.0 + total / max(rows, 1)


def run_arm(arm: str, seed: int, args, head, draft0, train, held) -> dict:
    algorithm, overrides = ARMS[arm]
    algo_args = {**FULL, **overrides} if algorithm == "aurora" else {}
    cfg = LearnerConfig(lr=args.lr, depth=args.depth, prompt_bases=args.prompt_bases, replay_ratio=args.replay_ratio,
                        dtype=args.dtype)
    torch.manual_seed(seed)
    start = max(int(t.policy_version.max()) for t in train if t.policy_version.numel())
    learner = Learner(draft0, head, cfg, policy_version=start, algorithm=algorithm, algorithm_args=algo_args)
    spent, last = 0.0, {}
    for batch in batch_schedule(len(train), args.updates, args.batch_traces, seed):
        t0 = time.perf_counter()
        last = learner.update([train[j] for j in batch])
        spent += time.perf_counter() - t0
    return {"set": args.set, "arm": arm, "seed": seed, "updates": args.updates, "learner_s": round(spent, 2),
            "updates_per_s": args.updates / spent,
            "accept_length": held_out_accept_length(learner.draft, held, head, args.depth),
            "dropped_stale_last": last.get("offpolicy/dropped_stale", 0.0),
            "deterministic_steps_last": last.get("offpolicy/deterministic_steps", 0.0),
            "losses_last": {k: v for k, v in last.items() if k.startswith("losses/")}}


def table(out: Path) -> str:
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    base = [json.loads(line) for line in (out / "day0.jsonl").read_text().splitlines()] if (
        out / "day0.jsonl").is_file() else []
    lines = ["| set | arm | seeds | held-out accept length, mean ± sd | Δ vs full, mean ± sd (paired by seed) "
             f"| Δ vs {DEFAULT} (the default), paired | learner updates/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in ("greedy", "sampled"):
        b0 = [b["accept_length"] for b in base if b["set"] == s]
        if b0:
            lines.append(f"| {s} | day-0 draft (no training) | - | {b0[0]:.3f} | | |")
        ref = {name: {r["seed"]: r["accept_length"] for r in runs if r["set"] == s and r["arm"] == name}
               for name in ("full", DEFAULT)}
        for arm in ARMS:
            rs = [r for r in runs if r["set"] == s and r["arm"] == arm]
            if not rs:
                continue
            acc = [r["accept_length"] for r in rs]
            ups = [r["updates_per_s"] for r in rs]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            delta = []
            for name in ("full", DEFAULT):
                diff = [r["accept_length"] - ref[name][r["seed"]] for r in rs if r["seed"] in ref[name]]
                dsd = statistics.stdev(diff) if len(diff) > 1 else 0.0
                delta.append("" if arm == name or not diff else f"{statistics.mean(diff):+.3f} ± {dsd:.3f}")
            lines.append(f"| {s} | {arm} | {len(rs)} | {statistics.mean(acc):.3f} ± {sd:.3f} | {delta[0]} | "
                         f"{delta[1]} | {statistics.mean(ups):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(out))
        return
    if not (args.traces and args.set):
        raise SystemExit("--traces and --set are needed to run arms (or --table to print the table)")
    torch.set_num_threads(args.threads)
    import ray.rllib.algorithms.impala.torch.vtrace_torch_v2  # noqa: F401  (imported once, not inside a timed update)
    rec = argparse.Namespace(**json.loads((Path(args.traces) / "key.json").read_text()))
    _, head, draft0, _ = day0(rec)
    train = load_traces(Path(args.traces) / args.set / "train.safetensors")
    held = load_traces(Path(args.traces) / args.set / "held_out.safetensors")
    base_file = out / "day0.jsonl"
    done_base = base_file.is_file() and any(json.loads(x)["set"] == args.set for x in base_file.read_text().splitlines())
    if not done_base:
        with open(base_file, "a") as f:
            f.write(json.dumps({"set": args.set, "accept_length":
                                held_out_accept_length(draft0, held, head, args.depth)}) + "\n")
    runs_file = out / "runs.jsonl"
    done = {(r["set"], r["arm"], r["seed"]) for r in map(json.loads, runs_file.read_text().splitlines())} \
        if runs_file.is_file() else set()
    for seed in args.seeds:
        for arm in args.arms:
            if (args.set, arm, seed) in done:
                continue
            r = run_arm(arm, seed, args, head, draft0, train, held)
            with open(runs_file, "a") as f:
                f.write(json.dumps(r) + "\n")
            say(f"{args.set} {arm} seed {seed}: accept length {r['accept_length']:.3f}, "
                f"{r['updates_per_s']:.3f} updates/s")


if __name__ == "__main__":
    main()
