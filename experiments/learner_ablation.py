"""Learner ablation: which learner settings buy the most held-out acceptance per second of learner time.

On CPU the day-0 draft's progress is bounded by learner compute, not by traffic: the learner shares
two cores with serving. This experiment asks, for a fixed stream of served traces, how fast each
learner setting turns compute into acceptance.

Protocol:
1. Serve ``--train-prompts`` ShareGPT code prompts and ``--held-out`` held-out ones with the target
   (greedy, no speculation, traces captured); cached in ``--out``, keyed by the settings.
2. Each variant starts from the same day-0 draft and consumes the training traces in the same order,
   ``--batch-traces`` per update (as the online learner would receive them), until it has spent
   ``--seconds`` of learner time (collate + unroll + backward + step, timed around ``Learner.update``).
3. Every ``--eval-every`` seconds of learner time the draft is scored on the held-out traces: the
   greedy accept length at lookahead ``--depth`` under teacher forcing (1 + the expected run of
   proposals equal to the target's tokens). Under greedy verification this is what serving at that
   lookahead measures, because the TTT unroll equals the serving draft step by step (tests/test_ttt.py).

Variants are ``name:key=value,key=value`` over ``LearnerConfig`` fields, for example
``--variant base:replay_ratio=4 --variant prompt128:prompt_bases=128,replay_ratio=1``.

    python experiments/learner_ablation.py --out experiments/results/learner_ablation
    python experiments/learner_ablation.py --short --out /tmp/ablation    # a minute, tiny random model
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aurora_rl.config import ModelSection, WorkloadSection  # noqa: E402
from aurora_rl.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from aurora_rl.engine.sampling import SamplingParams  # noqa: E402
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder  # noqa: E402
from aurora_rl.engine.trace import Trace  # noqa: E402
from aurora_rl.models.draft import Eagle3Draft  # noqa: E402
from aurora_rl.runtime.factory import initial_draft, load_target_model  # noqa: E402
from aurora_rl.runtime.traffic import build_traffic, vocab_sample  # noqa: E402
from aurora_rl.training.batching import collate  # noqa: E402
from aurora_rl.training.learner import Learner, LearnerConfig  # noqa: E402
from aurora_rl.training.trace_io import load_traces, save_traces  # noqa: E402
from aurora_rl.training.ttt import unroll  # noqa: E402

DEFAULT_VARIANTS = ("replay4:replay_ratio=4", "replay1:replay_ratio=1",
                    "prompt64:prompt_bases=64,replay_ratio=2", "prompt256:prompt_bases=256,replay_ratio=1")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--short", action="store_true", help="tiny random target, seconds per variant")
    ap.add_argument("--train-prompts", type=int, default=192)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--num-slots", type=int, default=8)
    ap.add_argument("--draft-vocab-size", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch-traces", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seconds", type=float, default=600.0, help="learner time per variant")
    ap.add_argument("--eval-every", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=None, help="name:key=value,... (repeatable)")
    args = ap.parse_args(argv)
    if args.short:
        args.train_prompts, args.held_out, args.max_tokens, args.seconds, args.eval_every = 12, 4, 16, 4.0, 2.0
        args.max_prompt_tokens, args.draft_vocab_size = 48, 64
    args.variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    return args


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,...`` -> (name, LearnerConfig overrides); values are parsed as JSON when they can be."""
    name, _, body = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r} has no name (expected name:key=value,...)")
    fields = set(LearnerConfig.__dataclass_fields__)
    overrides = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"variant {name!r}: {item!r} is not key=value with a LearnerConfig field; "
                             f"fields: {sorted(fields)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def serve(target, draft: Eagle3Draft, prompts: list[list[int]], args) -> list[Trace]:
    """Greedy plain decoding of ``prompts`` with trace capture (no speculation: k = 0 every step)."""
    traces: list[Trace] = []
    max_len = args.max_prompt_tokens + args.max_tokens + 8
    decoder = SpecDecoder(copy.deepcopy(draft), args.num_slots, max_len,
                          SpecConfig(lookahead=0, capture_traces=True), trace_sink=traces.append)
    engine = LLMEngine(target, EngineConfig(num_slots=args.num_slots, max_len=max_len), None, decoder)
    engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    order = {tuple(p): i for i, p in enumerate(prompts)}
    return sorted(traces, key=lambda t: order.get(tuple(t.prompt_ids.tolist()), len(order)))


@torch.no_grad()
def held_out_accept_length(draft: Eagle3Draft, traces: list[Trace], head: torch.Tensor, depth: int) -> float:
    """Greedy accept length at lookahead ``depth`` on ``traces`` under teacher forcing (see module doc)."""
    draft.eval()
    runs, rows = 0.0, 0
    for i in range(0, len(traces), 4):
        batch = collate(traces[i:i + 4], draft, head, depth)
        logits = unroll(draft, batch.ttt, depth)
        hit = (logits.argmax(-1) == batch.target_tokens) & batch.mask
        full = batch.mask.all(-1)
        runs += float(hit.long().cumprod(-1).sum(-1)[full].sum())
        rows += int(full.sum())
    draft.train()
    return 1.0 + runs / max(rows, 1)


def data(args, out: Path):
    """Target head, day-0 draft, training and held-out traces (served once, then cached)."""
    model = ModelSection(target="tiny" if args.short else "smollm2", dtype="auto",
                         draft_vocab_size=args.draft_vocab_size)
    target, tokenizer = load_target_model(model, args.seed)
    head = target.lm_head.weight.detach().float().clone()
    workload = WorkloadSection(source="random" if args.short else "sharegpt",
                               phases=[{"domain": "code", "requests": args.train_prompts}],
                               max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                               held_out=args.held_out)
    traffic = build_traffic(workload, tokenizer, target.config.vocab_size, args.seed)
    day0 = initial_draft(model, target, vocab_sample(traffic, args.train_prompts), args.seed)
    key = {k: getattr(args, k) for k in ("short", "train_prompts", "held_out", "max_tokens", "max_prompt_tokens",
                                         "draft_vocab_size", "seed")}
    key_file = out / "data_key.json"
    files = out / "traces_train.safetensors", out / "traces_held_out.safetensors"
    if key_file.is_file() and all(f.is_file() for f in files) and json.loads(key_file.read_text()) == key:
        log(f"reusing cached traces in {out}")
        return head, day0, load_traces(files[0]), load_traces(files[1])
    t0 = time.perf_counter()
    train = serve(target, day0, [ids for ids, _ in traffic.requests], args)
    held = serve(target, day0, traffic.held_out["code"], args)
    log(f"served {len(train)} training and {len(held)} held-out prompts in {time.perf_counter() - t0:.0f}s")
    save_traces(train, files[0])
    save_traces(held, files[1])
    key_file.write_text(json.dumps(key))
    return head, day0, train, held


def run_variant(name: str, overrides: dict, day0, head, train, held, args) -> list[dict]:
    # replay 1 and no prompt rows unless a variant says otherwise: the settings its figures were measured with.
    cfg = LearnerConfig(**{"lr": args.lr, "depth": args.depth, "replay_ratio": 1, "prompt_bases": 0, **overrides})
    learner = Learner(day0, head, cfg)
    curve = [{"learner_s": 0.0, "updates": 0, "traces": 0,
              "accept_length": held_out_accept_length(learner.draft, held, head, args.depth)}]
    spent, next_eval, used = 0.0, args.eval_every, 0
    while spent < args.seconds:
        batch = [train[(used + i) % len(train)] for i in range(args.batch_traces)]
        used += args.batch_traces
        t0 = time.perf_counter()
        learner.update(batch)
        spent += time.perf_counter() - t0
        if spent >= next_eval or spent >= args.seconds:
            next_eval += args.eval_every
            curve.append({"learner_s": round(spent, 2), "updates": learner.step, "traces": used,
                          "accept_length": held_out_accept_length(learner.draft, held, head, args.depth)})
            log(f"{name}: {spent:.0f}s, {used} traces, {learner.step} steps, "
                f"held-out accept length {curve[-1]['accept_length']:.3f}")
    return curve


def report(results: dict, args, out: Path) -> str:
    lines = ["| variant | settings | traces used | optimizer steps | held-out accept length (start → end) |",
             "|---|---|---:|---:|---|"]
    for name, r in results.items():
        c = r["curve"]
        lines.append(f"| {name} | {r['overrides']} | {c[-1]['traces']} | {c[-1]['updates']} | "
                     f"{c[0]['accept_length']:.3f} → **{c[-1]['accept_length']:.3f}** |")
    md = "\n".join(lines) + "\n"
    (out / "learner_ablation.md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot([p["learner_s"] for p in r["curve"]], [p["accept_length"] for p in r["curve"]], marker="o", label=name)
    ax.set_xlabel("learner seconds")
    ax.set_ylabel(f"held-out accept length (lookahead {args.depth})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learner_ablation.png", dpi=110)
    plt.close(fig)
    return md


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    head, day0, train, held = data(args, out)
    log(f"{len(train)} training traces ({sum(t.num_positions for t in train)} positions, "
        f"{sum(int(t.output_ids.numel()) for t in train)} generated), {len(held)} held out")
    results = {}
    for name, overrides in args.variants:
        torch.manual_seed(args.seed)
        results[name] = {"overrides": overrides, "curve": run_variant(name, overrides, day0, head, train, held, args)}
        (out / "learner_ablation.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                               "results": results}, indent=1))
    print(report(results, args, out))
    return results


if __name__ == "__main__":
    main()
