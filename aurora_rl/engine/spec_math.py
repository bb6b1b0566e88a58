"""Pure propose/verify math for speculative decoding (no model, no engine state).

Greedy verification keeps the longest prefix of proposals equal to the target's argmax and then takes
the target's own token. Rejection sampling (Leviathan et al., Chen et al.) accepts proposal d with
probability min(1, p(d)/q(d)); on the first rejection it samples from the normalised residual
max(p - q, 0). Either way the emitted tokens are distributed exactly as the target's: speculation
changes speed, never outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: int
    """How many proposals the target kept (0..k)."""
    next_token: int
    """The target's token after the kept prefix: a correction on rejection, a bonus when all pass."""


def greedy_verify_batch(proposals: torch.Tensor, lookahead: torch.Tensor, target_argmax: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of proposals [B, K] (only the first lookahead[b] count) against target argmax [B, K+1].

    Returns (accepted [B], next_token [B]).
    """
    B, K = proposals.shape
    valid = torch.arange(K).unsqueeze(0) < lookahead.unsqueeze(1)
    match = (proposals == target_argmax[:, :K]) & valid
    accepted = match.long().cumprod(dim=1).sum(dim=1)
    return accepted, target_argmax.gather(1, accepted.unsqueeze(1)).squeeze(1)


def rejection_verify(proposals: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                     generator: torch.Generator | None) -> Verdict:
    """Lossless verification of one chain: proposals [k], draft probs q [k, V], target probs p [k+1, V]."""
    k = proposals.numel()
    for j in range(k):
        d = int(proposals[j])
        u = float(torch.rand((), generator=generator))
        # Accept with probability min(1, p/q); q(d) > 0 because d was sampled from q.
        if u * float(q[j, d]) <= float(p[j, d]):
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        total = float(residual.sum())
        # residual is all zero only when p == q, and then rejection has probability 0.
        dist = residual / total if total > 0 else p[j]
        return Verdict(j, int(torch.multinomial(dist, 1, generator=generator)))
    return Verdict(k, int(torch.multinomial(p[k], 1, generator=generator)))
