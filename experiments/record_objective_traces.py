"""Record the two trace sets the objective ablation trains on: greedy, and sampled at T=0.8 top-p 0.95.

Each set is served once by the day-0 draft, or by ``--record-draft`` (an EAGLE3 folder, e.g. the draft
``make demo`` trained, so that the logged proposals are accepted often enough for the terms that read
the logs to have something to learn from; the arms still start from the day-0 draft), at a fixed
lookahead, no context copies, traces captured, on
the same ShareGPT code prompts, and saved with ``aurora_rl.training.trace_io`` (so ``aurora-rl
offline`` reads them too): ``<out>/<set>/train.safetensors`` and ``<out>/<set>/held_out.safetensors``
(held-out prompts no arm trains on). ``<out>/key.json`` records the settings; a rerun with the same
settings reuses the files. The day-0 draft is rebuilt from the same seed by every reader
(``objective_ablation.day0``), so it is not saved.

    python experiments/record_objective_traces.py --out experiments/results/objective_s9/traces
    python experiments/record_objective_traces.py --short --out /tmp/obj    # tiny random model
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
from aurora_rl.runtime.factory import initial_draft, load_target_model  # noqa: E402
from aurora_rl.runtime.traffic import build_traffic, vocab_sample  # noqa: E402
from aurora_rl.training.trace_io import save_traces  # noqa: E402

SETS = {"greedy": dict(temperature=0.0, top_p=1.0), "sampled": dict(temperature=0.8, top_p=0.95)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--short", action="store_true", help="tiny random target (tests)")
    ap.add_argument("--train-prompts", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--num-slots", type=int, default=8)
    ap.add_argument("--draft-vocab-size", type=int, default=4096)
    ap.add_argument("--lookahead", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record-draft", default=None,
                    help="EAGLE3 draft folder that serves the recordings (default: the day-0 draft)")
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="sets to record")
    ap.add_argument("--serve-train", type=int, default=None,
                    help="serve only the first N training prompts for these sets (the day-0 draft is unchanged)")
    args = ap.parse_args(argv)
    if args.short:
        args.train_prompts, args.held_out, args.max_tokens, args.max_prompt_tokens = 6, 2, 12, 32
        args.draft_vocab_size, args.num_slots = 64, 4
    return args


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_section(args) -> ModelSection:
    return ModelSection(target="tiny" if args.short else "smollm2", dtype="auto", draft_vocab_size=args.draft_vocab_size)


def traffic_of(args, tokenizer, vocab_size: int):
    workload = WorkloadSection(source="random" if args.short else "sharegpt",
                               phases=[{"domain": "code", "requests": args.train_prompts}],
                               max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                               held_out=args.held_out)
    return build_traffic(workload, tokenizer, vocab_size, args.seed)


def day0(args):
    """(target, target lm_head [V, H] float32, day-0 draft, traffic): the same for every reader."""
    target, tokenizer = load_target_model(model_section(args), args.seed)
    traffic = traffic_of(args, tokenizer, target.config.vocab_size)
    draft = initial_draft(model_section(args), target, vocab_sample(traffic, args.train_prompts), args.seed)
    return target, target.lm_head.weight.detach().float().clone(), draft, traffic


def serve(target, draft, prompts: list[list[int]], sampling: dict, args, seed: int) -> list:
    """Serve ``prompts`` with speculation at a fixed lookahead, copies off; traces in prompt order."""
    traces = []
    max_len = args.max_prompt_tokens + args.max_tokens + args.lookahead + 8
    decoder = SpecDecoder(copy.deepcopy(draft), args.num_slots, max_len,
                          SpecConfig(lookahead=args.lookahead, capture_traces=True, context_copy=False),
                          trace_sink=traces.append)
    engine = LLMEngine(target, EngineConfig(num_slots=args.num_slots, max_len=max_len), None, decoder)
    params = [SamplingParams(max_tokens=args.max_tokens, seed=seed + i, **sampling) for i in range(len(prompts))]
    engine.generate(prompts, params)
    order = {tuple(p): i for i, p in enumerate(prompts)}
    return sorted(traces, key=lambda t: order.get(tuple(t.prompt_ids.tolist()), len(order)))


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    key = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "sets", "serve_train")}
    if (out / "key.json").is_file() and json.loads((out / "key.json").read_text()) != key:
        raise SystemExit(f"{out} holds traces recorded with other settings ({out / 'key.json'}); use another --out")
    (out / "key.json").write_text(json.dumps(key))
    todo = [s for s in args.sets if not all((out / s / f).is_file() for f in ("train.safetensors", "held_out.safetensors"))]
    if not todo:
        say(f"traces in {out} are already recorded with these settings")
        return
    target, _, draft, traffic = day0(args)
    if args.record_draft:
        section = model_section(args)
        section.draft = args.record_draft
        draft = initial_draft(section, target, [], args.seed)
    train = [ids for ids, _ in traffic.requests][:args.serve_train]
    held = traffic.held_out["code"]
    for name in todo:  # each set is written once complete, so an interrupted run resumes at the next set
        sampling = SETS[name]
        t0 = time.perf_counter()
        tr = serve(target, draft, train, sampling, args, args.seed)
        ho = serve(target, draft, held, sampling, args, args.seed + 10_000)
        save_traces(tr, out / name / "train.safetensors")
        save_traces(ho, out / name / "held_out.safetensors")
        acc = sum(t.accepted_tokens for t in tr) / max(sum(t.verify_steps for t in tr), 1)
        say(f"{name}: {len(tr)} training + {len(ho)} held-out traces, "
            f"{sum(int(t.output_ids.numel()) for t in tr + ho)} tokens in {time.perf_counter() - t0:.0f}s; "
            f"accept length while recording ({args.record_draft or 'day-0 draft'}) {1 + acc:.3f}")


if __name__ == "__main__":
    main()
