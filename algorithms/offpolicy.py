"""Stale-policy correction for the terms that use logged proposals: ratios, ESS, lag, V-trace.

What needs no correction: under lossless verification the target's token stream does not depend
on the draft, so NTP, the KL terms and the expected accept length (computed from q_θ and p at every
trace position) are on-policy whatever draft served the request. What is corrected: the logged
proposals and their accept/reject outcomes were drawn from an older draft μ (at the request's
temperature, top-k, top-p), so the policy-gradient term reweights them by truncated importance ratios
q̃_θ(d)/μ(d), drops records more than `max_lag` published policy versions old, and uses V-trace
targets computed along each verify step's speculation chain. What is left out: deterministic
proposals (greedy drafting, context copies). μ is then a point mass, so q_θ/μ is no importance
weight, and the outcome (accepted iff d = the target's argmax) is a function of the target stream
that the dense terms already train on; `algorithms.base.learnable_steps` drops them from PG. Pure functions of tensors; Ray is imported
lazily inside `chain_vtrace` only (RLlib's `vtrace_torch`), so importing this module stays cheap.

RLlib's `vtrace_torch` (ray 2.60, `ray.rllib.algorithms.impala.torch.vtrace_torch_v2`) takes
ρ̄ (`clip_rho_threshold`, for vs) and ρ̄_pg (`clip_pg_rho_threshold`, for the advantages), but
hard-codes the trace-cutting coefficient c_s = min(1, ρ_s), i.e. c̄ = 1. So c̄ cannot be set here;
configs accept only `c_bar == 1.0` and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RLLIB_C_BAR = 1.0  # fixed inside RLlib's vtrace_torch: cs = torch.clamp(rhos, max=1.0)


@dataclass
class TruncatedRatios:
    """Importance ratios q_θ/μ of logged actions (detached)."""

    ratios: torch.Tensor
    """Raw ratios exp(log q_θ − log μ), same shape as the inputs."""
    clipped: torch.Tensor
    """min(ρ̄, ratio)."""
    clip_fraction: float
    """Fraction of valid entries whose ratio exceeded ρ̄ (0.0 when there are none)."""


def truncated_ratios(target_logp, behaviour_logp, rho_bar: float, mask=None) -> TruncatedRatios:
    """Importance ratios q_θ(d)/μ(d) truncated at ρ̄, and how often the truncation bites."""
    ratios = (target_logp.detach().float() - behaviour_logp.float()).exp()
    clipped = ratios.clamp(max=rho_bar)
    valid = torch.ones_like(ratios, dtype=torch.bool) if mask is None else mask
    n = int(valid.sum())
    frac = float(((ratios > rho_bar) & valid).sum()) / n if n else 0.0
    return TruncatedRatios(ratios, clipped, frac)


@dataclass
class EffectiveSampleSize:
    """Kish effective sample size (Σw)² / Σw² of importance weights."""

    normalized: float
    """ESS / n in (0, 1]: 1 when all weights are equal, → 1/n when one weight dominates; 0 if n = 0."""
    raw: float
    """ESS in samples (0 when n = 0)."""


def effective_sample_size(weights, mask=None) -> EffectiveSampleSize:
    """Kish ESS of the (valid) weights: how many on-policy samples the reweighted batch is worth."""
    w = weights.detach().float()
    if mask is not None:
        w = w[mask]
    w = w.flatten()
    if w.numel() == 0 or float((w * w).sum()) == 0.0:
        return EffectiveSampleSize(0.0, 0.0)
    raw = float(w.sum() ** 2 / (w * w).sum())
    return EffectiveSampleSize(raw / w.numel(), raw)


@dataclass
class StaleFilter:
    """Which logged verify steps are fresh enough to learn from."""

    keep: torch.Tensor
    """[M] bool: lag ≤ max_lag."""
    dropped: int
    """How many steps were dropped for being too stale (reported, never silent)."""


def drop_stale(lag: torch.Tensor, max_lag: int) -> StaleFilter:
    """Keep logged steps whose proposer is at most `max_lag` policy versions behind."""
    if lag.numel() and int(lag.min()) < 0:
        raise ValueError(f"lag must be >= 0 (current version minus proposer's), got min {int(lag.min())}")
    keep = lag <= max_lag
    return StaleFilter(keep, int((~keep).sum()))


@dataclass
class ChainVTrace:
    """V-trace along speculation chains, batch-major [M, K] (depth j at index j−1), detached."""

    vs: torch.Tensor
    """V-trace value targets v_j."""
    pg_advantages: torch.Tensor
    """min(ρ̄_pg, ρ_j) · (r_j + γ_j v_{j+1} − V_j): the policy-gradient advantage of proposal d_j."""
    values: torch.Tensor
    """V_j = expected accepted tokens from depth j on under the current draft (0 where invalid)."""
    rewards: torch.Tensor
    """r_j = 1 for accepted depths (j ≤ a), 0 at the first rejection."""
    discounts: torch.Tensor
    """1 after an accepted depth, 0 after the first rejection and after the chain's last depth."""
    valid: torch.Tensor
    """[M, K] bool: j ≤ min(a+1, k) within `proposal_mask`; the entries the loss may use."""


def chain_values(alpha: torch.Tensor, proposal_mask: torch.Tensor) -> torch.Tensor:
    """V_j = Σ_{i≥j} Π_{l=j..i} α_l over the chain's depths (j ≤ k), i.e. V_j = α_j (1 + V_{j+1}).

    α_l is the current draft's acceptance probability at depth l along the ground-truth prefix,
    which is exactly the prefix the chain is on while everything before l was accepted.
    """
    a = alpha.detach().float() * proposal_mask
    values = torch.zeros_like(a)
    nxt = torch.zeros_like(a[:, 0])
    for j in reversed(range(a.shape[1])):  # K ≤ ~8: a Python loop is cheaper than a scan kernel
        nxt = a[:, j] * (1.0 + nxt)
        values[:, j] = nxt
    return values


def chain_vtrace(target_logp, behaviour_logp, accepted, proposal_mask, alpha,
                 rho_bar: float = 1.0, pg_rho_bar: float | None = None) -> ChainVTrace:
    """V-trace targets and advantages treating one verify step's speculation chain as an episode.

    Action at depth j is the proposal d_j; reward r_j = 1 if j ≤ a (accepted), 0 at the first
    rejection j = a+1, after which the episode ends (discount 0; later depths were drafted on a
    wrong prefix and are not steps at all). Values V_j come from the current draft's acceptance
    probabilities `alpha` [M, K] (`chain_values`), bootstrap 0 at the chain end. Inputs [M, K]
    except `accepted` [M]; `target_logp` = log q_θ(d_j), `behaviour_logp` = log μ(d_j).
    ρ̄ truncates the ratios in the value targets, ρ̄_pg (default ρ̄) in the advantages; c̄ is 1.
    """
    from ray.rllib.algorithms.impala.torch.vtrace_torch_v2 import vtrace_torch

    m, k = proposal_mask.shape
    depth = torch.arange(1, k + 1, device=proposal_mask.device)
    valid = proposal_mask & (depth <= accepted.unsqueeze(1) + 1)
    rewards = (valid & (depth <= accepted.unsqueeze(1))).float()
    # Zero values outside the episode so padded steps have δ = 0 and never leak into valid ones.
    values = chain_values(alpha, proposal_mask) * valid
    if m == 0:
        empty = torch.zeros_like(values)
        return ChainVTrace(empty, empty.clone(), values, rewards, rewards.clone(), valid)
    # ρ = 1 on padded steps: their logged log-probs may be junk (−inf) and would give nan.
    log_q = torch.where(valid, target_logp.detach().float(), torch.zeros_like(values))
    log_mu = torch.where(valid, behaviour_logp.float(), torch.zeros_like(values))
    vs, adv = vtrace_torch(  # RLlib is time-major: [T=K, B=M]
        target_action_log_probs=log_q.T, behaviour_action_log_probs=log_mu.T,
        discounts=rewards.T, rewards=rewards.T, values=values.T,
        bootstrap_values=torch.zeros(m, device=values.device),
        clip_rho_threshold=rho_bar,
        clip_pg_rho_threshold=rho_bar if pg_rho_bar is None else pg_rho_bar,
    )
    return ChainVTrace(vs.T * valid, adv.T * valid, values, rewards, rewards.clone(), valid)
