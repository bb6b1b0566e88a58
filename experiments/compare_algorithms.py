"""Compare the draft learning rules (aurora, eagle3_kl, osd, frozen) on identical served traces.

Protocol (issue "The learner"):

1. Traffic: ShareGPT code prompts for SmolLM2-135M-Instruct (``--quick``: random token prompts for the
   tiny random target). The seeded prompt order is split once by ``build_traffic``: the first
   ``--held-out`` prompts are evaluation only, the rest are training traffic.
2. Phase A (behaviour draft): serve ``--behaviour-prompts`` prompts with the day-0 draft at lookahead
   ``--lookahead``, then train ``eagle3_kl`` offline on them for ``--behaviour-updates`` updates.
3. Phase B (the training data): serve the next ``--train-prompts`` prompts with that behaviour draft at
   the same lookahead. Its proposals get real acceptances and rejections, and every logged step
   carries the behaviour draft's policy version. These traces are the one data set all algorithms get.
4. Each algorithm starts from the SAME behaviour draft (the draft that made the logged proposals: at
   update 0 the importance ratios are exactly 1, as in the online setting where the learner continues
   from the draft that is serving) and runs the SAME ``--updates`` updates on the SAME seeded batch
   sequence (``train_offline``: the batches depend only on the data size, updates, batch size, seed).
5. Evaluation: each trained draft actually speculates (greedy, lookahead ``--lookahead``) on the
   held-out prompts; accept length = 1 + accepted draft tokens per verify step (pooled over all
   verify steps), per-depth acceptance = P(depth j accepted | depth j proposed). The untrained start
   draft (= what frozen must reproduce) and the day-0 draft are evaluated too, as references.

Collected traces and the behaviour draft are cached in ``--out`` (keyed by the settings that made
them), so a rerun only trains and evaluates.

    python -u experiments/compare_algorithms.py --out experiments/results/compare_algorithms
    python -u experiments/compare_algorithms.py --quick --out /tmp/cmp   # seconds, tiny random model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aurora_rl.config import ModelSection, WorkloadSection  # noqa: E402
from aurora_rl.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from aurora_rl.engine.sampling import SamplingParams  # noqa: E402
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder  # noqa: E402
from aurora_rl.models.draft import Eagle3Draft  # noqa: E402
from aurora_rl.runtime.factory import initial_draft, load_target_model  # noqa: E402
from aurora_rl.runtime.traffic import build_traffic, vocab_sample  # noqa: E402
from aurora_rl.training.learner import LearnerConfig  # noqa: E402
from aurora_rl.training.offline import train_offline  # noqa: E402
from aurora_rl.training.trace_io import load_traces, save_traces  # noqa: E402

ALGORITHMS = ("aurora", "eagle3_kl", "osd", "frozen")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- arguments ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, PNGs, caches)")
    p.add_argument("--quick", action="store_true",
                   help="tiny random target and random prompts: a seconds-long smoke run")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"comma-separated subset of {','.join(ALGORITHMS)} (all by default)")
    p.add_argument("--train-prompts", type=int, default=None, help="phase B prompts (the training data)")
    p.add_argument("--behaviour-prompts", type=int, default=None, help="phase A prompts (behaviour draft)")
    p.add_argument("--behaviour-updates", type=int, default=None, help="eagle3_kl updates for the behaviour draft")
    p.add_argument("--held-out", type=int, default=None, help="held-out evaluation prompts")
    p.add_argument("--updates", type=int, default=None, help="learner updates per algorithm")
    p.add_argument("--batch-traces", type=int, default=8, help="traces per update")
    p.add_argument("--max-tokens", type=int, default=None, help="completion tokens per request (train and eval)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts are skipped (counted)")
    p.add_argument("--lookahead", type=int, default=4, help="draft tokens per verify step (serving and eval)")
    p.add_argument("--depth", type=int, default=None, help="TTT depth of the learner (default: lookahead)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--replay-ratio", type=int, default=1)
    p.add_argument("--num-slots", type=int, default=8, help="engine batch size (serving and eval)")
    p.add_argument("--draft-vocab-size", type=int, default=None)
    p.add_argument("--aurora-max-lag", type=int, default=None,
                   help="override aurora's max_lag (default: the algorithm's own default)")
    p.add_argument("--aurora-variant-max-lag", type=int, default=None,
                   help="also run aurora with max_lag=N as an extra row 'aurora_maxlagN' (offline, the lag of "
                        "every logged step equals the updates done, so the default max_lag drops the PG data "
                        "after max_lag updates; N >= --updates keeps it, truncated by V-trace)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own; 1 with --quick, where more only adds overhead)")
    p.add_argument("--seed", type=int, default=0, help="traffic, day-0 draft, behaviour draft and data seed")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of the training batch order (default: --seed). Another value reuses the cached "
                        "data and writes results_seedN.* next to the first run's files")
    p.add_argument("--no-day0-eval", action="store_true", help="skip evaluating the day-0 reference draft")
    args = p.parse_args(argv)

    # Sized for a busy 2-core CPU (SmolLM2 serves ~6-10 tokens/s there): about 30 minutes in all.
    defaults = dict(train_prompts=32, behaviour_prompts=12, behaviour_updates=20, held_out=8, updates=40,
                    max_tokens=64, max_prompt_tokens=256, draft_vocab_size=8192)
    if args.quick:
        defaults = dict(train_prompts=8, behaviour_prompts=4, behaviour_updates=4, held_out=4, updates=6,
                        max_tokens=16, max_prompt_tokens=64, draft_vocab_size=4096)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.train_seed is None:
        args.train_seed = args.seed
    args.suffix = "" if args.train_seed == args.seed else f"_seed{args.train_seed}"
    if args.threads is None and args.quick:
        args.threads = 1
    if args.depth is None:
        args.depth = max(args.lookahead, 1)
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad:
        p.error(f"unknown algorithm(s) {bad}; choose from {list(ALGORITHMS)}")
    for name in ("train_prompts", "behaviour_prompts", "held_out", "max_tokens", "batch_traces", "num_slots",
                 "lookahead", "max_prompt_tokens", "draft_vocab_size", "replay_ratio"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("updates", "behaviour_updates", "warmup_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    return args


# ---- serving ------------------------------------------------------------------------------------

def serve(target, draft: Eagle3Draft, prompts: list[list[int]], args, policy_version: int = 0,
          capture: bool = True, lookahead: int | None = None) -> dict:
    """Serve ``prompts`` greedily with speculation by ``draft``; traces, outputs and acceptance counters."""
    traces: list = []
    max_len = args.max_prompt_tokens + args.max_tokens + 8
    la = args.lookahead if lookahead is None else lookahead
    decoder = SpecDecoder(copy.deepcopy(draft), args.num_slots, max_len,
                          SpecConfig(lookahead=la, capture_traces=capture), trace_sink=traces.append,
                          policy_version=policy_version)
    engine = LLMEngine(target, EngineConfig(num_slots=args.num_slots, max_len=max_len), None, decoder)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    seconds = time.perf_counter() - t0
    steps = sum(o.verify_steps for o in outs)
    accepted = sum(o.accepted_tokens for o in outs)
    tokens = sum(len(o.output_ids) for o in outs)
    prop, acc = decoder.depth_proposed, decoder.depth_accepted
    return {
        "traces": traces, "outputs": [list(o.output_ids) for o in outs],
        "accept_length": 1.0 + accepted / max(steps, 1),
        "accept_length_mean_request": sum(o.accept_length for o in outs) / max(len(outs), 1),
        "depth_acceptance": [a / p if p else float("nan") for a, p in zip(acc, prop)],
        "depth_conditional": [acc[j] / acc[j - 1] if j and acc[j - 1] else (acc[0] / prop[0] if not j and prop[0]
                              else float("nan")) for j in range(len(acc))],
        "depth_proposed": list(prop), "depth_accepted": list(acc),
        "verify_steps": steps, "accepted_tokens": accepted, "generated_tokens": tokens,
        "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9), "prompts": len(prompts),
    }


def eval_summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("traces", "outputs")}


# ---- data (cached) ------------------------------------------------------------------------------

def data_key(args) -> dict:
    return {k: getattr(args, k) for k in ("quick", "train_prompts", "behaviour_prompts", "behaviour_updates",
                                          "held_out", "max_tokens", "max_prompt_tokens", "lookahead", "depth",
                                          "lr", "warmup_steps", "batch_traces", "num_slots", "draft_vocab_size",
                                          "seed")}


def learner_config(args) -> LearnerConfig:
    # prompt_bases 0: the configuration this experiment's published figures were measured with.
    return LearnerConfig(lr=args.lr, warmup_steps=args.warmup_steps, depth=args.depth, replay_ratio=args.replay_ratio,
                         prompt_bases=0)


def prepare_data(args, out: Path, target, head: torch.Tensor, traffic, day0: Eagle3Draft):
    """(behaviour draft, its policy version, phase-B training traces, data info); cached in ``out``."""
    key = data_key(args)
    key_file, beh_file = out / "data_key.json", out / "behaviour_draft.safetensors"
    train_file = out / "traces_train.safetensors"
    if key_file.is_file() and beh_file.is_file() and train_file.is_file() and \
            json.loads(key_file.read_text())["key"] == key:
        saved = json.loads(key_file.read_text())
        behaviour = copy.deepcopy(day0)
        behaviour.load_state_dict(load_file(str(beh_file)))
        log(f"reusing cached behaviour draft and {saved['info']['train_traces']} training traces from {out}")
        return behaviour, saved["version"], load_traces(train_file), saved["info"]

    reqs = [ids for ids, _ in traffic.requests]
    phase_a, phase_b = reqs[: args.behaviour_prompts], reqs[args.behaviour_prompts:]
    log(f"phase A: serving {len(phase_a)} prompts with the day-0 draft (lookahead {args.lookahead})")
    a = serve(target, day0, phase_a, args, policy_version=0)
    log(f"phase A: {a['generated_tokens']} tokens in {a['seconds']:.0f}s ({a['tokens_per_s']:.1f} tok/s), "
        f"accept length {a['accept_length']:.3f}")
    t0 = time.perf_counter()
    run = train_offline(a["traces"], day0, head, learner_config(args), args.behaviour_updates,
                        args.batch_traces, args.seed, algorithm="eagle3_kl")
    behaviour, version = run.learner.draft.eval(), run.learner.policy_version
    log(f"behaviour draft: eagle3_kl, {args.behaviour_updates} updates in {time.perf_counter() - t0:.0f}s, "
        f"policy version {version}")
    log(f"phase B: serving {len(phase_b)} training prompts with the behaviour draft")
    b = serve(target, behaviour, phase_b, args, policy_version=version)
    log(f"phase B: {b['generated_tokens']} tokens in {b['seconds']:.0f}s ({b['tokens_per_s']:.1f} tok/s), "
        f"accept length {b['accept_length']:.3f}, per-depth {fmt_list(b['depth_acceptance'])}")
    traces = b["traces"]
    info = {"behaviour_traces": len(a["traces"]), "behaviour_serve": eval_summary(a),
            "train_traces": len(traces), "train_serve": eval_summary(b),
            "train_generated_tokens": sum(int(t.output_ids.numel()) for t in traces),
            "train_verify_steps": sum(t.verify_steps for t in traces),
            "train_proposals": sum(int(t.lookahead.sum()) for t in traces),
            "train_accepted": sum(t.accepted_tokens for t in traces),
            "train_logged_accept_length": 1.0 + sum(t.accepted_tokens for t in traces) /
            max(sum(t.verify_steps for t in traces), 1)}
    save_traces(traces, train_file)
    save_traces(a["traces"], out / "traces_behaviour.safetensors")
    save_file({k: v.contiguous() for k, v in behaviour.state_dict().items()}, str(beh_file))
    key_file.write_text(json.dumps({"key": key, "version": version, "info": info}, indent=1))
    return behaviour, version, traces, info


# ---- reporting ----------------------------------------------------------------------------------

def fmt_list(xs) -> str:
    return "[" + ", ".join("nan" if (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}" for x in xs) + "]"


def final_metrics(metrics: list[dict], last: int = 10) -> dict:
    """Mean of each metric over the last ``last`` updates."""
    tail = metrics[-last:]
    if not tail:
        return {}
    keys = sorted({k for m in tail for k in m})
    return {k: sum(m.get(k, 0.0) for m in tail) / len(tail) for k in keys}


def markdown(results: dict, info: dict, args) -> str:
    k = args.lookahead
    head = ("| draft | updates | held-out accept length | per-request mean | "
            + " | ".join(f"acc@{j + 1}" for j in range(k)) + " | train loss (last 10) | train sim. accepted/step (last 10) |")
    sep = "|" + "---|" * (6 + k)
    rows = [head, sep]
    for name, r in results.items():
        e = r["eval"]
        depths = (e["depth_acceptance"] + [float("nan")] * k)[:k]
        fm = r.get("final_metrics", {})
        loss = f"{fm['losses/total']:.4f}" if "losses/total" in fm else "-"
        sim = f"{fm['accept/length_sim']:.3f}" if "accept/length_sim" in fm else "-"
        rows.append(f"| {name} | {r.get('updates', 0)} | **{e['accept_length']:.3f}** | "
                    f"{e['accept_length_mean_request']:.3f} | "
                    + " | ".join("-" if math.isnan(d) else f"{d:.3f}" for d in depths)
                    + f" | {loss} | {sim} |")
    rows.append("")
    rows.append(f"Training data: {info['train_traces']} traces, {info['train_generated_tokens']} generated tokens, "
                f"{info['train_verify_steps']} logged verify steps ({info['train_proposals']} proposals, "
                f"{info['train_accepted']} accepted; logged accept length "
                f"{info['train_logged_accept_length']:.3f}). Held-out: {args.held_out} prompts x "
                f"{args.max_tokens} tokens, greedy, lookahead {k}. acc@j = P(depth j accepted | proposed).")
    return "\n".join(rows)


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    vals = [results[n]["eval"]["accept_length"] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    palette = {"aurora": "tab:red", "eagle3_kl": "tab:blue", "osd": "tab:green", "frozen": "tab:gray",
               "start": "black", "day0": "tab:brown"}
    colors = [palette.get(n, "tab:orange") for n in names]
    bars = axes[0].bar(names, vals, color=colors)
    for b, v in zip(bars, vals):
        axes[0].text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    axes[0].set_ylabel(f"held-out accept length (lookahead {args.lookahead})")
    axes[0].set_ylim(1.0, max(vals) * 1.08 + 0.05)
    axes[0].set_title("accept length per algorithm (same data, same updates)")
    axes[0].tick_params(axis="x", rotation=20)
    for n, c in zip(names, colors):
        d = results[n]["eval"]["depth_acceptance"]
        axes[1].plot(range(1, len(d) + 1), d, marker="o", label=n, color=c,
                     linestyle="--" if n in ("day0", "start") else "-")
    axes[1].set_xticks(range(1, args.lookahead + 1))
    axes[1].set_xlabel("depth j")
    axes[1].set_ylabel("P(depth j accepted)")
    axes[1].set_title("per-depth acceptance (held out)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("accept/length_sim", "E[accepted tokens / step], current draft, train batch"),
            ("accept/depth_1", "P(depth 1 accepted), current draft, train batch")]
    fig, axes = plt.subplots(1, len(keys), figsize=(11, 4))
    for ax, (key, title) in zip(axes, keys):
        for name, ms in curves.items():
            ys = [m.get(key) for m in ms]
            if any(y is not None for y in ys):
                ax.plot(range(1, len(ys) + 1), [float("nan") if y is None else y for y in ys], label=name)
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize_seeds(out: Path) -> str | None:
    """Mean and spread over every ``results*.json`` in ``out`` (one per training seed); writes
    ``results_seeds.md`` and ``accept_length_seeds.png``. None when there is only one."""
    files = sorted(out.glob("results*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    runs = [r for r in runs if r.get("complete") and "results" in r]
    if len(runs) < 2:
        return None
    names = [n for n in runs[0]["results"] if all(n in r["results"] for r in runs)]
    seeds = [r["settings"].get("train_seed", r["settings"]["seed"]) for r in runs]
    k = runs[0]["settings"]["lookahead"]
    rows = [f"Held-out accept length over training seeds {seeds} (same data; seed = batch order):", "",
            "| draft | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | pooled acc@1..acc@" + str(k) + " |",
            "|---|" + "---|" * (len(seeds) + 2)]
    means = {}
    for n in names:
        vals = [r["results"][n]["eval"]["accept_length"] for r in runs]
        means[n] = sum(vals) / len(vals)
        prop = [sum(r["results"][n]["eval"]["depth_proposed"][j] for r in runs) for j in range(k)]
        acc = [sum(r["results"][n]["eval"]["depth_accepted"][j] for r in runs) for j in range(k)]
        rows.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | **{means[n]:.3f}** | "
                    + " / ".join(f"{a / p:.3f}" if p else "-" for a, p in zip(acc, prop)) + " |")
    table = "\n".join(rows)
    (out / "results_seeds.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    palette = {"aurora": "tab:red", "eagle3_kl": "tab:blue", "osd": "tab:green", "frozen": "tab:gray",
               "start": "black", "day0": "tab:brown"}
    ax.bar(names, [means[n] for n in names], color=[palette.get(n, "tab:orange") for n in names], alpha=0.6)
    for i, n in enumerate(names):
        ax.scatter([i] * len(runs), [r["results"][n]["eval"]["accept_length"] for r in runs], color="k", s=12, zorder=3)
        ax.text(i, means[n], f"{means[n]:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(1.0, max(means.values()) * 1.08 + 0.05)
    ax.set_ylabel(f"held-out accept length (lookahead {k})")
    ax.set_title(f"mean over {len(runs)} training seeds (dots: each seed)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "accept_length_seeds.png", dpi=120)
    plt.close(fig)
    return table


# ---- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; returns the summary written to results.json. Leaves the caller's torch
    thread count and global RNG state as they were (the smoke test calls it in-process)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            if args.threads:
                torch.set_num_threads(args.threads)
            return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model = ModelSection(target="tiny" if args.quick else "smollm2", dtype="float32",
                         draft_vocab_size=args.draft_vocab_size)
    target, tokenizer = load_target_model(model, args.seed)
    head = target.lm_head.weight.detach().float().clone()
    n_train = args.behaviour_prompts + args.train_prompts
    workload = WorkloadSection(source="random" if args.quick else "sharegpt",
                               phases=[{"domain": "code", "requests": n_train}], max_tokens=args.max_tokens,
                               temperature=0.0, max_prompt_tokens=args.max_prompt_tokens, held_out=args.held_out)
    traffic = build_traffic(workload, tokenizer, target.config.vocab_size, args.seed)
    supply = len({tuple(ids) for ids, _ in traffic.requests})
    if supply < n_train:
        log(f"warning: only {supply} distinct training prompts for {n_train} requests (prompts repeat)")
    held = traffic.held_out["code"]
    day0 = initial_draft(model, target, vocab_sample(traffic, n_train), args.seed)
    log(f"target {model.target} loaded; {n_train} training prompts ({args.behaviour_prompts} phase A + "
        f"{args.train_prompts} phase B), {len(held)} held out, skipped {traffic.skipped}")

    behaviour, version, traces, info = prepare_data(args, out, target, head, traffic, day0)

    results: dict[str, dict] = {}
    curves: dict[str, list[dict]] = {}
    evals: dict[str, dict] = {}

    def evaluate(name: str, draft: Eagle3Draft) -> dict:
        r = serve(target, draft, held, args, policy_version=0, capture=False)
        evals[name] = r
        log(f"eval {name}: accept length {r['accept_length']:.3f} per-depth {fmt_list(r['depth_acceptance'])} "
            f"({r['generated_tokens']} tokens in {r['seconds']:.0f}s, {r['tokens_per_s']:.1f} tok/s)")
        return eval_summary(r)

    if not args.no_day0_eval:
        results["day0"] = {"eval": evaluate("day0", day0), "updates": 0, "note": "day-0 draft, reference"}
    results["start"] = {"eval": evaluate("start", behaviour), "updates": 0,
                        "note": f"behaviour draft (eagle3_kl x {args.behaviour_updates} on phase A): "
                                "every algorithm's starting point"}

    runs = []
    for algo in args.algorithms:
        algo_args = {"max_lag": args.aurora_max_lag} if algo == "aurora" and args.aurora_max_lag is not None else {}
        runs.append((algo, algo, algo_args))
    if args.aurora_variant_max_lag is not None:
        runs.append((f"aurora_maxlag{args.aurora_variant_max_lag}", "aurora",
                     {"max_lag": args.aurora_variant_max_lag}))

    summary = {
        "settings": {**data_key(args), "train_seed": args.train_seed, "updates": args.updates,
                     "replay_ratio": args.replay_ratio, "aurora_max_lag": args.aurora_max_lag, "algorithms": [r[0] for r in runs],
                     "target": model.target, "traffic": workload.source + ":code",
                     "behaviour_policy_version": version, "eval": "greedy, held-out prompts"},
        "data": {**info, "held_out_prompts": len(held), "skipped_prompts": traffic.skipped},
        "results": results,
    }

    def write(final: bool) -> str:
        # Lossless check: greedy speculation must emit the target's own tokens whatever the draft.
        ref = evals["start"]["outputs"]
        for name, r in results.items():
            r["eval"]["identical_outputs_to_start"] = sum(a == b for a, b in zip(evals[name]["outputs"], ref))
        summary["wall_seconds"] = time.perf_counter() - t_start
        summary["complete"] = final
        (out / f"results{args.suffix}.json").write_text(json.dumps(summary, indent=1, default=float))
        table = markdown(results, info, args)
        (out / f"results{args.suffix}.md").write_text(table + "\n")
        plot(results, out / f"accept_length{args.suffix}.png", args)
        if curves and args.updates:
            plot_curves(curves, out / f"training_curves{args.suffix}.png")
        return table

    for name, algo, algo_args in runs:
        cfg = learner_config(args)
        t0 = time.perf_counter()
        mfile = open(out / f"metrics_{name}{args.suffix}.jsonl", "w")

        def on_update(i: int, m: dict, algo=name, t0=t0, mfile=mfile) -> None:
            mfile.write(json.dumps(m) + "\n")
            if i % 10 == 0 or i == args.updates:
                log(f"  {algo} update {i}/{args.updates}: loss {m.get('losses/total', 0.0):.4f} "
                    f"length_sim {m.get('accept/length_sim', float('nan')):.3f} ({time.perf_counter() - t0:.0f}s)")

        run = train_offline(traces, behaviour, head, cfg, args.updates, args.batch_traces, args.train_seed,
                            on_update, algorithm=algo, algorithm_args=algo_args)
        mfile.close()
        train_s = time.perf_counter() - t0
        log(f"{name}: {args.updates} updates in {train_s:.0f}s")
        curves[name] = run.metrics
        results[name] = {"eval": evaluate(name, run.learner.draft.eval()), "updates": args.updates,
                         "algorithm": algo, "optimizer_steps": run.learner.step, "train_seconds": train_s,
                         "algorithm_args": algo_args, "final_metrics": final_metrics(run.metrics)}
        write(final=False)

    table = write(final=True)
    print(table, flush=True)
    seeds_table = summarize_seeds(out)
    if seeds_table:
        print("\n" + seeds_table, flush=True)
    log(f"wrote {out / f'results{args.suffix}.json'}, {out / f'results{args.suffix}.md'}, {out / f'accept_length{args.suffix}.png'}; "
        f"wall {summary['wall_seconds']:.0f}s")
    return summary


if __name__ == "__main__":
    main()
