"""`frozen`: no learning. The static-draft baseline, still logging what the draft achieves.

The loss is a zero scalar that does not require grad, so the learner can detect it and skip the
backward pass and the optimizer step; the diagnostics (acceptance per depth, simulated accept
length, lag, ...) are computed exactly as for the learning algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import AlgorithmConfig, current_acceptance
from algorithms.batch import LossBatch, LossOutput
from algorithms.metrics import batch_metrics
from algorithms.registry import register


@dataclass
class FrozenConfig(AlgorithmConfig):
    """`frozen` has no hyperparameters beyond the shared ones."""


@register("frozen", FrozenConfig)
def loss(batch: LossBatch, cfg: FrozenConfig) -> LossOutput:
    """Zero loss without grad, plus the diagnostics of the (unchanging) draft."""
    with torch.no_grad():
        metrics = {"losses/total": 0.0}
        metrics.update(batch_metrics(batch, current_acceptance(batch)))
    return LossOutput(torch.zeros((), device=batch.draft_logits.device), metrics)
