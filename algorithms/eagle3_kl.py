"""`eagle3_kl`: soft cross entropy against the target distribution with 0.8^(j−1) depth weights.

The recipe of the public Aurora code and SpecForge's online EAGLE3 training: forward KL (as soft CE
−Σ p log q) at every TTT entry, no off-policy correction, logged proposals ignored (they are still
read for the diagnostics, so runs compare side by side).
"""

from __future__ import annotations

from dataclasses import dataclass

from algorithms.base import AlgorithmConfig, check_range, current_acceptance
from algorithms.batch import LossBatch, LossOutput
from algorithms.metrics import batch_metrics
from algorithms.registry import register
from algorithms.terms import depth_weights, forward_kl_soft_ce


@dataclass
class Eagle3KLConfig(AlgorithmConfig):
    """Hyperparameters of the `eagle3_kl` baseline."""

    gamma: float = 0.8
    """Depth decay: depth j is weighted γ^(j−1), in (0, 1]; 0.8 as in EAGLE3 and SpecForge."""

    def __post_init__(self) -> None:
        check_range(self, "gamma", lo=0.0, hi=1.0, lo_open=True)


@register("eagle3_kl", Eagle3KLConfig)
def loss(batch: LossBatch, cfg: Eagle3KLConfig) -> LossOutput:
    """Depth-weighted mean soft CE over all valid TTT entries."""
    k = batch.mask.shape[1]
    weights = depth_weights("gamma", cfg.gamma, K=k).to(batch.draft_logits.device)
    soft_ce = forward_kl_soft_ce(batch.draft_logits, batch.target_logp, batch.mask, weights)
    metrics = {"losses/total": float(soft_ce.detach()), "losses/forward_kl_soft_ce": float(soft_ce.detach())}
    metrics.update(batch_metrics(batch, current_acceptance(batch)))
    return LossOutput(soft_ce, metrics)
