"""Traces -> a padded training batch: TTT inputs, target distributions, masks and logged proposals.

Chains are unrolled at the bases serving runs them from (i = P-1 .. L-2, the positions after which the
target generated), so depth j at base i predicts generated token x_{i+j+1}. The target distribution
for that token is the target's lm_head applied to the stored final-norm hidden state at i+j,
restricted to the draft vocabulary; full target logits never travel through the buffer.

Optionally (``prompt_bases`` > 0) up to that many prompt positions per trace are unrolled too: the
taps of the prompt are in the trace already and the depth-1 pass computes them anyway, so they add
draft-training rows at little cost. At a prompt position the target emitted nothing, so the NTP label
is the target's greedy token there (argmax of its full lm_head over the stored hidden state), which is
what greedy verification would check; the KL terms use the target distribution as everywhere else.
Prompt rows come after a trace's generated rows and carry no logged proposals.

Each row is computed at the distribution its request was verified under: logits at its temperature
(T = 1 for greedy), the target's log-probabilities normalised over the FULL vocabulary with the
normaliser the engine recorded (``Trace.served_stats``; recomputed here from the full lm_head where
it was not recorded, e.g. prompt positions), and the target's top-k/top-p set from those stats. Where
a top-k/top-p set was not recorded (prompt positions of such traffic: finding it needs a sort of the
full vocabulary) the entry is marked ``nucleus_known = False`` and only the distillation terms use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms import LossBatch
from aurora_rl.engine.trace import Trace
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.training.ttt import TTTInputs


@dataclass
class TraceBatch:
    ttt: TTTInputs
    target_logp: torch.Tensor
    """[B, S, K, Vd] log p_T over the full vocabulary at the draft ids (no grad); see ``LossBatch``."""
    nucleus_logp: torch.Tensor
    """[B, S, K] smallest kept log p_T of the target's top-k/top-p set (-inf: nothing cut)."""
    nucleus_log_mass: torch.Tensor
    """[B, S, K] log of the target's mass inside that set (0: nothing cut)."""
    nucleus_known: torch.Tensor
    """[B, S, K] bool: the set is known there."""
    temperature: torch.Tensor
    """[B] float: each trace's temperature (1 for greedy traces)."""
    top_p: torch.Tensor
    """[B] float."""
    top_k: torch.Tensor
    """[B] long."""
    greedy: torch.Tensor
    """[B] bool."""
    target_tokens: torch.Tensor
    """[B, S, K] draft ids of the emitted tokens, -1 outside the draft vocabulary."""
    mask: torch.Tensor
    """[B, S, K] bool."""
    proposal_row: torch.Tensor
    """[M] rows into the flattened [B*S] bases."""
    proposals: torch.Tensor
    behaviour_logp: torch.Tensor
    accepted: torch.Tensor
    proposal_mask: torch.Tensor
    proposal_version: torch.Tensor
    """[M] long: draft version that made each logged step (lag is taken against the learner's version
    at loss time)."""
    deterministic: torch.Tensor
    """[M] bool: the step's proposals were greedy (a point mass)."""
    num_tokens: int
    """Rows with a valid depth-1 entry: generated tokens, plus prompt rows when those are trained on."""

    def loss_batch(self, draft_logits: torch.Tensor, policy_version: int) -> LossBatch:
        """The algorithms' view; a trace from a newer version than the learner counts as lag 0 (the
        learner reports how many such steps it saw)."""
        B, S, K, V = draft_logits.shape
        per_row = lambda t: t.repeat_interleave(S)  # noqa: E731  trace b's value on its S rows
        logits = draft_logits.float() / self.temperature.view(B, 1, 1, 1)
        return LossBatch(
            draft_logits=logits.reshape(B * S, K, V), target_logp=self.target_logp.reshape(B * S, K, V),
            nucleus_logp=self.nucleus_logp.reshape(B * S, K), nucleus_log_mass=self.nucleus_log_mass.reshape(B * S, K),
            nucleus_known=self.nucleus_known.reshape(B * S, K), top_p=per_row(self.top_p),
            top_k=per_row(self.top_k), greedy=per_row(self.greedy),
            target_tokens=self.target_tokens.reshape(B * S, K), mask=self.mask.reshape(B * S, K),
            proposal_row=self.proposal_row, proposals=self.proposals, behaviour_logp=self.behaviour_logp,
            deterministic=self.deterministic, accepted=self.accepted, proposal_mask=self.proposal_mask,
            lag=(policy_version - self.proposal_version).clamp(min=0),
        )


def _prompt_bases(P: int, budget: int, generator: torch.Generator | None) -> torch.Tensor:
    """Up to ``budget`` prompt positions in 0..P-2 (all of them when there are fewer), sorted."""
    n = max(P - 1, 0)
    if budget >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:budget].sort().values


def _temperature(t: Trace) -> float:
    return 1.0 if t.greedy else float(t.temperature)


def _target_rows(t: Trace, bases: torch.Tensor, depth: int, target_head: torch.Tensor):
    """(tokens x_0..x_L, served stats [L, 3]) of ``t`` for chains from ``bases``: each prompt token a
    chain predicts replaced by the target's greedy choice there, and the log-normaliser filled in where
    the engine did not record it. Only those positions pay for the full lm_head, in one product."""
    tokens, stats = t.tokens.clone(), t.served_stats.float().clone()
    P, L = len(t.prompt_ids), t.num_positions
    if not len(bases):
        return tokens, stats
    hid = (bases.view(-1, 1) + torch.arange(1, depth + 1)).flatten().unique()
    hid = hid[hid <= L - 1]  # hidden state at h predicts token h + 1
    need = hid[(hid + 1 <= P - 1) | stats[hid, 0].isnan()]
    if not len(need):
        return tokens, stats
    with torch.no_grad():
        full = t.hidden[need].to(target_head.dtype) @ target_head.T
        label = need + 1 <= P - 1
        tokens[need[label] + 1] = full[label].argmax(-1)
        missing = stats[need, 0].isnan()
        rows = need[missing]
        logz = torch.logsumexp(full[missing].float() / _temperature(t), -1)
        cuts = not t.greedy and (t.top_p < 1.0 or t.top_k > 0)
        # No sort of the full vocabulary here: where the engine kept no top-k/top-p set, it stays unknown.
        stats[rows] = torch.stack([logz, torch.full_like(logz, float("nan") if cuts else float("-inf")),
                                   torch.full_like(logz, float("nan")) if cuts else logz], -1)
    return tokens, stats


def collate(traces: list[Trace], draft: Eagle3Draft, target_head: torch.Tensor, depth: int,
            prompt_bases: int = 0, generator: torch.Generator | None = None) -> TraceBatch:
    """Pad ``traces`` into one batch for unrolling ``draft`` to ``depth``.

    ``target_head`` is the target's lm_head weight [V, H] (frozen). ``prompt_bases``: prompt positions
    per trace to train on as well (sampled with ``generator`` when a prompt has more; 0 = none).
    """
    if not traces:
        raise ValueError("collate needs at least one trace")
    if prompt_bases < 0:
        raise ValueError(f"prompt_bases must be >= 0, got {prompt_bases}")
    Ls = [t.num_positions for t in traces]
    Ps = [len(t.prompt_ids) for t in traces]
    extra = [_prompt_bases(P, prompt_bases, generator) if prompt_bases else torch.zeros(0, dtype=torch.long)
             for P in Ps]
    T = max(Ls)
    S = max(max(L - P, 0) + len(e) for L, P, e in zip(Ls, Ps, extra))
    S = max(S, 1)
    B, K = len(traces), depth
    F, H = traces[0].taps.shape[1], traces[0].hidden.shape[1]
    tokens = torch.zeros(B, T + 1, dtype=torch.long)
    labels = torch.zeros(B, T + 1, dtype=torch.long)
    feats = torch.zeros(B, T, F, dtype=draft.dtype)
    hidden = torch.zeros(B, T + K, H)
    # Padding rows: a harmless normaliser (entries there are masked, but must stay finite for backward).
    stats = torch.zeros(B, T + K, 3)
    bases = torch.zeros(B, S, dtype=torch.long)
    base_valid = torch.zeros(B, S, dtype=torch.bool)
    for b, (t, L, P, e) in enumerate(zip(traces, Ls, Ps, extra)):
        tokens[b, : L + 1] = t.tokens[: L + 1]
        n = max(L - P, 0)
        rows_tokens, rows_stats = _target_rows(t, torch.cat([torch.arange(P - 1, P - 1 + n), e]), K, target_head)
        labels[b, : L + 1] = rows_tokens[: L + 1]
        stats[b, :L] = rows_stats
        feats[b, :L] = t.taps.to(draft.dtype)
        hidden[b, :L] = t.hidden.float()
        bases[b, :n] = torch.arange(P - 1, P - 1 + n)
        bases[b, n:n + len(e)] = e
        base_valid[b, :n + len(e)] = True
    # Depth j at base i predicts x_{i+j+1}, which must exist (index <= L).
    j = torch.arange(1, K + 1).view(1, 1, K)
    pred_pos = bases.unsqueeze(-1) + j  # index of hidden state predicting x_{i+j+1}
    lengths = torch.tensor(Ls)
    mask = base_valid.unsqueeze(-1) & (pred_pos <= lengths.view(B, 1, 1) - 1)
    tgt_ids = labels.gather(1, (pred_pos + 1).clamp(max=T).view(B, -1)).view(B, S, K)
    target_tokens = draft.target_to_draft(tgt_ids).masked_fill(~mask, -1)
    temperature = torch.tensor([_temperature(t) for t in traces])
    with torch.no_grad():
        flat = pred_pos.clamp(max=T + K - 1).view(B, -1)
        h = hidden.gather(1, flat.unsqueeze(-1).expand(-1, -1, H)).view(B, S, K, H)
        st = stats.gather(1, flat.unsqueeze(-1).expand(-1, -1, 3)).view(B, S, K, 3)
        st = torch.where(mask.unsqueeze(-1), st, torch.tensor([0.0, float("-inf"), 0.0]))
        w = target_head[draft.draft_to_target].float()
        target_logp = (h @ w.T) / temperature.view(B, 1, 1, 1) - st[..., 0:1]
    known = ~st[..., 1].isnan()
    props = _proposals(traces, draft, bases, S, K)
    return TraceBatch(
        ttt=TTTInputs(tokens=tokens, features=feats, lengths=lengths, bases=bases, base_valid=base_valid),
        target_logp=target_logp, nucleus_logp=torch.where(known, st[..., 1] - st[..., 0], float("-inf")),
        nucleus_log_mass=torch.where(known, st[..., 2] - st[..., 0], 0.0), nucleus_known=known,
        temperature=temperature, top_p=torch.tensor([float(t.top_p) for t in traces]),
        top_k=torch.tensor([int(t.top_k) for t in traces], dtype=torch.long),
        greedy=torch.tensor([bool(t.greedy) for t in traces]),
        target_tokens=target_tokens, mask=mask, num_tokens=int(mask[..., 0].sum()), **props,
    )


def _proposals(traces, draft, bases, S: int, K: int) -> dict:
    rows, props, logp, acc, pmask, lag, det = [], [], [], [], [], [], []
    for b, t in enumerate(traces):
        if t.verify_steps == 0:
            continue
        P = len(t.prompt_ids)
        keep = (t.lookahead > 0) & ~t.copied & (t.step_position - (P - 1) < S)  # copies: no draft proposals
        if not keep.any():
            continue
        steps = keep.nonzero().flatten()
        k = min(K, t.proposals.shape[1])
        p = torch.full((len(steps), K), -1, dtype=torch.long)
        p[:, :k] = t.proposals[steps, :k]
        ids = draft.target_to_draft(p.clamp(min=0)).masked_fill(p < 0, -1)
        lp = torch.zeros(len(steps), K)
        lp[:, :k] = t.behaviour_logp[steps, :k]
        rows.append(b * S + (t.step_position[steps] - (P - 1)))
        depth_ok = torch.arange(K).unsqueeze(0) < t.lookahead[steps].unsqueeze(1)
        # A proposal outside this draft's vocabulary (traces of a draft with another vocabulary: an older
        # one before a refresh, or another draft's recordings) is one this draft cannot make: the chain
        # is scored up to it, and its logged outcome counts only as far as the chain is kept.
        usable = (depth_ok & (ids >= 0)).long().cumprod(1).bool()
        pmask.append(usable)
        props.append(ids.clamp(min=0))
        logp.append(lp)
        acc.append(torch.minimum(t.accepted[steps], usable.sum(1)))
        lag.append(t.policy_version[steps])
        det.append(torch.full((len(steps),), bool(t.greedy)))
    if not rows:
        z = torch.zeros(0, K)
        return dict(proposal_row=torch.zeros(0, dtype=torch.long), proposals=z.long(), behaviour_logp=z,
                    accepted=torch.zeros(0, dtype=torch.long), proposal_mask=z.bool(),
                    proposal_version=torch.zeros(0, dtype=torch.long), deterministic=torch.zeros(0, dtype=torch.bool))
    return dict(proposal_row=torch.cat(rows), proposals=torch.cat(props), behaviour_logp=torch.cat(logp),
                accepted=torch.cat(acc), proposal_mask=torch.cat(pmask), proposal_version=torch.cat(lag),
                deterministic=torch.cat(det))
