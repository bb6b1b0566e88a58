"""`osd`: Online Speculative Decoding: distill only where the behaviour draft was rejected.

For each logged verify step with a < k, the entry at the first rejected depth j = a+1 of its base
row is distilled towards the target (forward KL as soft CE by default, reverse KL optionally).
Accepted depths and TTT entries no proposal reached are ignored, as in OSD. With no rejections in
the batch the loss is 0 with a grad path and `osd/no_rejections` is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgorithmConfig, check_choice, current_acceptance
from algorithms.batch import LossBatch, LossOutput
from algorithms.metrics import batch_metrics
from algorithms.registry import register
from algorithms.terms import forward_kl_soft_ce, reverse_kl

DIVERGENCES = {"forward_kl": forward_kl_soft_ce, "reverse_kl": reverse_kl}


@dataclass
class OSDConfig(AlgorithmConfig):
    """Hyperparameters of the `osd` baseline."""

    divergence: str = "forward_kl"
    """"forward_kl" (soft CE −Σ p log q) or "reverse_kl" (KL(q‖p)) at the rejected entries."""

    def __post_init__(self) -> None:
        check_choice(self, "divergence", tuple(DIVERGENCES))


def rejected_entries(batch: LossBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, depth indices) of each logged step's first rejection whose TTT entry exists."""
    k = batch.proposal_mask.sum(1)
    rejected = batch.accepted < k
    rows, idx = batch.proposal_row[rejected], batch.accepted[rejected]  # depth a+1 lives at index a
    exists = batch.mask[rows, idx]
    return rows[exists], idx[exists]


@register("osd", OSDConfig)
def loss(batch: LossBatch, cfg: OSDConfig) -> LossOutput:
    """Mean divergence over the first-rejected entries of the logged steps."""
    rows, idx = rejected_entries(batch)
    if rows.numel():
        valid = torch.ones_like(rows, dtype=torch.bool)
        total = DIVERGENCES[cfg.divergence](
            batch.draft_logits[rows, idx], batch.target_logp[rows, idx], valid, 1.0)
    else:
        total = batch.draft_logits.sum() * 0.0  # keeps the backward/optimizer path uniform
    metrics = {
        "losses/total": float(total.detach()),
        f"losses/{cfg.divergence}": float(total.detach()),
        "osd/num_rejected": float(rows.numel()),
        "osd/no_rejections": float(rows.numel() == 0),
    }
    metrics.update(batch_metrics(batch, current_acceptance(batch)))
    return LossOutput(total, metrics)
