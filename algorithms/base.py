"""Pieces every algorithm shares: the base config, config checks, and batch views they all need.

`AlgorithmConfig` holds the fields common to all algorithms; each algorithm subclasses it and
validates its own fields in `__post_init__` with `check_range` / `check_choice`, whose errors name
the config, the field, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.batch import LossBatch
from algorithms.terms import acceptance_prob, greedy_acceptance, served_logprobs, served_target_probs


@dataclass
class AlgorithmConfig:
    """Fields shared by all algorithms (none yet: how each row was verified travels in the batch)."""


def check_range(cfg, name: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> None:
    """Raise ValueError naming `cfg.name` unless it is a number in [lo, hi] ((lo, hi] if lo_open)."""
    value = getattr(cfg, name)
    where = f"{type(cfg).__name__}.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{where} must be in {left}{lo_s}, {hi_s}], got {value!r}")


def check_choice(cfg, name: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming `cfg.name` and the valid choices unless its value is one of them."""
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{type(cfg).__name__}.{name} must be one of {choices}, got {value!r}")


def acceptance(batch: LossBatch, detach: bool = True) -> torch.Tensor:
    """α [N, K]: probability that the current draft's proposal is accepted at each entry, under the
    distribution that entry's request was verified with.

    Greedy rows: q(x*) with x* the target's argmax (the emitted token; relaxation of 1[argmax q = x*]).
    Sampled rows: Σ_v min(q̃_v, p̃_v) with q̃ the draft at the row's temperature after its top-k/top-p,
    p̃ the target's verified distribution over the full vocabulary at the draft ids. Zero where
    `mask` or `nucleus_known` is false, so products over depths stop at a trace's end.
    """
    logits = batch.draft_logits.detach() if detach else batch.draft_logits
    n, k, v = logits.shape
    alpha = torch.zeros(n, k, device=logits.device)
    greedy = batch.greedy.nonzero().squeeze(1)
    if greedy.numel():
        alpha = alpha.index_put((greedy,), greedy_acceptance(logits[greedy], batch.target_tokens[greedy]))
    sampled = (~batch.greedy).nonzero().squeeze(1)
    if sampled.numel():
        logq = served_logprobs(logits[sampled].reshape(-1, v), batch.top_p[sampled].repeat_interleave(k),
                               batch.top_k[sampled].repeat_interleave(k)).view(-1, k, v)
        p = served_target_probs(batch.target_logp[sampled], batch.nucleus_logp[sampled],
                                batch.nucleus_log_mass[sampled])
        alpha = alpha.index_put((sampled,), acceptance_prob(logq, p))
    return alpha * (batch.mask & batch.nucleus_known)


def current_acceptance(batch: LossBatch) -> torch.Tensor:
    """α [N, K] of the current draft, detached (diagnostics, V-trace values, depth weights)."""
    with torch.no_grad():
        return acceptance(batch, detach=True)


def learnable_steps(batch: LossBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[M] bool: logged steps a score-function (policy-gradient) term may use: stochastic proposals
    (not `deterministic`), within `keep` (e.g. not stale)."""
    ok = ~batch.deterministic
    return ok if keep is None else ok & keep


def chain_mask(batch: LossBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[M, K] bool: chain depths j ≤ k whose TTT entry exists (and whose step is kept)."""
    m = batch.proposal_mask & batch.mask[batch.proposal_row]
    return m if keep is None else m & keep.unsqueeze(1)


def episode_mask(batch: LossBatch, chain: torch.Tensor) -> torch.Tensor:
    """Restrict a chain mask to j ≤ a+1: depths up to and including the first rejection."""
    depth = torch.arange(1, chain.shape[1] + 1, device=chain.device)
    return chain & (depth <= batch.accepted.unsqueeze(1) + 1)
