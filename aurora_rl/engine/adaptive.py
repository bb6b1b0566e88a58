"""Adaptive lookahead: pick each step's k from measured acceptance and measured step cost, for tokens/s.

Plugged into a ``SpecDecoder`` with ``AdaptiveLookahead(K).attach(decoder)``: the controller becomes the
decoder's ``lookahead_fn`` and wraps its ``decode`` to time every step and read the step's deltas of
the decoder's per-depth counters. ``detach`` (or ``decoder.lookahead_fn = None``) switches it off and
the decoder's fixed ``SpecConfig.lookahead`` applies again. Requests that set ``lookahead`` themselves
(evaluations at a fixed k) keep it.

Model, per batch size B and lookahead k in 0..K (one k for the whole batch):

- Acceptance: alpha_j, the probability that the depth-j proposal is accepted given that depth j-1
  was. From discounted per-depth counts (P_j proposed, A_j accepted; discount 1 - 1/horizon per step
  that proposed at depth j, and capped at ``max_evidence`` proposals so that a past of large batches
  cannot outweigh new evidence for long): alpha_j = (A_j + w*pi_j) / (P_j * p_{j-1} + w), with
  p_{j-1} = A_{j-1}/P_{j-1} the measured rate of reaching depth j-1, shrunk toward pi_1 =
  ``prior_acceptance`` and, deeper, pi_j = alpha_{j-1} (a geometric tail where nothing was measured).
  Expected tokens per step: E[k] = 1 + sum_{j<=k} prod_{l<=j} alpha_l.
- Cost: wall time of ``decode`` (propose, verify k+1, draft extend) as an EMA per (B bucket, k),
  buckets being powers of two of B, each step counted at most at twice the cell's mean (a stalled
  step is not the cost of its k: ``lookahead_model.capped_step_time``). An unmeasured k is extrapolated from the nearest measured k with
  the bucket's least-squares slope (clamped >= 0; when only one k is measured, a prior slope of
  ``prior_slope`` x B x the step time, at most ``max_prior_slope``: each lookahead token adds B
  verified tokens, nearly free while a step is bound by reading the weights and as dear as the step
  itself once it is bound by compute), an unmeasured bucket borrows the nearest measured bucket's
  curve. Only ratios between ks matter, so borrowed absolute times do no harm, as long as a curve is
  borrowed whole: copy steps' cells are taken from the bucket whose k = 0 cell is used, or not at all
  (spliced, batch-1 copy times beside a batch-16 plain step made copying look four times cheaper
  than it is, and the tree controller's copy model copied at batch 16). Predicted costs never
  fall with k: a larger k timed below a smaller one is noise, and must not buy speculation.
- Choice: k* = argmax_k B*E[k]/t(B, k); B cancels. Ties within ``min_gain`` go to the smaller k,
  so timing noise never buys speculation that does not pay: with a useless draft (alpha ~ 0, E[k] ~ 1)
  and t growing with k the answer is k = 0 at every batch size.
- Exploration: the point estimate starts pessimistic (``prior_acceptance`` 0: no speculation until
  acceptance is measured), so a cold controller never pays for speculation on faith, at any batch
  size. Until ``probe_evidence`` depth-1 proposals have been seen, a step that chose k = 0 lets one
  row (the lowest slot) propose a single token: a probe that measures acceptance for the price of one
  more verified token, at any batch size. With probability eps = max(eps_min, eps0 * d / (d + steps))
  a step uses a neighbour k* +- 1. A step up to k* + 1 is only taken while it could still pay: its
  throughput with optimistic acceptance (an upper confidence bound, alpha + 2 sd + 1/n over the n
  proposals remembered at each depth) must beat k*'s. So a draft shown to be useless stops costing exploration steps, while a good
  one is adopted within a few exploration steps (unmeasured deeper depths inherit the measured
  alpha, so one measured depth is enough to jump to a large k), and a new draft is noticed: when the
  decoder's policy version changes (a hot swap), the acceptance evidence is halved (``forget``), the
  bound widens and exploration resumes.

Context copies (``SpecConfig.context_copy``): the decoder says which rows can copy this step; those
rows get their own k, ``choose_copy``, from the copies' own per-depth acceptance (prior
``copy_prior_acceptance``, never forgotten on a draft swap: copies do not depend on the draft) and
the step times of steps where every row copied (no draft pass; their k = 0 cell is the shared one),
explored as the draft's k is (a deeper copy's step time is only measured once one is tried).
A copy is right far more often than the day-0 draft (87% where 4 tokens matched, on ShareGPT code),
so copying rows speculate deep while drafting rows in the same batch may not speculate at all.

Not modelled: engine time outside ``decode`` (scheduling, prefill), which only makes the choice
conservative; greedy and sampled requests share one acceptance model. ``SpecDecoder`` feeds the
draft lazily, so a step at k = 0 runs no draft work and costs what plain decoding costs; the first step
at k > 0 after a run of k = 0 steps (or of copying steps) pays for the queued positions in one batched
draft call. That catch-up is charged to the step that triggers it, as ``AdaptiveTreeBudget`` charges
it: it is the price of switching between drafting and not drafting, which a controller that alternates
pays on every switch. (Left out, the tree controller believed a budget paid that ran at 0.81x of plain
decoding; once a k > 0 is adopted the queue stays short and so does the charge.)
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

from aurora_rl.engine.lookahead_model import (acceptance_rates, best_lookahead, bucket, capped_step_time,
                                              expected_tokens, nearest_bucket, nearest_cells, predict_costs)
from aurora_rl.engine.sequence import Sequence

__all__ = ["AdaptiveConfig", "AdaptiveLookahead", "acceptance_rates", "best_lookahead", "expected_tokens",
           "predict_costs"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AdaptiveConfig:
    """Settings of the adaptive lookahead controller (the defaults suit a CPU or a GPU engine)."""

    prior_acceptance: float = 0.0
    """Acceptance assumed at depth 1 before any measurement. 0 = start without speculation and let
    exploration (bounded by the optimistic acceptance) find out whether it pays."""
    prior_weight: float = 2.0
    """Pseudo-proposals behind the prior at each depth."""
    prior_slope: float = 0.1
    """Assumed extra step time per lookahead token, as a fraction of the k = 0 step, before it is measured."""
    cpu_prior_slope: float = 0.2
    """``prior_slope`` of a controller attached to a decoder on CPU, where a verify pass is bound by
    compute once it has a few rows (measured on an AVX2 EPYC, SmolLM2 in float32, 300 tokens of context,
    session 7's kernels: each extra token per row costs 0.10 of a one-token step at batch 1 and 0.40 at
    batch 4, i.e. 0.10 x B). The prior is batch-scaled and capped; 0.2 errs on the dear side on purpose:
    0.12 explored more at batch 4 and gained nothing measurable (``experiments/results/table_s7_prior``)."""
    max_prior_slope: float = 1.0
    """Cap of the batch-scaled prior slope (1.0: a lookahead token costs at most one more step)."""
    cpu_max_prior_slope: float = 1.0
    """``max_prior_slope`` on CPU. Measured, a uniform k = 1 step on the default Q4_1 target (AVX-512 EPYC,
    300 tokens of context) cost 1.11x / 1.50x / 1.49x / 1.54x a plain step at batch 1 / 4 / 8 / 16
    (``experiments/results/batch_verify_s16``), so 0.6 would match; but with 0.6 the controller copied at
    batch 8, 48% of copied tokens accepted where a token costs 0.65 of a plain one, and decoded at 0.92x
    against 1.03x for k = 0 + copy in the same run (``experiments/results/tree_s16_cap06``). A step where
    some rows copy is priced as the uniform k verifying as many tokens, rounded (one row copying 4 at
    batch 8 lands in the k = 0 cell), which undercounts what copying costs; until mixed steps are priced
    by their tokens, the dear prior keeps copies off where they cannot pay."""
    horizon: int = 200
    """Steps of memory of the acceptance counts (per-step discount 1 - 1/horizon), to follow a learning draft."""
    max_evidence: float = 400.0
    """Most proposals the acceptance estimate at one depth remembers (bounds the inertia of big batches)."""
    cost_horizon: int = 50
    """Steps of memory of each (batch bucket, k) step-time average."""
    epsilon: float = 0.1
    """Initial probability of an exploration step at k* +- 1."""
    epsilon_min: float = 0.02
    """Exploration floor (never decays below): keeps acceptance at k* + 1 measured."""
    epsilon_decay_steps: int = 100
    """Steps over which exploration halves: eps = max(eps_min, eps0 * d / (d + steps))."""
    min_gain: float = 0.05
    """Relative throughput gain a larger k must promise over a smaller one to be chosen."""
    probe_evidence: float = 8.0
    """Depth-1 proposals to gather by single-row probes while k* = 0 (0 = no probes)."""
    copy_prior_acceptance: float = 0.5
    """Acceptance assumed at depth 1 for context copies before any is measured (copies cost no draft
    pass and were right about half the time on ShareGPT code; a wrong prior is corrected within a few
    steps, since every copying step measures it)."""
    seed: int = 0
    """Seed of the exploration draws."""

    def __post_init__(self) -> None:
        for name in ("prior_acceptance", "copy_prior_acceptance", "epsilon", "epsilon_min"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("prior_weight", "prior_slope", "cpu_prior_slope", "max_prior_slope", "cpu_max_prior_slope",
                     "min_gain", "probe_evidence"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.max_evidence <= 0:
            raise ValueError(f"max_evidence={self.max_evidence} must be > 0")
        for name in ("horizon", "cost_horizon", "epsilon_decay_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


class AdaptiveLookahead:
    """Chooses each step's lookahead in 0..max_lookahead; a ``SpecDecoder.lookahead_fn`` (see module doc)."""

    splits_copies = True
    """The decoder tells which rows can copy from their context; they get their own k (``choose_copy``)."""

    def __init__(self, max_lookahead: int, config: AdaptiveConfig | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if max_lookahead < 0:
            raise ValueError(f"max_lookahead must be >= 0, got {max_lookahead}")
        self.max_lookahead = max_lookahead
        self.config = config or AdaptiveConfig()
        self.clock = clock
        self.steps = 0
        self.copy_steps = 0
        """Steps that chose a k for copying rows."""
        self.explored = 0
        self.probes = 0
        self.last_k = 0
        self._cost_k: int | None = -1
        """Cost cell of the step being chosen (set by ``__call__``; -1: take the deepest proposal)."""
        self._rng = random.Random(self.config.seed)
        self._proposed = [0.0] * max_lookahead
        self._accepted = [0.0] * max_lookahead
        self._cproposed = [0.0] * max_lookahead
        self._caccepted = [0.0] * max_lookahead
        """Per-depth counts of context copies (``SpecConfig.context_copy``), kept apart from the draft's."""
        self._cost: dict[int, dict[int, list[float]]] = {}
        """bucket -> k -> [mean seconds, count], steps that ran the draft (or k = 0)."""
        self._ccost: dict[int, dict[int, list[float]]] = {}
        """The same for steps whose proposals were all copied (no draft pass)."""
        self._cost_copy = False
        self.last_copy_k = 0
        self.prior_slope, self.max_prior_slope = self.config.prior_slope, self.config.max_prior_slope
        """The cost prior in use, and its cap: the ``cpu_`` ones once attached to a decoder on CPU."""

    # ---- the model ------------------------------------------------------------------------------
    def alphas(self) -> list[float]:
        cfg = self.config
        return acceptance_rates(self._proposed, self._accepted, cfg.prior_acceptance, cfg.prior_weight)

    def copy_alphas(self) -> list[float]:
        cfg = self.config
        return acceptance_rates(self._cproposed, self._caccepted, cfg.copy_prior_acceptance, cfg.prior_weight)

    def costs(self, batch: int, copy: bool = False) -> list[float]:
        """Predicted step time for k = 0..K at this batch size (from the nearest measured bucket); with
        ``copy``, of steps whose proposals are all copied (their k = 0 cell is the shared one)."""
        cells = nearest_cells(self._cost, batch)
        if copy:  # one bucket's curve, never spliced: another bucket's copy times beside this k = 0 mean nothing
            b = nearest_bucket(self._cost, batch)
            copied = nearest_cells(self._ccost, batch) if b is None else dict(self._ccost.get(b, {}))
            cells = {**({0: cells[0]} if 0 in cells else {}), **{k: (m, n) for k, (m, n) in copied.items()}}
        costs = predict_costs(cells, self.max_lookahead, min(self.prior_slope * batch, self.max_prior_slope))
        # Proposing more never makes a step cheaper: a k measured below a smaller one is timing noise.
        for k in range(1, len(costs)):
            costs[k] = max(costs[k], costs[k - 1])
        return costs

    def plain_step_time(self, batch: int) -> float | None:
        """The measured k = 0 step time in this batch size's own bucket (None: not measured there)."""
        cell = self._cost.get(bucket(batch), {}).get(0)
        return cell[0] if cell and cell[1] else None

    def optimistic_alphas(self, alphas: list[float] | None = None, proposed: list[float] | None = None) -> list[float]:
        """Upper confidence bounds of the per-depth acceptance (alpha + 2 sd + 1/n, capped at 1); the
        draft's by default, or of the given rates and (discounted) proposal counts."""
        out = []
        for a, n in zip(self.alphas() if alphas is None else alphas, self._proposed if proposed is None else proposed):
            n = n + self.config.prior_weight
            out.append(min(1.0, a + 2.0 * math.sqrt(a * (1.0 - a) / n) + 1.0 / n))
        return out

    def choose_copy(self, batch: int) -> int:
        """The k for rows that copy from their context: the copies' own acceptance over copy-step costs.
        Explored like the draft's k (a neighbour with probability eps, a deeper one only while it could
        pay): each copying step measures acceptance to the depth it proposed, but the step time of a
        deeper copy is only known once one is tried, and the cost prior is pessimistic by design."""
        cfg = self.config
        costs = self.costs(batch, copy=True)
        alphas = self.copy_alphas()
        k = best_lookahead(alphas, costs, cfg.min_gain)
        self.copy_steps += 1
        k = self._explore(k, costs, alphas, self._cproposed, self.copy_steps)
        self.last_copy_k = k
        return k

    def forget(self, fraction: float = 0.5) -> None:
        """Drop ``fraction`` of the acceptance evidence (the draft changed; costs still hold)."""
        keep = 1.0 - fraction
        self._proposed = [x * keep for x in self._proposed]
        self._accepted = [x * keep for x in self._accepted]

    def _may_pay(self, k_up: int, k_best: int, costs: list[float], alphas: list[float],
                 proposed: list[float]) -> bool:
        """Could k_up beat k_best if acceptance were at its optimistic bound?"""
        return (expected_tokens(self.optimistic_alphas(alphas, proposed), k_up) / costs[k_up] >
                expected_tokens(alphas, k_best) / costs[k_best])

    def _explore(self, k: int, costs: list[float], alphas: list[float], proposed: list[float], steps: int) -> int:
        """With probability eps (decaying with ``steps``), a neighbour of the model's best k: a smaller
        one always, a larger one only while ``_may_pay``."""
        cfg, K = self.config, self.max_lookahead
        eps = max(cfg.epsilon_min, cfg.epsilon * cfg.epsilon_decay_steps / (cfg.epsilon_decay_steps + steps))
        if K > 0 and self._rng.random() < eps:
            other = 1 if k == 0 else K - 1 if k == K else k + self._rng.choice((-1, 1))
            if other < k or self._may_pay(other, k, costs, alphas, proposed):
                self.explored += 1
                return other
        return k

    def expected_tokens_per_s(self, batch: int, k: int) -> float:
        return batch * expected_tokens(self.alphas(), k) / self.costs(batch)[k]

    # ---- acting and observing -------------------------------------------------------------------
    def choose(self, batch: int) -> int:
        """This step's k: the model's best, or with probability eps a neighbour of it."""
        costs, alphas = self.costs(batch), self.alphas()
        k = best_lookahead(alphas, costs, self.config.min_gain)
        k = self._explore(k, costs, alphas, self._proposed, self.steps)
        self.steps += 1
        if k != self.last_k:
            log.debug("lookahead %d -> %d at batch %d", self.last_k, k, batch)
        self.last_k = k
        return k

    def __call__(self, seqs: list[Sequence], copyable: list[bool] | None = None) -> list[int]:
        if not seqs:
            return []
        copyable = copyable or [False] * len(seqs)
        free = [i for i, s in enumerate(seqs) if s.params.lookahead is None]
        drafting = [i for i in free if not copyable[i]]
        k = self.choose(len(seqs)) if drafting or len(free) < len(seqs) else self.last_k
        kc = self.choose_copy(len(seqs)) if len(drafting) < len(free) else 0
        ks = [s.params.lookahead if s.params.lookahead is not None else kc if copyable[i] else k
              for i, s in enumerate(seqs)]
        probe = k == 0 and drafting and self.max_lookahead > 0 and self._proposed[0] < self.config.probe_evidence
        if probe:
            ks[min(drafting, key=lambda i: seqs[i].slot)] = 1
            self.probes += 1
        copying = [i for i in free if copyable[i]]
        if kc == 0 and copying and self.max_lookahead > 0 and self._cproposed[0] < self.config.probe_evidence:
            ks[min(copying, key=lambda i: seqs[i].slot)] = 1  # copies need measuring too
            self.probes += 1
            probe = True
        # The cost cell this step feeds: its k when all rows share it; when rows differ (a probe, copying
        # and drafting rows), the k whose uniform step verifies as many tokens as this one did (the
        # runner packs rows of different lengths, or pads them to the longest: see ``observe``'s caller),
        # so a B > 1 probe is priced as k = 0 and a B = 1 probe as k = 1; in the copy cells when no row
        # ran the draft; none when requests pinned other lookaheads.
        drafts = any(ks[i] > 0 for i in drafting)
        self._cost_copy = not drafts
        if len(set(ks)) == 1:
            self._cost_k = ks[0]
        elif len(free) < len(seqs):
            self._cost_k = None
        else:
            self._cost_k = _MIXED
        return ks

    def observe(self, batch: int, k: int | None, seconds: float, proposed: list[int], accepted: list[int],
                copy_proposed: list[int] | None = None, copy_accepted: list[int] | None = None,
                copy_step: bool = False) -> None:
        """Record one step: batch size, the lookahead whose cost it measured, its wall time, per-depth
        counts of all proposals and of the copied ones among them (the draft's are the difference).
        ``k`` None (rows used different ks: requests with their own lookahead) adds to the acceptance
        counts only: the cost cells model one k for the whole batch. ``copy_step``: every proposal was
        copied (no draft pass), timed in the copy cells."""
        if batch < 1 or (k is not None and k < 0) or seconds <= 0:
            raise ValueError(f"observe needs batch >= 1, k >= 0, seconds > 0; got {batch}, {k}, {seconds}")
        cp = copy_proposed or [0] * len(proposed)
        ca = copy_accepted or [0] * len(accepted)
        self._add_counts(self._proposed, self._accepted, [p - c for p, c in zip(proposed, cp)],
                         [a - c for a, c in zip(accepted, ca)])
        self._add_counts(self._cproposed, self._caccepted, cp, ca)
        if k is not None and k <= self.max_lookahead:
            table = self._ccost if copy_step and k > 0 else self._cost
            cell = table.setdefault(bucket(batch), {}).setdefault(k, [0.0, 0])
            seconds = capped_step_time(cell[0], cell[1], seconds)
            cell[1] += 1
            cell[0] += (seconds - cell[0]) / min(cell[1], self.config.cost_horizon)

    def _add_counts(self, prop: list[float], acc: list[float], proposed: list[int], accepted: list[int]) -> None:
        keep, cap = 1.0 - 1.0 / self.config.horizon, self.config.max_evidence
        for j in range(min(len(proposed), self.max_lookahead)):
            if proposed[j] > 0:
                p = keep * prop[j] + proposed[j]
                a = keep * acc[j] + accepted[j]
                scale = min(1.0, cap / p)
                prop[j], acc[j] = p * scale, a * scale

    # ---- plugging into a decoder ----------------------------------------------------------------
    def price_for(self, decoder) -> None:
        """Take the cost priors of the device ``decoder``'s draft runs on (the ``cpu_`` ones on CPU)."""
        if next(decoder.draft.parameters()).device.type == "cpu":
            self.prior_slope, self.max_prior_slope = self.config.cpu_prior_slope, self.config.cpu_max_prior_slope

    def attach(self, decoder) -> "AdaptiveLookahead":
        """Become ``decoder.lookahead_fn`` and time its ``decode`` steps; returns the controller."""
        if not hasattr(decoder, "depth_proposed"):
            raise ValueError(f"{type(decoder).__name__} has no depth counters; attach to a SpecDecoder")
        if "decode" in vars(decoder):
            raise ValueError("decoder already has a wrapped decode (attached twice?)")
        inner = decoder.decode
        self.price_for(decoder)

        self._version = getattr(decoder, "policy_version", None)

        def decode(engine, seqs: list[Sequence]) -> None:
            version = getattr(decoder, "policy_version", None)
            if version != self._version:  # a hot-swapped draft: what we know of its acceptance is stale
                self._version = version
                self.forget(0.5)
            p0, a0 = list(decoder.depth_proposed), list(decoder.depth_accepted)
            cp0 = list(getattr(decoder, "copy_depth_proposed", []))
            ca0 = list(getattr(decoder, "copy_depth_accepted", []))
            t0 = self.clock()
            inner(engine, seqs)
            seconds = self.clock() - t0  # the draft catch-up this step triggered included (module doc)
            dp, da = counter_deltas(decoder.depth_proposed, p0), counter_deltas(decoder.depth_accepted, a0)
            dcp = counter_deltas(getattr(decoder, "copy_depth_proposed", []), cp0)
            dca = counter_deltas(getattr(decoder, "copy_depth_accepted", []), ca0)
            dcp, dca = dcp + [0] * (len(dp) - len(dcp)), dca + [0] * (len(da) - len(dca))
            # A proposal at depth j implies one at every shallower depth: k is the deepest proposed.
            deepest = sum(1 for x in dp if x > 0)
            cost_k, self._cost_k = self._cost_k, -1
            if cost_k == _MIXED:  # priced by the tokens the verify pass ran, per row
                rows = getattr(getattr(engine, "runner", None), "last_rows", None)
                cost_k = min(max(round(rows / len(seqs)) - 1, 0), self.max_lookahead) if rows else -1
            if cost_k == -1 or (cost_k is not None and cost_k > deepest):
                cost_k = deepest  # not chosen here, or the room left cut the proposals short
            copy_step, self._cost_copy = self._cost_copy and sum(dcp) == sum(dp), False  # no drafted proposal
            self.observe(len(seqs), cost_k, max(seconds, 1e-9), dp, da, dcp, dca, copy_step)

        decoder.decode = decode
        decoder.lookahead_fn = self
        return self

    def detach(self, decoder) -> None:
        """Switch off: the decoder's fixed lookahead and unwrapped ``decode`` again."""
        vars(decoder).pop("decode", None)
        if decoder.lookahead_fn is self:
            decoder.lookahead_fn = None


_MIXED = -2
"""``_cost_k`` of a step whose rows use different ks: its cell is set from the tokens it verified."""


def counter_deltas(now: list[int], before: list[int]) -> list[int]:
    """Per depth, what a decoder's counter gained since ``before`` (a copy taken before the step)."""
    return [n - (before[j] if j < len(before) else 0) for j, n in enumerate(now)]
