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
import torch

from algorithms import get_algorithm
from aurora_rl.engine.trace import Trace
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.dtypes import resolve_dtype
from aurora_rl.training.learner_config import LearnerConfig
from aurora_rl.training.batching import collate
from aurora_rl.training.ttt import unroll
from aurora_rl.training.vocab import VocabTracker, remap_moments

log = logging.getLogger(__name__)

COUNT_METRICS = frozenset({
    "offpolicy/dropped_stale", "offpolicy/deterministic_steps", "offpolicy/num_proposal_tokens",
    "offpolicy/future_versions", "data/num_tokens", "data/num_rows", "data/num_steps", "osd/num_rejected",
})
"""Metrics that are counts per batch: summed over micro-batches (the same in every replay pass)."""


class Learner:
    """The draft learner; ``algorithm`` (one of ``algorithms.list_algorithms()``) with ``algorithm_args``
    (fields of its config dataclass) is the learning rule, ``config`` the optimisation and batching."""

    def __init__(self, draft: Eagle3Draft, target_head: torch.Tensor, config: LearnerConfig | None = None,
                 policy_version: int = 0, algorithm: str = "aurora", algorithm_args: dict | None = None) -> None:
        self.config = cfg = config or LearnerConfig()
        self.algorithm = get_algorithm(algorithm)
        self.algorithm_args = dict(algorithm_args or {})
        self.algo_cfg = self.algorithm.make_config(**self.algorithm_args)
        # A private float32 copy: the caller's (serving) draft must only change through published weights.
        self.draft = copy.deepcopy(draft).to_dtype(torch.float32).train()
        self.target_head = target_head.detach().float()
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.step = 0
        self.policy_version = policy_version
        self.updates = 0
        self._changed = False
        """Weights changed since the last new version."""
        self.vocab = (VocabTracker(draft.config.vocab_size, cfg.vocab_half_life_tokens, cfg.vocab_prompt_weight)
                      if cfg.vocab_refresh_every and algorithm != "frozen" else None)
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
        self._changed |= stepped
        if self._changed and self.updates % cfg.publish_every == 0:
            # One new policy version per published batch (``publish_every``), however many optimizer
            # passes it took: lag is then counted in published versions, not in optimizer steps.
            self.policy_version += 1
            self._changed = False
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
