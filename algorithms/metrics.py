"""Diagnostics every algorithm logs, learning or not: current-draft acceptance, lag, ESS, counts.

All values are python floats under stable TensorBoard tags, so a `frozen` run and an `aurora` run
plot side by side. Tags: `accept/depth_j` (α of the current draft at depth j, conditioned on the
ground-truth prefix), `accept/length_sim` (Σ_j Π_{l≤j} α_l, the accept length the current draft
would get on this batch, averaged over rows that have all K depths), `accept/length_logged` (mean
accepted count a the behaviour drafts actually got), `offpolicy/*`, `data/*`.
"""

from __future__ import annotations

import torch

from algorithms.base import chain_mask, episode_mask
from algorithms.batch import LossBatch
from algorithms.offpolicy import effective_sample_size, truncated_ratios
from algorithms.terms import proposal_logp


def acceptance_metrics(alpha: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Per-depth mean acceptance and the simulated accept length of the current draft."""
    out: dict[str, float] = {}
    for j in range(alpha.shape[1]):
        valid = mask[:, j]
        out[f"accept/depth_{j + 1}"] = float(alpha[valid, j].mean()) if valid.any() else 0.0
    # Rows near a trace's end lack deep entries and would read as rejections; prefer full rows.
    rows = mask.all(1) if mask.all(1).any() else mask[:, 0]
    length = alpha[rows].float().cumprod(1).sum(1)
    out["accept/length_sim"] = float(length.mean()) if rows.any() else 0.0
    return out


@torch.no_grad()
def offpolicy_metrics(batch: LossBatch, keep: torch.Tensor | None = None, dropped: int = 0,
                      rho_bar: float = 1.0, logq: torch.Tensor | None = None) -> dict[str, float]:
    """Lag, stale drops, clip fraction at ρ̄ and ESS of q_θ/μ over the kept chain entries.

    `logq` [M, K] = log q_θ(d_j) when the caller already has it (saves a softmax over Vd).
    """
    valid = episode_mask(batch, chain_mask(batch, keep))
    if logq is None:
        logq = proposal_logp(batch.draft_logits.detach(), batch.proposal_row, batch.proposals,
                             batch.top_p[batch.proposal_row], batch.top_k[batch.proposal_row])
    ratios = truncated_ratios(logq, batch.behaviour_logp, rho_bar, valid)
    ess = effective_sample_size(ratios.ratios, valid)
    lag = batch.lag.float()
    return {
        "offpolicy/lag_mean": float(lag.mean()) if lag.numel() else 0.0,
        "offpolicy/lag_max": float(lag.max()) if lag.numel() else 0.0,
        "offpolicy/dropped_stale": float(dropped),
        "offpolicy/deterministic_steps": float(batch.deterministic.sum()),
        "offpolicy/clip_fraction": ratios.clip_fraction,
        "offpolicy/ess": ess.normalized,
        "offpolicy/ess_raw": ess.raw,
        "offpolicy/num_proposal_tokens": float(valid.sum()),
    }


def batch_metrics(batch: LossBatch, alpha: torch.Tensor, keep: torch.Tensor | None = None,
                  dropped: int = 0, rho_bar: float = 1.0,
                  logq: torch.Tensor | None = None) -> dict[str, float]:
    """Everything but the loss terms: acceptance, logged accept length, off-policy stats, counts.

    Algorithms without stale correction pass the defaults (keep all, ρ̄ = 1), which makes
    `offpolicy/clip_fraction` the fraction of proposals the current draft likes more than μ did;
    `aurora` passes its ρ̄_pg, the truncation that acts on its gradient.
    """
    out = acceptance_metrics(alpha, batch.mask)
    acc = batch.accepted.float()
    out["accept/length_logged"] = float(acc.mean()) if acc.numel() else 0.0
    out.update(offpolicy_metrics(batch, keep, dropped, rho_bar, logq))
    out["data/num_tokens"] = float(batch.mask.sum())
    out["data/num_rows"] = float(batch.mask.shape[0])
    out["data/num_steps"] = float(batch.num_proposals)
    return out
