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


def reverse_kl(draft_logits, target_logp, mask, depth_weights) -> torch.Tensor:
    """KL(q_θ || p) = Σ_v q_v (log q_v − log p_v) over the draft vocab, depth-weighted mean.

    `target_logp` is log p normalised over the full vocabulary (not renormalised over the draft's):
    q is zero outside the draft vocabulary, so this is the true KL over the full vocabulary.
    Mode seeking: pushes q off tokens the target finds unlikely, which is what rejection sampling
    punishes (α = Σ min(q, p) loses exactly the q mass sitting above p). Grads flow through q only.
    """
    logq = F.log_softmax(draft_logits.float(), dim=-1)
    kl = (logq.exp() * (logq - target_logp.detach().float())).sum(-1)
    return _weighted_mean(kl, mask, depth_weights)


def forward_kl_soft_ce(draft_logits, target_logp, mask, depth_weights) -> torch.Tensor:
    """Soft cross entropy −Σ_v p̂_v log q_v, depth-weighted mean (the EAGLE3 / SpecForge recipe).

    As in that recipe, p̂ is the target renormalised over the draft vocabulary. Equals forward
    KL(p̂ || q_θ) up to the target entropy, which has no gradient.
    """
    logq = F.log_softmax(draft_logits.float(), dim=-1)
    p = F.softmax(target_logp.detach().float(), dim=-1)
    ce = -(p * logq).sum(-1)
    return _weighted_mean(ce, mask, depth_weights)


@torch.no_grad()
def nucleus_mask(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """[R, V] bool: the ids the engine's `processed_probs` keeps for rows of `logits` [R, V] (already
    at temperature): the top_k largest (0 = all), then the smallest prefix by probability whose mass
    reaches top_p (the top id always stays). Only rows that cut anything are sorted."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    cut = (top_p < 1.0) | (top_k > 0)
    if not bool(cut.any()):
        return keep
    rows = cut.nonzero().squeeze(1)
    z, order = logits[rows].float().sort(-1, descending=True)
    rank = torch.arange(z.shape[-1], device=z.device)
    k = top_k[rows].unsqueeze(1)
    in_k = (k == 0) | (rank < k)
    p = torch.softmax(z.masked_fill(~in_k, float("-inf")), -1)
    tp = top_p[rows].unsqueeze(1)
    drop = ((p.cumsum(-1) - p) >= tp) & (tp < 1.0)
    keep[rows] = torch.zeros_like(in_k).scatter(-1, order, in_k & ~drop)
    return keep


def served_logprobs(logits, top_p, top_k) -> torch.Tensor:
    """log q̃ [R, V]: the distribution a request samples from (top-k, top-p, renormalised), −inf
    outside the kept set; differentiable in the kept logits (the set itself is chosen detached)."""
    keep = nucleus_mask(logits.detach(), top_p, top_k)
    return F.log_softmax(logits.float().masked_fill(~keep, float("-inf")), dim=-1)


def served_target_probs(target_logp, nucleus_logp, nucleus_log_mass) -> torch.Tensor:
    """p̃ [..., Vd]: the target's verified distribution (its top-k/top-p set, renormalised over that
    set of the FULL vocabulary) at the draft ids; 0 outside the set. Sums to <= 1 over Vd."""
    keep = target_logp >= nucleus_logp.unsqueeze(-1)
    return torch.where(keep, (target_logp - nucleus_log_mass.unsqueeze(-1)).exp(), torch.zeros_like(target_logp))


def acceptance_prob(draft_logp, target_probs) -> torch.Tensor:
    """Probability that d ~ q̃ is accepted by lossless rejection sampling: Σ_v min(q̃_v, p̃_v).

    `draft_logp` = log q̃ (−inf allowed), `target_probs` = p̃ over the same ids, NOT renormalised
    over them: renormalising (p̃ / Σ_Vd p̃) would overstate acceptance by the target mass outside the
    draft vocabulary. Returns [...], differentiable in q; callers detach it where it is a constant.
    """
    return torch.minimum(draft_logp.float().exp(), target_probs.detach().float()).sum(-1)


def greedy_acceptance(draft_logits, target_tokens) -> torch.Tensor:
    """q(x*) [...]: the relaxation of greedy acceptance 1[argmax q = x*] (x* the target's argmax,
    −1 outside the draft vocabulary: a certain rejection, 0)."""
    q = F.softmax(draft_logits.float(), dim=-1)
    return q.gather(-1, target_tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (target_tokens >= 0)


def expected_accept_length(alpha, rows) -> torch.Tensor:
    """Mean over `rows` [N] of Σ_j Π_{l≤j} α_l: the expected accepted tokens of a chain drafted from
    each row under the current draft (α [N, K] per depth, 0 past a trace's end). Differentiable in α:
    raising an early depth's α pays for every deeper one, the credit that per-depth terms lack."""
    per_row = alpha.float().cumprod(-1).sum(-1)
    return (per_row * rows).sum() / rows.sum().clamp_min(1)


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


def proposal_logp(draft_logits, proposal_row, proposals, top_p=None, top_k=None) -> torch.Tensor:
    """log q̃_θ(d_j) [M, K] of each logged proposal under the current draft (with grad), where q̃ is
    the distribution the step's request samples from (`top_p`/`top_k` [M] per step; None: plain
    softmax). A proposal outside the current draft's top-k/top-p set gets −1e4 (ratio 0, no grad).

    Junk ids at masked depths are clamped into range; callers mask those entries out.
    """
    logits = draft_logits[proposal_row].float()
    m, k, v = logits.shape
    if top_p is None:
        logq = F.log_softmax(logits, dim=-1)
    else:
        logq = served_logprobs(logits.reshape(-1, v), top_p.repeat_interleave(k), top_k.repeat_interleave(k))
        logq = logq.view(m, k, v)
    ids = proposals.clamp(0, v - 1)
    return logq.gather(-1, ids.unsqueeze(-1)).squeeze(-1).clamp_min(-1e4)


def policy_gradient_loss(logq, advantages, valid, weights) -> torch.Tensor:
    """−mean over valid proposal entries of w_j · stopgrad(A_j) · log q_θ(d_j).

    `advantages` come from `offpolicy.chain_vtrace` (already ρ-truncated). A rejected proposal has
    A < 0, so one descent step lowers its probability; an accepted one has A > 0 and rises. The mean
    is over the count of valid entries (not Σ w) so that reach weights shrink deep, unlikely depths.
    """
    w = torch.as_tensor(weights, dtype=logq.dtype, device=logq.device)
    term = torch.where(valid, w * advantages.detach() * logq, torch.zeros_like(logq))
    return -term.sum() / valid.sum().clamp_min(1)
