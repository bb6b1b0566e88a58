"""Adaptive tree budget: pick each step's token-tree size from measured acceptance and measured step cost.

The tree counterpart of ``AdaptiveLookahead`` (``aurora_rl.engine.adaptive``), for a ``SpecDecoder``
that proposes trees (``SpecConfig.tree_topk`` > 0): ``AdaptiveTreeBudget(budgets).attach(decoder)``
becomes the decoder's budget picker and times every step. One budget for the whole batch, chosen from
``budgets`` (0 = no speculation, which costs what plain decoding costs: the draft is fed lazily).

Model, per budget n: tokens per row and step E[n] = 1 + accepted tokens per row-step, a discounted mean
over the steps that ran at n (acceptance does not depend on the batch size); cost t(B, n) = the wall
time of ``decode`` as an EMA per batch bucket (powers of two), a step counted at most at twice the
cell's mean (``lookahead_model.capped_step_time``: one stalled plain step once made trees look cheaper
than plain decoding), the draft catch-up included: a step
that drafts after budget-0 steps pays to feed their positions to the draft first, and that is the
price of switching back and forth (left out, a controller alternating 0 and 4 ran at 0.81x of plain
decoding on the quantized target while it believed budget 4 paid). Choice: n* = argmax E[n] / t(B, n), ties within ``min_gain`` to the smaller
budget, so noise never buys speculation that does not pay. Exploration: every budget is tried
``probe_steps`` times per bucket before the first choice (E starts at 1, as if nothing were accepted),
then with probability ``epsilon`` a step takes a neighbouring budget: a smaller one always, a larger one
only while it could still pay, i.e. while its tokens per second with optimistic acceptance (an upper
confidence bound: mean + 2 sd / sqrt(n) + 1 / n over the n row-steps remembered at that budget) beat the
chosen budget's.

At batch B > 1 the first tries are probes: one row (the lowest slot) gets the budget, the others run
plain. Acceptance is a row's and does not depend on B, so a probe measures it at the price of one row's
tree, where a whole batch of trees cost 3-4 plain steps each at batch 8 (session 12's table: the three
tries per budget cost the adaptive tree 0.88x at batch 8). Until a budget has run on the whole batch its
cost there is predicted from the probes: t(B, n) = t(B, 0) + B (t_probe(B, n) - t(B, 0)), each row's
tree costing what the probed row's did; a budget is run on the whole batch only once that prediction,
with optimistic acceptance, says it could pay, and from then on its measured cost counts. So a draft shown not to pay stops costing exploration steps (an unconditional 3% of
steps at a budget that costs three plain steps was a 6% loss, and the controller ran at 0.92x-0.95x of
plain decoding); a hot swap of the draft (a new policy version) halves the acceptance evidence, which
widens the bound and lets exploration resume.

Copies (a decoder with ``context_copy``): at budget 0 a row whose context offers a copy may still
verify that copy alone, a chain with no draft pass, which is where copies pay at batch 1 (a chain
decoder's adaptive lookahead gets its gains there from copies, with a draft that does not pay). Whether
and how deep is the copy side of ``AdaptiveLookahead`` (``copy_model``: the copies' own per-depth
acceptance over the step times of copy-only steps, against plain steps at this batch size, probes and
exploration included). Copy-only steps are timed in that model alone; the budgets' cells keep plain
steps at budget 0, so a tree budget is chosen only where it beats plain decoding (a conservative
comparison: not against plain decoding with copies). At a budget above 0 the copy goes into each tree
as its first branch, as before; a row whose copy fills the budget runs no draft, and it does not count
as the budget's evidence: its accepted copy, credited to the tree, made trees look as if they paid (at
batch 8 on 150-token answers the controller then ran trees at 1.29x plain decoding's time per token).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from aurora_rl.engine.adaptive import AdaptiveLookahead, counter_deltas
from aurora_rl.engine.lookahead_model import bucket, capped_step_time
from aurora_rl.engine.sequence import Sequence


@dataclass(slots=True)
class TreeBudgetConfig:
    """Settings of the adaptive tree-budget controller."""

    probe_steps: int = 3
    """Steps each budget runs per batch bucket before the controller chooses."""
    epsilon: float = 0.03
    """Probability that a step tries a budget next to the chosen one."""
    horizon: int = 200
    """Acceptance evidence decays by 1 - 1/horizon per step at that budget."""
    cost_ema: float = 0.2
    """Weight of the newest step time in a cell's EMA."""
    min_gain: float = 0.02
    """A larger budget must promise this relative gain in tokens/s to be chosen."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.probe_steps < 1 or not 0 <= self.epsilon < 1 or self.horizon < 1 or not 0 < self.cost_ema <= 1:
            raise ValueError(f"need probe_steps >= 1, 0 <= epsilon < 1, horizon >= 1, 0 < cost_ema <= 1; got {self}")


def quarter_budgets(budget: int) -> list[int]:
    """0 and the quarters of ``budget`` (distinct, >= 1): the sizes a controller chooses among by default."""
    return sorted({0} | {max(1, round(budget * q / 4)) for q in (1, 2, 3, 4)} if budget > 0 else {0})


class AdaptiveTreeBudget:
    """Chooses each step's tree budget among ``budgets``; a ``SpecDecoder.lookahead_fn`` (module doc)."""

    picks_tree_budget = True
    splits_copies = True
    """The decoder passes each row's copy length (0: none); see "Copies" in the module doc."""

    def __init__(self, budgets: list[int], config: TreeBudgetConfig | None = None) -> None:
        if not budgets or min(budgets) < 0:
            raise ValueError(f"budgets must be a non-empty list of sizes >= 0, got {budgets}")
        self.budgets = sorted(set(budgets) | {0})
        self.config = config or TreeBudgetConfig()
        self.rng = random.Random(self.config.seed)
        self.tokens = {n: [0.0, 0.0, 0.0] for n in self.budgets}
        """Per budget: discounted (accepted tokens, row-steps, sum over row-steps of accepted squared)."""
        self.cost: dict[int, dict[int, list[float]]] = {}
        """Per batch bucket and budget: [EMA seconds, steps measured] of steps at that budget on every row."""
        self.probe_cost: dict[int, dict[int, list[float]]] = {}
        """The same for probe steps (one row at the budget, the others at 0; batch > 1 only)."""
        self.probes = 0
        """Probe steps taken."""
        self.probing = False
        """Whether the budget ``choose`` returned last is a probe (one row at it)."""
        self.chosen: list[int] = []
        """The budget of every step (for reports)."""
        self._pending: int | None = None
        self._version = None
        self.explored = 0
        """Exploration steps taken (a budget other than the chosen one)."""
        self.copy_model: AdaptiveLookahead | None = None
        """Whether and how deep rows copy at budget 0 (set by ``attach`` for a decoder that copies)."""
        self.copy_steps = 0
        """Budget-0 steps in which some row verified a copy."""

    def expected_tokens(self, n: int) -> float:
        acc, steps, _ = self.tokens[n]
        return 1.0 + (acc / steps if steps > 0 else 0.0)

    def optimistic_tokens(self, n: int) -> float:
        """Upper confidence bound of tokens per row-step at budget ``n`` (module doc); ``n`` + 1 unmeasured."""
        acc, steps, sq = self.tokens[n]
        if steps <= 0:
            return 1.0 + n
        mean = acc / steps
        sd = max(sq / steps - mean * mean, 0.0) ** 0.5
        return min(1.0 + n, 1.0 + mean + 2.0 * sd / steps ** 0.5 + 1.0 / steps)

    def step_cost(self, batch: int, n: int) -> float | None:
        """Seconds of a step at budget ``n`` on every row at this batch size: measured, else predicted from
        probes (module doc), else None."""
        cells = self.cost.get(bucket(batch), {})
        if cells.get(n, [0.0, 0])[1]:
            return cells[n][0]
        probe, base = self.probe_cost.get(bucket(batch), {}).get(n), cells.get(0)
        if probe and probe[1] and base and base[1]:
            return base[0] + batch * max(probe[0] - base[0], 0.0)
        return None

    def choose(self, batch: int) -> int:
        self.probing = False
        cells = self.cost.setdefault(bucket(batch), {})
        probes = self.probe_cost.setdefault(bucket(batch), {})
        for n in self.budgets:  # probe every budget first (budget 0 on every row, the others on one row)
            if cells.get(n, [0.0, 0])[1] + probes.get(n, [0.0, 0])[1] < self.config.probe_steps:
                self.probing = n > 0 and batch > 1
                return n
        cost = {n: self.step_cost(batch, n) for n in self.budgets}
        rate = {n: self.expected_tokens(n) / cost[n] for n in self.budgets}
        best = 0
        for n in self.budgets:
            if rate[n] > rate[best] * (1 + self.config.min_gain):
                best = n
        if self.rng.random() < self.config.epsilon:
            i = self.budgets.index(best) + self.rng.choice((-1, 1))
            other = self.budgets[min(max(i, 0), len(self.budgets) - 1)]
            if other < best or (other > best and self.optimistic_tokens(other) / cost[other] > rate[best]):
                self.explored += 1
                return other
        return best

    def __call__(self, seqs: list[Sequence], copy_lengths: list[int] | None = None) -> list[int]:
        n = self.choose(len(seqs))
        budgets = [0 if s.params.lookahead == 0 else n for s in seqs]
        if self.probing:
            free = [b for b, s in enumerate(seqs) if s.params.lookahead != 0]
            budgets = [0] * len(seqs)
            if free:
                budgets[min(free, key=lambda b: seqs[b].slot)] = n
                self.probes += 1
            else:
                n, self.probing = 0, False
        copied = False
        if n == 0 and self.copy_model is not None and copy_lengths:
            rows = [b for b, s in enumerate(seqs) if copy_lengths[b] and s.params.lookahead is None]
            if rows:  # the copy model's k per copying row (probes included), a copy-only chain each
                for b, k in zip(rows, self.copy_model([seqs[b] for b in rows], [True] * len(rows))):
                    budgets[b] = min(k, copy_lengths[b])
                copied = any(budgets[b] for b in rows)
                self.copy_steps += copied
        # The rows whose step measures budget n: those that ran it with draft nodes. A row whose copy fills
        # its budget runs no draft (``decode_trees``); its accepted copy would be credited to the tree, and
        # at budget 0 the same row copies anyway.
        ran = [x > 0 and not (n > 0 and copy_lengths and copy_lengths[b] >= x) for b, x in enumerate(budgets)]
        self._pending = (n, self.probing, ran, budgets if copied else None)
        self.chosen.append(n)
        return budgets

    def _observe_copies(self, batch: int, budgets: list[int] | None, seconds: float, proposed: list[int],
                        accepted: list[int]) -> None:
        """A budget-0 step in the copy model: a copy-only step (``budgets``: each row's copy length, with
        its per-depth copy counts) or a plain one (None), the k = 0 cell copies are weighed against.

        The copy model's cost cells are of uniform steps (every row verifying k more tokens), and a copy
        step is seldom one: at batch 8, one row copying 4 tokens verifies half a token more per row. Its
        time is priced as the uniform step's would be under a cost linear in tokens verified, from the
        measured plain step t0: t(k) = t0 + (t - t0) k / k_eff, with k_eff the extra tokens per row and k
        the nearest whole lookahead >= 1 (priced as the rounded k instead, one row copying at batch 8 fell
        in the k = 0 cell and copying looked nearly free). Steps with under a quarter of a token more per
        row (one-row probes at batch > 4) count for acceptance only: scaled up, their timing noise would
        be the price."""
        model = self.copy_model
        if budgets is None:
            model.observe(batch, 0, seconds, [], [])
            return
        model.observe(batch, None, seconds, proposed, accepted, proposed, accepted)  # acceptance only
        k_eff = sum(budgets) / batch
        t0 = model.plain_step_time(batch)
        if k_eff < 0.25 or t0 is None:
            return
        k = min(max(1, round(k_eff)), model.max_lookahead)
        model.observe(batch, k, max(t0 + (seconds - t0) * k / k_eff, 1e-9), [], [], copy_step=True)

    def observe(self, batch: int, budget: int, seconds: float, accepted: int, rows: int,
                square: float | None = None, probe: bool = False) -> None:
        """One step at ``budget``: its wall time, accepted tokens over its ``rows`` (those that ran the
        budget), and the sum over them of accepted squared (``square``; None: as if every row accepted the
        mean). ``probe``: one row ran the budget, the others plain (timed apart, see ``step_cost``)."""
        table = self.probe_cost if probe else self.cost
        cell = table.setdefault(bucket(batch), {}).setdefault(budget, [seconds, 0])
        seconds = capped_step_time(cell[0], cell[1], seconds)  # one stalled step is not the budget's cost
        a = self.config.cost_ema if cell[1] else 1.0
        cell[0] = (1 - a) * cell[0] + a * seconds
        cell[1] += 1
        keep = 1 - 1 / self.config.horizon
        tok = self.tokens[budget]
        if square is None:
            square = accepted * accepted / rows if rows else 0.0
        tok[0], tok[1], tok[2] = keep * tok[0] + accepted, keep * tok[1] + rows, keep * tok[2] + square

    def forget(self, fraction: float = 0.5) -> None:
        for tok in self.tokens.values():
            for i in range(3):
                tok[i] *= 1 - fraction

    def attach(self, decoder) -> "AdaptiveTreeBudget":
        """Become ``decoder.lookahead_fn`` and time its ``decode`` steps; returns the controller."""
        if getattr(decoder, "tree_proposer", None) is None:
            raise ValueError("AdaptiveTreeBudget needs a SpecDecoder that proposes trees (SpecConfig.tree_topk > 0)")
        if "decode" in vars(decoder):
            raise ValueError("decoder already has a wrapped decode (attached twice?)")
        inner = decoder.decode
        self._version = decoder.policy_version
        cfg = decoder.config
        if cfg.context_copy and cfg.copy_max_tokens > 0:
            self.copy_model = AdaptiveLookahead(cfg.copy_max_tokens)
            self.copy_model.price_for(decoder)

        def decode(engine, seqs: list[Sequence]) -> None:
            if decoder.policy_version != self._version:  # a hot-swapped draft: its acceptance is unknown
                self._version = decoder.policy_version
                self.forget(0.5)
            a0 = [s.accepted_tokens for s in seqs]
            c0 = decoder.catch_up_s
            if self.copy_model is not None:
                cp0, ca0 = list(decoder.copy_depth_proposed), list(decoder.copy_depth_accepted)
            t0 = time.perf_counter()
            inner(engine, seqs)
            seconds = time.perf_counter() - t0
            pending, self._pending = self._pending, None
            if pending is not None:
                budget, probe, ran, copy_budgets = pending
                if budget == 0 and self.copy_model is not None:
                    self._observe_copies(len(seqs), copy_budgets, max(seconds, 1e-9),
                                         counter_deltas(decoder.copy_depth_proposed, cp0),
                                         counter_deltas(decoder.copy_depth_accepted, ca0))
                    if copy_budgets is not None:  # a copy-only step: not a budget-0 (plain) step
                        return
                if budget and not any(ran):  # every row that ran the budget only copied: no tree was measured
                    return
                if probe:  # a probe stands for a batch of trees: the one row's switching cost is not theirs
                    seconds -= decoder.catch_up_s - c0
                acc = [s.accepted_tokens - a for s, a, r in zip(seqs, a0, ran) if r or not budget]
                self.observe(len(seqs), budget, max(seconds, 1e-9), sum(acc), len(acc), sum(a * a for a in acc),
                             probe=probe)

        decoder.decode = decode
        decoder.lookahead_fn = self
        return self

    def detach(self, decoder) -> None:
        vars(decoder).pop("decode", None)
        if decoder.lookahead_fn is self:
            decoder.lookahead_fn = None
