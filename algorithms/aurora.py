"""`aurora` (default): distillation, expected accept length, and an acceptance-reward policy gradient.

Loss = λ_ntp·NTP + λ_rkl·KL(q_θ‖p) − λ_acc·E[accept length] + λ_pg·PG, every term at the distribution
each row's request was verified under (`algorithms.batch`). NTP, reverse KL and the expected accept
length Σ_j Π_{l≤j} α_l use every TTT entry: the target's token stream does not depend on the draft, so
they need no correction. PG uses the logged proposals: reward 1 per accepted proposal, 0 at the first
rejection, V-trace along each speculation chain with the current draft's expected accept length as
the baseline, ratios truncated at ρ̄, steps more than `max_lag` published versions old dropped and
counted, deterministic (greedy) proposals left out (`algorithms.offpolicy`). Depth weights for NTP,
RKL and PG: γ^(j−1) or reach probability. PG is off by default: in the offline ablation its removal
changed nothing (docs/RESULTS.md, session 9); it is one coefficient away.
"""

from __future__ import annotations

from dataclasses import dataclass

from algorithms.base import (
    AlgorithmConfig, acceptance, chain_mask, check_choice, check_range, learnable_steps,
)
from algorithms.batch import LossBatch, LossOutput
from algorithms.metrics import batch_metrics
from algorithms.offpolicy import RLLIB_C_BAR, chain_vtrace, drop_stale
from algorithms.registry import register
from algorithms.terms import (
    DEPTH_WEIGHT_KINDS, depth_weights, expected_accept_length, ntp_loss, policy_gradient_loss, proposal_logp,
    reverse_kl,
)


@dataclass
class AuroraConfig(AlgorithmConfig):
    """Hyperparameters of the `aurora` objective."""

    ntp_coef: float = 1.0
    """λ_ntp: weight of next-token cross entropy on the emitted tokens."""
    rkl_coef: float = 1.0
    """λ_rkl: weight of KL(q_θ‖p), the dense signal that shapes q where rejection sampling looks. On
    as part of the best measured combination; alone beside NTP it made no difference (RESULTS session 9)."""
    accept_coef: float = 1.0
    """λ_acc: weight of the expected accept length Σ_j Π_{l≤j} α_l (maximised), the serving reward
    computed exactly from q and p, differentiable in q. Its removal cost 0.020 of held-out accept
    length on greedy traffic (docs/RESULTS.md, session 9)."""
    pg_coef: float = 0.0
    """λ_pg: weight of the acceptance policy gradient on logged sampled proposals (V-trace corrected):
    what only the logs can tell. Greedy proposals add nothing to it (see the module docstring). Off by
    default: its removal changed the held-out accept length by 0.000 (docs/RESULTS.md, session 9)."""
    depth_weighting: str = "gamma"
    """"gamma": γ^(j−1); "reach": probability that the current draft reaches depth j."""
    gamma: float = 0.8
    """Depth decay for "gamma" weighting, in (0, 1]; 0.8 as in EAGLE3."""
    rho_bar: float = 1.0
    """ρ̄: importance-ratio truncation for the V-trace value targets; ≥ c̄ as IMPALA assumes."""
    pg_rho_bar: float = 1.0
    """ρ̄_pg: importance-ratio truncation in the policy-gradient advantages; > 0."""
    c_bar: float = 1.0
    """c̄: trace-cutting truncation. RLlib's vtrace_torch fixes c = min(1, ρ), so only 1.0 is valid."""
    max_lag: int = 8
    """Drop logged steps proposed more than this many published policy versions ago (counted)."""

    def __post_init__(self) -> None:
        for name in ("ntp_coef", "rkl_coef", "accept_coef", "pg_coef"):
            check_range(self, name, lo=0.0)
        check_choice(self, "depth_weighting", DEPTH_WEIGHT_KINDS)
        check_range(self, "gamma", lo=0.0, hi=1.0, lo_open=True)
        if self.c_bar != RLLIB_C_BAR:
            raise ValueError(
                f"AuroraConfig.c_bar must be {RLLIB_C_BAR} (RLlib's vtrace_torch hard-codes "
                f"c = min(1, rho)), got {self.c_bar!r}")
        check_range(self, "rho_bar", lo=self.c_bar)
        check_range(self, "pg_rho_bar", lo=0.0, lo_open=True)
        if isinstance(self.max_lag, bool) or not isinstance(self.max_lag, int) or self.max_lag < 0:
            raise ValueError(f"AuroraConfig.max_lag must be an integer >= 0, got {self.max_lag!r}")


@register("aurora", AuroraConfig)
def loss(batch: LossBatch, cfg: AuroraConfig) -> LossOutput:
    """The aurora objective on one batch; see the module docstring."""
    n, k = batch.mask.shape
    alpha_grad = acceptance(batch, detach=False) if cfg.accept_coef else None
    alpha = alpha_grad.detach() if alpha_grad is not None else acceptance(batch).detach()
    weights = depth_weights(cfg.depth_weighting, cfg.gamma, alpha, k).expand(n, k)
    ntp = ntp_loss(batch.draft_logits, batch.target_tokens, batch.mask, weights)
    rkl = reverse_kl(batch.draft_logits, batch.target_logp, batch.mask, weights)
    rows = batch.mask[:, 0] & batch.nucleus_known[:, 0]
    eal = expected_accept_length(alpha_grad if alpha_grad is not None else alpha, rows)

    stale = drop_stale(batch.lag, cfg.max_lag)
    keep = learnable_steps(batch, stale.keep)
    logq = proposal_logp(batch.draft_logits, batch.proposal_row, batch.proposals,
                         batch.top_p[batch.proposal_row], batch.top_k[batch.proposal_row])
    chain = chain_mask(batch, keep)
    vt = chain_vtrace(logq, batch.behaviour_logp, batch.accepted, chain, alpha[batch.proposal_row],
                      cfg.rho_bar, cfg.pg_rho_bar)
    pg = policy_gradient_loss(logq, vt.pg_advantages, vt.valid, weights[batch.proposal_row])

    total = cfg.ntp_coef * ntp + cfg.rkl_coef * rkl - cfg.accept_coef * eal + cfg.pg_coef * pg
    metrics = {
        "losses/total": float(total.detach()),
        "losses/ntp": float(ntp.detach()),
        "losses/rkl": float(rkl.detach()),
        "losses/expected_accept_length": float(eal.detach()),
        "losses/pg": float(pg.detach()),
        "losses/value_target_mean": float(vt.vs[vt.valid].mean()) if vt.valid.any() else 0.0,
        "losses/advantage_mean": float(vt.pg_advantages[vt.valid].mean()) if vt.valid.any() else 0.0,
    }
    metrics.update(batch_metrics(batch, alpha, keep, stale.dropped, cfg.pg_rho_bar, logq.detach()))
    return LossOutput(total, metrics)
