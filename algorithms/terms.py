"""Loss terms for the draft: each a pure function of tensors, tested on a hand-computed example.

Shapes follow `algorithms.batch.LossBatch`: logits [..., Vd], masks and weights broadcast against
the leading dims (usually [N, K] or [M, K]). Logits are upcast to float32 before softmax so bf16
drafts train stably. Gradients flow through the draft's logits only; target logits, acceptance
probabilities, depth weights and advantages are constants. The off-policy terms (importance ratios,
ESS, staleness, V-trace along the speculation chain) live in `algorithms.offpolicy` and are
re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Re-exported so every term is importable from one place.
from algorithms.offpolicy import (  # noqa: F401
    ChainVTrace, EffectiveSampleSize, StaleFilter, TruncatedRatios, chain_values, chain_vtrace,
    drop_stale, effective_sample_size, truncated_ratios,
)

DEPTH_WEIGHT_KINDS = ("gamma", "reach")


def _weighted_mean(values: torch.Tensor, valid: torch.Tensor, weights) -> torch.Tensor:
    """Σ w·x / Σ w over valid entries; 0 (with a grad path) when nothing is valid."""
    w = valid.to(values.dtype) * torch.as_tensor(weights, dtype=values.dtype, device=values.device)
    # where(): invalid entries may hold junk logits (inf/nan) and 0·nan would poison the sum.
    x = torch.where(valid, values, torch.zeros_like(values))
    return (x * w).sum() / w.sum().clamp_min(1e-12)


def ntp_loss(draft_logits, target_tokens, mask, depth_weights) -> torch.Tensor:
    """Cross entropy of the token the target emitted, depth-weighted mean over valid entries.

    Entries with `target_tokens == -1` (emitted token outside the draft vocab) are skipped: the
    draft cannot propose them, so there is nothing to fit.
    """
    logq = F.log_softmax(draft_logits.float(), dim=-1)
    valid = mask & (target_tokens >= 0)
    nll = -logq.gather(-1, target_tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return _weighted_mean(nll, valid, depth_weights)


def reverse_kl(draft_logits, target_logits, mask, depth_weights) -> torch.Tensor:
    """KL(q_θ || p) = Σ_v q_v (log q_v − log p_v) over the draft vocab, depth-weighted mean.

    Mode seeking: pushes q off tokens the target finds unlikely, which is what rejection sampling
    punishes (α = Σ min(q, p) loses exactly the q mass sitting above p). Grads flow through q only.
    """
    logq = F.log_softmax(draft_logits.float(), dim=-1)
    logp = F.log_softmax(target_logits.detach().float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return _weighted_mean(kl, mask, depth_weights)


def forward_kl_soft_ce(draft_logits, target_logits, mask, depth_weights) -> torch.Tensor:
    """Soft cross entropy −Σ_v p_v log q_v, depth-weighted mean (the EAGLE3 / SpecForge recipe).

    Equals forward KL(p || q_θ) up to the target entropy, which has no gradient.
    """
    logq = F.log_softmax(draft_logits.float(), dim=-1)
    p = F.softmax(target_logits.detach().float(), dim=-1)
    ce = -(p * logq).sum(-1)
    return _weighted_mean(ce, mask, depth_weights)


def acceptance_prob(draft_logits, target_logits, greedy: bool = False) -> torch.Tensor:
    """Probability that a sample d ~ q is accepted by lossless rejection sampling: Σ_v min(q_v, p_v).

    With `greedy=True` the target verifies at temperature 0 (p one-hot at argmax p), which gives
    q(argmax p). Returns [...] (the logits' leading dims), differentiable in q; callers detach it.
    """
    q = F.softmax(draft_logits.float(), dim=-1)
    if greedy:
        return q.gather(-1, target_logits.argmax(-1, keepdim=True)).squeeze(-1)
    p = F.softmax(target_logits.detach().float(), dim=-1)
    return torch.minimum(q, p).sum(-1)


def depth_weights(kind: str, gamma: float = 0.8, alpha: torch.Tensor | None = None,
                  K: int | None = None) -> torch.Tensor:
    """Per-depth loss weights, detached.

    "gamma": γ^(j−1), shape [K] (K from the argument or from `alpha`).
    "reach": probability that the current draft reaches depth j, Π_{l<j} α_l, shape [N, K] from
    `alpha` [N, K]: depth j only matters at serving time if depths 1..j−1 were accepted.
    """
    if kind == "gamma":
        if K is None:
            if alpha is None:
                raise ValueError("depth_weights('gamma') needs K or alpha to know the depth")
            K = alpha.shape[-1]
        device = alpha.device if alpha is not None else None
        return gamma ** torch.arange(K, dtype=torch.float32, device=device)
    if kind == "reach":
        if alpha is None:
            raise ValueError("depth_weights('reach') needs alpha [N, K], got None")
        a = alpha.detach().float()
        ones = torch.ones_like(a[..., :1])
        return torch.cat([ones, a[..., :-1]], dim=-1).cumprod(-1)
    raise ValueError(f"depth weight kind {kind!r} is not one of {DEPTH_WEIGHT_KINDS}")


def proposal_logp(draft_logits, proposal_row, proposals) -> torch.Tensor:
    """log q_θ(d_j) [M, K] of each logged proposal under the current draft (with grad).

    Junk ids at masked depths are clamped into range; callers mask those entries out.
    """
    logq = F.log_softmax(draft_logits[proposal_row].float(), dim=-1)
    ids = proposals.clamp(0, logq.shape[-1] - 1)
    return logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def policy_gradient_loss(logq, advantages, valid, weights) -> torch.Tensor:
    """−mean over valid proposal entries of w_j · stopgrad(A_j) · log q_θ(d_j).

    `advantages` come from `offpolicy.chain_vtrace` (already ρ-truncated). A rejected proposal has
    A < 0, so one descent step lowers its probability; an accepted one has A > 0 and rises. The mean
    is over the count of valid entries (not Σ w) so that reach weights shrink deep, unlikely depths.
    """
    w = torch.as_tensor(weights, dtype=logq.dtype, device=logq.device)
    term = torch.where(valid, w * advantages.detach() * logq, torch.zeros_like(logq))
    return -term.sum() / valid.sum().clamp_min(1)
