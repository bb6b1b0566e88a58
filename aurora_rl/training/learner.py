"""The draft learner: traces in, an optimizer step out, new versioned weights to publish.

It holds the draft, an AdamW optimizer (warmup then constant rate: online training has no end),
and the frozen target lm_head only (never the whole target). ``update(traces)`` collates, unrolls the
draft in TTT mode, applies the configured algorithm's loss, clips, steps, and bumps the policy version;
``replay_ratio`` passes are made over each batch, ``grad_accum`` micro-batches per step.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from algorithms import get_algorithm
from aurora_rl.engine.trace import Trace
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.dtypes import resolve_dtype
from aurora_rl.training.batching import collate
from aurora_rl.training.ttt import unroll
from aurora_rl.training.vocab import VocabTracker, remap_moments

log = logging.getLogger(__name__)

LEARNER_DTYPES = ("auto", "float32", "bfloat16")

COUNT_METRICS = frozenset({
    "offpolicy/dropped_stale", "offpolicy/deterministic_steps", "offpolicy/num_proposal_tokens",
    "offpolicy/future_versions", "data/num_tokens", "data/num_rows", "data/num_steps", "osd/num_rejected",
})
"""Metrics that are counts per batch: summed over micro-batches (the same in every replay pass)."""


@dataclass
class LearnerConfig:
    """Optimisation settings of the draft learner."""

    algorithm: str = "aurora"
    """Learning rule, one of ``algorithms.list_algorithms()``."""
    algorithm_args: dict = field(default_factory=dict)
    """Overrides for the algorithm's config dataclass."""
    lr: float = 1e-3
    """Peak (and constant) AdamW learning rate."""
    warmup_steps: int = 10
    """Linear warmup from 0 to ``lr`` over these optimizer steps."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Max global grad norm (0 disables)."""
    depth: int = 5
    """TTT depth K: train the draft to the deepest lookahead served."""
    dtype: str = "auto"
    """Compute dtype of the draft's forward during training: ``bfloat16`` (autocast; the weights,
    gradients and optimizer stay float32), ``float32``, or ``auto``: bfloat16 where the CPU computes it
    natively (AMX or AVX512-BF16; ``aurora_rl.models.dtypes``) or on a GPU, float32 elsewhere."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (traces are split evenly)."""
    replay_ratio: int = 1
    """Optimizer passes over each batch of traces (>1 reuses recent data)."""
    prompt_bases: int = 0
    """Prompt positions per trace also trained on (sampled when a prompt is longer; 0 = generated
    positions only). Their taps are in the trace already: more rows per served request, at the cost
    of the deeper TTT depths and the head on those rows."""
    vocab_refresh_every: int = 0
    """Updates between checks of the draft vocabulary against the recent traffic (0 = the vocabulary
    stays as it was at day 0); see ``aurora_rl.training.vocab``."""
    vocab_refresh_min_gain: float = 0.01
    """Remap only when the best vocabulary covers at least this much more of the recent tokens."""
    vocab_half_life_tokens: int = 16384
    """Recent traffic: token counts halve every this many (weighted) tokens counted."""
    vocab_prompt_weight: float = 0.25
    """Weight of a prompt token against an emitted one in the counts."""

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "prompt_bases", "depth", "grad_accum", "replay_ratio", "vocab_refresh_every",
                     "vocab_half_life_tokens"):
            if getattr(self, name) < (0 if name in ("warmup_steps", "prompt_bases", "vocab_refresh_every") else 1):
                raise ValueError(f"LearnerConfig.{name}={getattr(self, name)} is out of range")
        if not 0 <= self.vocab_refresh_min_gain <= 1 or self.vocab_prompt_weight < 0:
            raise ValueError(f"LearnerConfig.vocab_refresh_min_gain={self.vocab_refresh_min_gain} must be in [0, 1] "
                             f"and vocab_prompt_weight={self.vocab_prompt_weight} >= 0")
        if not self.lr > 0:
            raise ValueError(f"LearnerConfig.lr must be > 0, got {self.lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"LearnerConfig.grad_clip={self.grad_clip} and weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"LearnerConfig.betas={self.betas} must be two numbers in [0, 1)")
        get_algorithm(self.algorithm)  # unknown names fail here, listing the valid ones
        if self.dtype not in LEARNER_DTYPES:
            raise ValueError(f"LearnerConfig.dtype={self.dtype!r}; choose one of {list(LEARNER_DTYPES)}")
        self.betas = tuple(self.betas)


class Learner:
    def __init__(self, draft: Eagle3Draft, target_head: torch.Tensor, config: LearnerConfig | None = None,
                 policy_version: int = 0) -> None:
        self.config = cfg = config or LearnerConfig()
        self.algorithm = get_algorithm(cfg.algorithm)
        self.algo_cfg = self.algorithm.make_config(**cfg.algorithm_args)
        # A private float32 copy: the caller's (serving) draft must only change through published weights.
        self.draft = copy.deepcopy(draft).to_dtype(torch.float32).train()
        self.target_head = target_head.detach().float()
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.step = 0
        self.policy_version = policy_version
        self.updates = 0
        self.vocab = (VocabTracker(draft.config.vocab_size, cfg.vocab_half_life_tokens, cfg.vocab_prompt_weight)
                      if cfg.vocab_refresh_every and cfg.algorithm != "frozen" else None)
        """Counts for the vocabulary refresh; none for ``frozen``, whose draft stays what it was, vocabulary too."""
        self.vocab_refreshes = 0
        self.autocast = resolve_dtype(cfg.dtype) == torch.bfloat16
        """bf16 autocast of the TTT forward (``dtype``), resolved once for this machine."""

    def _lr(self) -> float:
        c = self.config
        return c.lr * min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps else c.lr

    def update(self, traces: list[Trace]) -> dict[str, float]:
        """One or more optimizer steps on ``traces``; returns metrics (averaged over passes)."""
        t0 = time.perf_counter()
        cfg = self.config
        self.updates += 1
        vocab_metrics = self._track_vocab(traces) if self.vocab is not None else {}
        chunks = [traces[i::cfg.grad_accum] for i in range(min(cfg.grad_accum, len(traces)))]
        # Seeded by the step, so a resumed or repeated run samples the same prompt rows.
        gen = torch.Generator().manual_seed(self.step)
        batches = [collate(c, self.draft, self.target_head, cfg.depth, cfg.prompt_bases, gen) for c in chunks]
        totals: dict[str, float] = {}
        stepped = False
        for _ in range(cfg.replay_ratio):
            metrics = self._step(batches)
            stepped |= bool(metrics.pop("learner/stepped"))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.replay_ratio
        if stepped:
            # One new policy version per batch of traces (what the actor publishes), however many
            # optimizer passes it took: lag is then counted in published versions, not in steps.
            self.policy_version += 1
        totals["learner/policy_version"] = float(self.policy_version)
        tokens = sum(b.num_tokens for b in batches) * cfg.replay_ratio
        totals["learner/trained_tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
        totals["learner/traces"] = float(len(traces))
        # Traces with no logged verify steps (SGLang's, recomputed) add no proposal rows: the terms
        # built on proposals (acceptance reward, off-policy correction) get nothing from them.
        totals["learner/traces_without_proposals"] = float(sum(t.verify_steps == 0 for t in traces))
        totals.update(vocab_metrics)
        return totals

    def _track_vocab(self, traces: list[Trace]) -> dict[str, float]:
        """Count the traces' tokens; every ``vocab_refresh_every`` updates, remap the draft vocabulary
        when the recent traffic's most frequent tokens cover enough more (before this batch is collated,
        so it trains on the new rows)."""
        cfg = self.config
        self.vocab.observe(traces)
        if self.updates % cfg.vocab_refresh_every:
            return {}
        best = self.vocab.propose(self.draft)
        metrics = {"vocab/coverage": best.current_coverage, "vocab/best_coverage": best.coverage}
        if best.gain >= cfg.vocab_refresh_min_gain and best.gain > 0:
            head = self.draft.lm_head.weight
            old_rows = self.draft.target_to_draft(best.target_ids)
            metrics["vocab/new_tokens"] = float(self.draft.remap_vocab(best.target_ids, head_rows=self.target_head))
            if head in self.optimizer.state:
                remap_moments(self.optimizer.state[head], old_rows)
            self.vocab_refreshes += 1
            log.info("draft vocabulary refreshed: %d new tokens, coverage of recent traffic %.3f -> %.3f",
                     int(metrics["vocab/new_tokens"]), best.current_coverage, best.coverage)
        metrics["vocab/refreshes"] = float(self.vocab_refreshes)
        return metrics

    def _step(self, batches) -> dict[str, float]:
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {"learner/stepped": 0.0}
        total_tokens = max(sum(b.num_tokens for b in batches), 1)
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logits = unroll(self.draft, batch.ttt, self.config.depth)
            out = self.algorithm.loss(batch.loss_batch(logits, self.policy_version), self.algo_cfg)
            share = batch.num_tokens / total_tokens
            if out.loss.requires_grad:
                # Weight micro-batches by their tokens so accumulation equals one big batch.
                (out.loss * share).backward()
            for k, v in out.metrics.items():
                # Counts add up over micro-batches; rates and means are weighted by their token share.
                metrics[k] = metrics.get(k, 0.0) + (v if k in COUNT_METRICS else v * share)
            metrics["offpolicy/future_versions"] = metrics.get("offpolicy/future_versions", 0.0) + \
                float((batch.proposal_version > self.policy_version).sum())
        if any(p.grad is not None for p in self.params):
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip or math.inf)
            metrics["learner/grad_norm"] = float(norm)
            if math.isfinite(float(norm)):
                self.optimizer.step()
                self.step += 1
                metrics["learner/stepped"] = 1.0
            else:
                metrics["learner/skipped_nonfinite"] = 1.0
                log.warning("skipped an update with non-finite gradient norm %s", norm)
        metrics["learner/lr"] = lr
        metrics["learner/step"] = float(self.step)
        return metrics

    def publishable_state(self) -> dict[str, torch.Tensor]:
        """Trainable draft weights, plus the vocabulary maps ``d2t``/``t2d`` when the learner may refresh
        the vocabulary (the frozen embedding stays put on the serving side)."""
        state = {n: p.detach().clone() for n, p in self.draft.named_parameters() if p.requires_grad}
        if self.vocab is not None:
            state.update(d2t=self.draft.d2t.clone(), t2d=self.draft.t2d.clone())
        return state
