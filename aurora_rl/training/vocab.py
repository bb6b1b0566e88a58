"""Online draft vocabulary: follow the tokens the target emits on live traffic and refresh the pruned head.

The day-0 draft vocabulary is the most frequent tokens of a sample of the first prompts. A token
outside it can never be proposed, so the share of the target's tokens the draft can reach falls when
the traffic moves away from that sample. Measured on SmolLM2's greedy answers (128 tokens each), a
vocabulary of 4096 picked from 64 code prompts covers 86% of what it emits on held-out code, 74% on
chat and 68% on non-English; one picked from 192 served code requests (answers and prompts) covers 93%
of held-out code.

``VocabTracker`` keeps exponentially decayed counts of the tokens in the traces the learner trains on:
the tokens the target emitted at full weight, prompt tokens at ``prompt_weight`` (they are most of the
evidence in the first requests, and answers quote them). ``Learner`` asks it every
``vocab_refresh_every`` updates for the swaps the counts clearly ask for (frequent tokens outside in
place of rare ones inside, with a margin against churn) and applies them when they cover at least
``vocab_refresh_min_gain`` more of the recent tokens than the current vocabulary does. Tokens kept
keep their trained head rows and optimizer moments; new tokens start from the target's lm_head rows
(the day-0 head) with fresh moments. A frozen draft cannot do this; it is part of what adapting to a
traffic shift means.

The counts are statistics, not state worth a checkpoint: a resumed learner counts afresh (its
vocabulary itself is in the checkpoint's draft, ``d2t``/``t2d``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_rl.engine.trace import Trace
from aurora_rl.models.draft import Eagle3Draft


SWAP_MIN_COUNT = 2.0
"""A token joins the vocabulary only once its (decayed) count reaches this."""
SWAP_MARGIN = 2.0
"""...and only in place of a token counted less than half as often."""


@dataclass(frozen=True)
class VocabProposal:
    """The best vocabulary for the recent traffic against the current one."""

    target_ids: torch.Tensor
    """Sorted target ids, as many as the draft vocabulary holds."""
    current_coverage: float
    """Share of the recent (decayed, weighted) tokens inside the current vocabulary."""
    coverage: float
    """The same share for ``target_ids``."""

    @property
    def gain(self) -> float:
        return self.coverage - self.current_coverage


class VocabTracker:
    """Decayed token counts of the traffic the learner sees."""

    def __init__(self, vocab_size: int, half_life_tokens: float, prompt_weight: float = 0.25) -> None:
        if half_life_tokens <= 0:
            raise ValueError(f"half_life_tokens must be > 0, got {half_life_tokens}")
        if prompt_weight < 0:
            raise ValueError(f"prompt_weight must be >= 0, got {prompt_weight}")
        self.half_life_tokens, self.prompt_weight = float(half_life_tokens), float(prompt_weight)
        self.counts = torch.zeros(vocab_size, dtype=torch.float64)
        self.observed = 0.0
        """Weighted tokens counted so far (before decay)."""

    def observe(self, traces: list[Trace]) -> None:
        """Count the tokens of ``traces``; older counts decay by half every ``half_life_tokens``."""
        V = self.counts.numel()
        new = torch.zeros(V, dtype=torch.float64)
        for t in traces:
            tokens = t.tokens[: t.num_positions + 1].long()
            P = len(t.prompt_ids)
            new += torch.bincount(tokens[P:], minlength=V)[:V].double()
            if self.prompt_weight:
                new += self.prompt_weight * torch.bincount(tokens[:P], minlength=V)[:V].double()
        n = float(new.sum())
        self.counts.mul_(0.5 ** (n / self.half_life_tokens)).add_(new)
        self.observed += n

    def propose(self, draft: Eagle3Draft) -> VocabProposal:
        """The current vocabulary with the swaps the recent counts clearly ask for, and both coverages.

        The most frequent token outside replaces the least frequent inside, the next the next, for as
        long as the one coming in has been counted at least ``SWAP_MIN_COUNT`` times and
        ``SWAP_MARGIN`` times as often as the one it replaces. Without the margin, rare tokens seen once
        or twice would swap in and out at every check (each swap throws a trained head row away).
        """
        counts, current = self.counts, draft.draft_to_target
        inside = torch.zeros(counts.numel(), dtype=torch.bool)
        inside[current] = True
        coming = (~inside).nonzero().flatten()
        coming = coming[counts[coming].argsort(descending=True, stable=True)][: current.numel()]
        going = current[counts[current].argsort(stable=True)][: coming.numel()]
        swap = (counts[coming] >= SWAP_MIN_COUNT) & (counts[coming] > SWAP_MARGIN * counts[going])
        n = int(swap.long().cumprod(0).sum())  # both orders are monotone: the swaps are a prefix
        inside[going[:n]] = False
        inside[coming[:n]] = True
        ids = inside.nonzero().flatten()
        total = float(counts.sum())
        if total <= 0:
            return VocabProposal(ids, 0.0, 0.0)
        return VocabProposal(ids, float(counts[current].sum()) / total, float(counts[ids].sum()) / total)


def remap_moments(state: dict, old_rows: torch.Tensor) -> None:
    """Move AdamW moments of a head weight along a vocabulary remap: row r of the new head takes the
    moments of old row ``old_rows[r]``, or zeros where ``old_rows[r]`` is -1 (a new token)."""
    kept = old_rows >= 0
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            moved = torch.zeros_like(state[key])
            moved[kept] = state[key][old_rows[kept]]
            state[key] = moved
