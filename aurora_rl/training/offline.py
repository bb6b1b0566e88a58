"""Offline training on saved traces: compare learning rules on identical data, debug the learner.

Contract:
- ``train_offline(traces, draft_init, target_head, learner_config, num_updates, batch_traces, seed,
  algorithm=..., algorithm_args=...)`` copies ``draft_init`` (the caller's draft is never modified), builds a ``Learner`` and runs
  ``num_updates`` calls of ``Learner.update`` on batches of ``batch_traces`` traces drawn without
  replacement from a generator seeded with ``seed``. The batch sequence depends only on
  (len(traces), num_updates, batch_traces, seed), so two algorithms given the same seed see the
  same batches, and the same seed gives the same final weights. Returns ``OfflineRun(learner,
  metrics)`` (unpacks as ``learner, metrics``), one metrics dict per update.
  The learner's policy version starts at the newest version in the traces, so the logged lag is the
  number of updates since the data was collected.
- ``python -m aurora_rl.training.offline --traces PATH --algorithm NAME --updates N --batch-traces B
  --out DIR`` does the same from a trace file or shard folder (``trace_io``), with the target's lm_head
  from ``--target`` (``smollm2``: the embedded SmolLM2-135M, or a model folder / .gguf) and the draft
  from ``--draft`` (an EAGLE3 folder) or a day-0 init with a vocabulary of ``--draft-vocab-size`` ids
  picked from the traces' prompt tokens. It writes ``DIR/draft`` (EAGLE3 layout) and
  ``DIR/metrics.jsonl`` (one JSON object per update) and prints progress.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aurora_rl.engine.trace import Trace
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.training.learner import Learner, LearnerConfig

log = logging.getLogger(__name__)


@dataclass
class OfflineRun:
    """Result of ``train_offline``; unpacks as ``learner, metrics``."""

    learner: Learner
    metrics: list[dict[str, float]]
    """One dict per update: the learner's metrics plus ``offline/update``."""

    def __iter__(self):
        return iter((self.learner, self.metrics))


def batch_schedule(num_traces: int, num_updates: int, batch_traces: int, seed: int) -> list[list[int]]:
    """Trace indices of every update: ``batch_traces`` distinct indices per update, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(num_traces, generator=g)[:batch_traces].tolist() for _ in range(num_updates)]


def check_traces_fit(traces: list[Trace], draft: Eagle3Draft, target_head: torch.Tensor) -> None:
    """Traces, draft and target head must come from the same target; ValueError saying which differs."""
    cfg = draft.config
    width = cfg.num_taps * cfg.target_hidden_size
    for i, t in enumerate(traces):
        if t.taps.shape[0] and t.taps.shape[1] != width:
            raise ValueError(f"trace {i}: taps width {t.taps.shape[1]} != draft's fc input {width} "
                             "(traces from another target?)")
        if t.hidden.shape[0] and t.hidden.shape[1] != target_head.shape[1]:
            raise ValueError(f"trace {i}: hidden width {t.hidden.shape[1]} != target lm_head width "
                             f"{target_head.shape[1]}")
        top = int(t.tokens.max()) if t.tokens.numel() else -1
        if top >= cfg.vocab_size:
            raise ValueError(f"trace {i}: token id {top} >= target vocab_size {cfg.vocab_size}")


def train_offline(traces: list[Trace], draft_init: Eagle3Draft, target_head: torch.Tensor,
                  learner_config: LearnerConfig, num_updates: int, batch_traces: int, seed: int = 0,
                  on_update: Callable[[int, dict[str, float]], None] | None = None, algorithm: str = "aurora",
                  algorithm_args: dict | None = None) -> OfflineRun:
    """Train a copy of ``draft_init`` for ``num_updates`` seeded updates on ``traces`` (see module doc)."""
    if not traces:
        raise ValueError("train_offline needs at least one trace")
    if not isinstance(num_updates, int) or num_updates < 0:
        raise ValueError(f"num_updates must be an integer >= 0, got {num_updates!r}")
    if not isinstance(batch_traces, int) or batch_traces < 1:
        raise ValueError(f"batch_traces must be an integer >= 1, got {batch_traces!r}")
    if batch_traces > len(traces):
        log.warning("batch_traces=%d > %d traces: every update uses all of them", batch_traces, len(traces))
    check_traces_fit(traces, draft_init, target_head)
    start_version = max((int(t.policy_version.max()) for t in traces if t.policy_version.numel()), default=0)
    learner = Learner(copy.deepcopy(draft_init), target_head, learner_config, policy_version=start_version,
                      algorithm=algorithm, algorithm_args=algorithm_args)
    metrics = []
    for i, batch in enumerate(batch_schedule(len(traces), num_updates, batch_traces, seed)):
        m = learner.update([traces[j] for j in batch])
        m["offline/update"] = float(i + 1)
        metrics.append(m)
        if on_update is not None:
            on_update(i + 1, m)
    return OfflineRun(learner, metrics)


# ---- command line -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from algorithms import list_algorithms

    p = argparse.ArgumentParser(prog="python -m aurora_rl.training.offline", description=__doc__.split("\n")[0])
    p.add_argument("--traces", required=True, help="trace file (.safetensors) or folder of shards")
    p.add_argument("--algorithm", default="aurora", choices=list_algorithms())
    p.add_argument("--updates", type=int, required=True, help="learner updates to run")
    p.add_argument("--batch-traces", type=int, default=8, help="traces per update")
    p.add_argument("--out", required=True, help="output folder (draft/ and metrics.jsonl)")
    p.add_argument("--target", default="smollm2", help="'smollm2' (embedded) or a model folder / .gguf file")
    p.add_argument("--draft", default=None, help="EAGLE3 draft folder to start from (default: day-0 init)")
    p.add_argument("--draft-vocab-size", type=int, default=8192, help="draft vocabulary of a day-0 init")
    p.add_argument("--lr", type=float, default=LearnerConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=LearnerConfig.warmup_steps)
    p.add_argument("--depth", type=int, default=LearnerConfig.depth, help="TTT depth K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="print a progress line every N updates")
    args = p.parse_args(argv)
    for name in ("updates", "batch_traces", "draft_vocab_size", "log_every"):
        if getattr(args, name) < (0 if name == "updates" else 1):
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range")
    return args


def load_target_for_cli(spec: str):
    from aurora_rl.models.loader import load_target

    if spec == "smollm2":
        from aurora_rl.assets import ensure_smollm2

        return load_target(ensure_smollm2(), torch.float32)
    return load_target(spec, torch.float32)


def initial_draft(args: argparse.Namespace, target, traces: list[Trace]) -> Eagle3Draft:
    """``--draft`` loaded, or a day-0 draft whose vocabulary is the traces' most frequent prompt tokens."""
    from aurora_rl.models.draft import DraftConfig, select_draft_vocab, token_frequencies
    from aurora_rl.models.eagle3_io import load_eagle3

    if args.draft:
        return load_eagle3(args.draft, target_embedding=target.embed.weight.detach().float())
    vocab = target.config.vocab_size
    size = min(args.draft_vocab_size, vocab)
    draft = Eagle3Draft(DraftConfig.for_target(target.config, size)).init_from_target(target, args.seed)
    counts = token_frequencies([t.prompt_ids for t in traces], vocab)
    draft.set_vocab(select_draft_vocab(counts, size, always=tuple(target.config.eos_token_ids)))
    return draft


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from aurora_rl.models.eagle3_io import save_eagle3
    from aurora_rl.training.checkpoint import make_readable
    from aurora_rl.training.trace_io import load_trace_path

    args = parse_args(argv)
    traces = load_trace_path(args.traces)
    print(f"loaded {len(traces)} traces from {args.traces}")
    target = load_target_for_cli(args.target)
    draft = initial_draft(args, target, traces)
    config = LearnerConfig(lr=args.lr, warmup_steps=args.warmup_steps, depth=args.depth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=args.updates, desc=f"offline {args.algorithm}", unit="update")
    with open(out / "metrics.jsonl", "w") as metrics_file:
        def on_update(i: int, m: dict[str, float]) -> None:
            metrics_file.write(json.dumps(m) + "\n")
            bar.update(1)
            if i % args.log_every == 0 or i == args.updates:
                bar.write(f"update {i}/{args.updates}: loss {m.get('losses/total', 0.0):.4f} "
                          f"accept_length_sim {m.get('accept/length_sim', 0.0):.3f} "
                          f"policy_version {int(m.get('learner/policy_version', 0))}")

        run = train_offline(traces, draft, target.lm_head.weight.detach(), config, args.updates,
                            args.batch_traces, args.seed, on_update, algorithm=args.algorithm)
    bar.close()
    learner = run.learner
    folder = save_eagle3(learner.draft, out / "draft", extra={
        "policy_version": learner.policy_version, "step": learner.step, "algorithm": args.algorithm,
        "traces": str(args.traces), "seed": args.seed})
    make_readable(folder)
    print(f"wrote {folder} and {out / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
