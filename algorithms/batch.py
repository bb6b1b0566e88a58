"""The data contract between the learner and the learning rules: `LossBatch` in, `LossOutput` out.

The learner re-runs the current draft θ in training-time-test (TTT) mode over traces and fills a
`LossBatch`; every algorithm maps it to a `LossOutput` with pure tensor math. Shapes are checked
here once, at the boundary, so the loss functions can assume them.

Notation: N rows (trace positions i), K the maximum depth (lookahead), Vd the draft vocabulary,
M logged verify steps (may be 0). Depth j = 1..K lives at index j-1 and predicts token x_{i+j+1}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossBatch:
    """One learner batch: TTT outputs of the current draft plus the logged verify steps."""

    draft_logits: torch.Tensor
    """[N, K, Vd] float. Current draft θ's logits at depth j (index j-1) for base position i,
    already at the serving temperature. Carries the graph: every gradient flows through this."""

    target_logits: torch.Tensor
    """[N, K, Vd] float. Target logits restricted to the draft vocabulary for the same predicted
    token (aligned with `draft_logits`). Treated as constants (detached by the losses)."""

    target_tokens: torch.Tensor
    """[N, K] long. Draft-vocab id of the token the target actually emitted there, or -1 when that
    token is outside the draft vocabulary (such entries are excluded from NTP only)."""

    mask: torch.Tensor
    """[N, K] bool. The entry exists: the target computed that position (false past a trace's end)."""

    proposal_row: torch.Tensor
    """[M] long. Row in N of each verify step's base position: the current draft's depth-j
    distribution for that step's chain is `draft_logits[proposal_row, j-1]`. Valid up to and
    including the first rejection, because accepted proposals equal the ground-truth tokens."""

    proposals: torch.Tensor
    """[M, K] long. Draft-vocab ids the behaviour draft proposed (any value where
    `proposal_mask` is false)."""

    behaviour_logp: torch.Tensor
    """[M, K] float. log μ(d_j) logged by the behaviour draft; 0.0 (= log 1) for greedy drafting."""

    accepted: torch.Tensor
    """[M] long. Accepted count a in 0..k of each verify step (the bonus token is not counted)."""

    proposal_mask: torch.Tensor
    """[M, K] bool. Depth j ≤ k (the lookahead of that step). The losses further restrict to
    j ≤ a+1: depths after the first rejection were conditioned on a wrong prefix."""

    lag: torch.Tensor
    """[M] long. Current policy version minus the version that proposed (≥ 0)."""

    def __post_init__(self) -> None:
        n, k, vd = _shape(self.draft_logits, "draft_logits", 3)
        _expect(self.target_logits, "target_logits", (n, k, vd))
        _expect(self.target_tokens, "target_tokens", (n, k), torch.long)
        _expect(self.mask, "mask", (n, k), torch.bool)
        (m,) = _shape(self.proposal_row, "proposal_row", 1)
        _expect(self.proposal_row, "proposal_row", (m,), torch.long)
        _expect(self.proposals, "proposals", (m, k), torch.long)
        _expect(self.behaviour_logp, "behaviour_logp", (m, k))
        _expect(self.accepted, "accepted", (m,), torch.long)
        _expect(self.proposal_mask, "proposal_mask", (m, k), torch.bool)
        _expect(self.lag, "lag", (m,), torch.long)
        if m and (self.proposal_row.min() < 0 or self.proposal_row.max() >= n):
            raise ValueError(f"proposal_row must index rows 0..{n - 1}, got {self.proposal_row.tolist()}")
        if m and (self.accepted.min() < 0 or (self.accepted > self.proposal_mask.sum(1)).any()):
            raise ValueError(f"accepted must lie in 0..k per step, got {self.accepted.tolist()}")

    @property
    def num_proposals(self) -> int:
        return int(self.proposal_row.shape[0])

    @classmethod
    def without_proposals(cls, draft_logits, target_logits, target_tokens, mask) -> "LossBatch":
        """A batch with M = 0 logged verify steps (e.g. before any verify step was recorded)."""
        k, dev = draft_logits.shape[1], draft_logits.device
        long0 = torch.zeros(0, dtype=torch.long, device=dev)
        return cls(
            draft_logits, target_logits, target_tokens, mask,
            proposal_row=long0, proposals=torch.zeros(0, k, dtype=torch.long, device=dev),
            behaviour_logp=torch.zeros(0, k, dtype=draft_logits.dtype, device=dev), accepted=long0,
            proposal_mask=torch.zeros(0, k, dtype=torch.bool, device=dev), lag=long0,
        )


@dataclass
class LossOutput:
    """What an algorithm returns: the scalar to backpropagate and the numbers to log."""

    loss: torch.Tensor
    """Scalar. Requires grad (through `draft_logits`) unless the algorithm is `frozen`."""

    metrics: dict[str, float] = field(default_factory=dict)
    """TensorBoard-ready scalars, tags namespaced `losses/`, `accept/`, `offpolicy/`, `data/`."""


def _shape(t: torch.Tensor, name: str, ndim: int) -> tuple[int, ...]:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"LossBatch.{name} must be a {ndim}-d tensor, got {got}")
    return tuple(t.shape)


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    _shape(t, name, len(shape))
    if tuple(t.shape) != shape:
        raise ValueError(f"LossBatch.{name} must have shape {shape}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"LossBatch.{name} must have dtype {dtype}, got {t.dtype}")
    if dtype is None and not t.is_floating_point():
        raise ValueError(f"LossBatch.{name} must be a float tensor, got {t.dtype}")
