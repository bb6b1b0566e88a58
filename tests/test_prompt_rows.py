"""Training on prompt positions (``prompt_bases``): which rows are added, their labels, and that the
learner actually learns from them."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.training.batching import collate
from aurora_rl.training.ttt import unroll
from tests.test_learner import DEPTH, new_learner, served  # noqa: F401  (fixture)


@pytest.mark.unit
def test_prompt_rows_come_after_the_generated_rows_and_leave_them_unchanged(served):
    model, traces = served
    learner = new_learner(model)
    plain = collate(traces, learner.draft, learner.target_head, DEPTH)
    gen = torch.Generator().manual_seed(0)
    mixed = collate(traces, learner.draft, learner.target_head, DEPTH, prompt_bases=3, generator=gen)
    for b, t in enumerate(traces):
        P, n = len(t.prompt_ids), int(plain.ttt.base_valid[b].sum())
        assert torch.equal(mixed.ttt.bases[b, :n], plain.ttt.bases[b, :n])
        assert torch.equal(mixed.target_tokens[b, :n], plain.target_tokens[b, :n])
        torch.testing.assert_close(mixed.target_logp[b, :n], plain.target_logp[b, :n])
        extra = mixed.ttt.bases[b, n:][mixed.ttt.base_valid[b, n:]]
        assert len(extra) == min(3, P - 1)
        assert bool((extra < P - 1).all()) and len(extra.unique()) == len(extra)
    # Logged proposals still point at the same (generated) rows.
    S_plain, S_mixed = plain.ttt.bases.shape[1], mixed.ttt.bases.shape[1]
    rows_plain = plain.proposal_row // S_plain * S_mixed + plain.proposal_row % S_plain
    assert torch.equal(mixed.proposal_row, rows_plain)
    assert torch.equal(mixed.proposals, plain.proposals)
    assert mixed.num_tokens > plain.num_tokens


@pytest.mark.unit
def test_prompt_rows_are_labelled_with_the_targets_greedy_token(served):
    model, traces = served
    learner = new_learner(model)
    batch = collate(traces, learner.draft, learner.target_head, DEPTH, prompt_bases=100)
    head = model.lm_head.weight.float()
    checked_prompt = checked_generated = 0
    for b, t in enumerate(traces):
        P, n = len(t.prompt_ids), len(t.output_ids) - 1
        for s in range(n, int(batch.ttt.base_valid[b].sum())):
            i = int(batch.ttt.bases[b, s])
            for j in range(1, DEPTH + 1):
                if not batch.mask[b, s, j - 1]:
                    continue
                p = i + j + 1  # the token this entry predicts
                if p <= P - 1:  # inside the prompt: what the target would have said there
                    want = int((t.hidden[p - 1].float() @ head.T).argmax())
                    checked_prompt += 1
                else:  # generated: what the target did say
                    want = int(t.tokens[p])
                    checked_generated += 1
                want_draft = int(learner.draft.target_to_draft(torch.tensor([want]))[0])
                assert int(batch.target_tokens[b, s, j - 1]) == want_draft, (b, s, j)
    assert checked_prompt > 10 and checked_generated > 0


@torch.no_grad()
def _prompt_ntp(learner, traces) -> float:
    """Cross entropy on the prompt rows only (all prompt positions)."""
    batch = collate(traces, learner.draft, learner.target_head, DEPTH, prompt_bases=10_000)
    logits = unroll(learner.draft, batch.ttt, DEPTH)
    rows = torch.zeros_like(batch.ttt.base_valid)
    for b, t in enumerate(traces):
        n = len(t.output_ids) - 1
        rows[b, n:] = batch.ttt.base_valid[b, n:]
    valid = batch.mask & (batch.target_tokens >= 0) & rows.unsqueeze(-1)
    logp = logits.log_softmax(-1).gather(-1, batch.target_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-logp[valid].mean())


@pytest.mark.unit
def test_learner_learns_the_prompt_rows_only_when_asked(served):
    model, traces = served
    with_prompt = new_learner(model, algorithm="aurora", prompt_bases=64)
    without = new_learner(model, algorithm="aurora")
    start = _prompt_ntp(with_prompt, traces)
    assert start == pytest.approx(_prompt_ntp(without, traces))
    for _ in range(6):
        m_with = with_prompt.update(traces)
        m_without = without.update(traces)
    assert _prompt_ntp(with_prompt, traces) < _prompt_ntp(without, traces) - 0.3
    assert m_with["data/num_tokens"] > m_without["data/num_tokens"]


@pytest.mark.unit
def test_negative_prompt_bases_is_refused():
    from aurora_rl.training.learner import LearnerConfig

    with pytest.raises(ValueError, match="learner.prompt_bases"):
        LearnerConfig(prompt_bases=-1)
