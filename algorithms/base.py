"""Pieces every algorithm shares: the base config, config checks, and batch views they all need.

`AlgorithmConfig` holds the fields common to all algorithms; each algorithm subclasses it and
validates its own fields in `__post_init__` with `check_range` / `check_choice`, whose errors name
the config, the field, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from algorithms.batch import LossBatch
from algorithms.terms import acceptance_prob


@dataclass
class AlgorithmConfig:
    """Fields shared by all algorithms."""

    greedy_verify: bool = False
    """True when the engine verifies at temperature 0: the current draft's acceptance at an entry
    is then q(emitted token) (0 if it is outside the draft vocab) instead of Σ_v min(q_v, p_v)."""

    def __post_init__(self) -> None:
        if not isinstance(self.greedy_verify, bool):
            raise ValueError(
                f"{type(self).__name__}.greedy_verify must be true or false, got {self.greedy_verify!r}")


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


def current_acceptance(batch: LossBatch, greedy_verify: bool) -> torch.Tensor:
    """α [N, K]: probability the current draft's proposal is accepted at each entry (detached).

    Zero where `mask` is false, so products over depths stop at a trace's end.
    """
    logits = batch.draft_logits.detach()
    if greedy_verify:
        # The emitted token is the target's argmax over the FULL vocab; using it (not the argmax of
        # the restricted logits) counts an out-of-draft-vocab argmax as a certain rejection.
        q = F.softmax(logits.float(), dim=-1)
        tok = batch.target_tokens
        alpha = q.gather(-1, tok.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (tok >= 0)
    else:
        alpha = acceptance_prob(logits, batch.target_logits)
    return alpha * batch.mask


def chain_mask(batch: LossBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[M, K] bool: chain depths j ≤ k whose TTT entry exists (and whose step is kept)."""
    m = batch.proposal_mask & batch.mask[batch.proposal_row]
    return m if keep is None else m & keep.unsqueeze(1)


def episode_mask(batch: LossBatch, chain: torch.Tensor) -> torch.Tensor:
    """Restrict a chain mask to j ≤ a+1: depths up to and including the first rejection."""
    depth = torch.arange(1, chain.shape[1] + 1, device=chain.device)
    return chain & (depth <= batch.accepted.unsqueeze(1) + 1)
