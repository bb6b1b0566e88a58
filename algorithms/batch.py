"""The data contract between the learner and the learning rules: `LossBatch` in, `LossOutput` out.

The learner re-runs the current draft θ in training-time-test (TTT) mode over traces and fills a
`LossBatch`; every algorithm maps it to a `LossOutput` with pure tensor math. Shapes are checked
here once, at the boundary, so the loss functions can assume them.

Notation: N rows (trace positions i), K the maximum depth (lookahead), Vd the draft vocabulary,
M logged verify steps (may be 0). Depth j = 1..K lives at index j-1 and predicts token x_{i+j+1}.

Every row carries how its request was sampled, and every term is computed at that distribution:
logits at the row's temperature (1 for greedy rows), the target's distribution normalised over the
FULL vocabulary (its mass outside the draft vocabulary is mass the draft can never match), and, for
acceptance, top-k/top-p applied to both sides the way the engine applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossBatch:
    """One learner batch: TTT outputs of the current draft plus the logged verify steps."""

    draft_logits: torch.Tensor
    """[N, K, Vd] float. Current draft θ's logits at depth j (index j-1) for base position i,
    already divided by the row's temperature. Carries the graph: every gradient flows through this."""

    target_logp: torch.Tensor
    """[N, K, Vd] float. log p_T(v) of the target at the row's temperature for the same predicted
    token, normalised over the FULL vocabulary and read at the draft-vocabulary ids (so it sums to
    <= 1 over Vd; not renormalised). Constants (detached by the losses)."""

    nucleus_logp: torch.Tensor
    """[N, K] float. The smallest log p_T(v) the request's top-k/top-p keeps (-inf: nothing cut).
    The verified distribution is p̃(v) = p_T(v) / P_T(kept) for log p_T(v) >= this, 0 elsewhere."""

    nucleus_log_mass: torch.Tensor
    """[N, K] float. log P_T(kept): the target's mass inside its top-k/top-p set (0 when nothing is cut)."""

    nucleus_known: torch.Tensor
    """[N, K] bool. The target's top-k/top-p set is known at this entry (false only for entries whose
    full-vocabulary nucleus was not recorded, e.g. prompt rows of top-p traffic): acceptance terms skip
    the others."""

    top_p: torch.Tensor
    """[N] float. The row's top-p (1 = none), applied to the draft's side of acceptance too."""

    top_k: torch.Tensor
    """[N] long. The row's top-k (0 = none)."""

    greedy: torch.Tensor
    """[N] bool. The row's request was verified greedily: acceptance at depth j is whether the draft's
    argmax is the target's, relaxed to q(emitted token) for gradients and estimates."""

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
    """[M, K] float. log μ(d_j) logged by the behaviour draft under the distribution it sampled from
    (the request's temperature, top-k, top-p); 0.0 (= log 1) for deterministic steps."""

    deterministic: torch.Tensor
    """[M] bool. The step's proposals were deterministic (greedy drafting: μ is a point mass at the old
    draft's argmax). No importance ratio exists against a point mass; see `algorithms.offpolicy`."""

    accepted: torch.Tensor
    """[M] long. Accepted count a in 0..k of each verify step (the bonus token is not counted)."""

    proposal_mask: torch.Tensor
    """[M, K] bool. Depth j ≤ k (the lookahead of that step). The losses further restrict to
    j ≤ a+1: depths after the first rejection were conditioned on a wrong prefix."""

    lag: torch.Tensor
    """[M] long. Published policy versions between the proposer's and the current draft (≥ 0)."""

    def __post_init__(self) -> None:
        n, k, vd = _shape(self.draft_logits, "draft_logits", 3)
        _expect(self.target_logp, "target_logp", (n, k, vd))
        _expect(self.nucleus_logp, "nucleus_logp", (n, k))
        _expect(self.nucleus_log_mass, "nucleus_log_mass", (n, k))
        _expect(self.nucleus_known, "nucleus_known", (n, k), torch.bool)
        _expect(self.top_p, "top_p", (n,))
        _expect(self.top_k, "top_k", (n,), torch.long)
        _expect(self.greedy, "greedy", (n,), torch.bool)
        _expect(self.target_tokens, "target_tokens", (n, k), torch.long)
        _expect(self.mask, "mask", (n, k), torch.bool)
        (m,) = _shape(self.proposal_row, "proposal_row", 1)
        _expect(self.proposal_row, "proposal_row", (m,), torch.long)
        _expect(self.proposals, "proposals", (m, k), torch.long)
        _expect(self.behaviour_logp, "behaviour_logp", (m, k))
        _expect(self.deterministic, "deterministic", (m,), torch.bool)
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
    def sampled_rows(cls, draft_logits, target_logp, target_tokens, mask, greedy=False, top_p=1.0, top_k=0,
                     nucleus_logp=None, nucleus_log_mass=None, **steps) -> "LossBatch":
        """A batch whose rows share one sampling setting (tests, tools); nucleus defaults: nothing cut.

        `steps` are the logged-step fields; omitted, the batch has M = 0 logged verify steps.
        """
        n, k = mask.shape
        dev = draft_logits.device
        long0 = torch.zeros(0, dtype=torch.long, device=dev)
        none = dict(proposal_row=long0, proposals=torch.zeros(0, k, dtype=torch.long, device=dev),
                    behaviour_logp=torch.zeros(0, k, device=dev), accepted=long0,
                    proposal_mask=torch.zeros(0, k, dtype=torch.bool, device=dev), lag=long0,
                    deterministic=torch.zeros(0, dtype=torch.bool, device=dev))
        if steps and "deterministic" not in steps:
            steps["deterministic"] = torch.full((steps["accepted"].shape[0],), bool(greedy), device=dev)
        return cls(
            draft_logits=draft_logits, target_logp=target_logp, target_tokens=target_tokens, mask=mask,
            nucleus_logp=torch.full((n, k), float("-inf")) if nucleus_logp is None else nucleus_logp,
            nucleus_log_mass=torch.zeros(n, k) if nucleus_log_mass is None else nucleus_log_mass,
            nucleus_known=torch.ones(n, k, dtype=torch.bool), top_p=torch.full((n,), float(top_p)),
            top_k=torch.full((n,), int(top_k), dtype=torch.long), greedy=torch.full((n,), bool(greedy)),
            **{**none, **steps},
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
