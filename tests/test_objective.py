"""The acceptance objective at the served distribution: hand-computed values for a sampled row at
T=0.7 with top-p, a greedy row, a mixed batch, the unnormalised alpha, the expected accept length,
deterministic proposals, and the trace -> batch path against the engine's own sampling functions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from algorithms import AuroraConfig, LossBatch, get_algorithm
from algorithms.base import acceptance, learnable_steps
from algorithms.terms import expected_accept_length, served_logprobs, served_target_probs
from aurora_rl.engine import SamplingParams
from aurora_rl.engine.engine import EngineConfig, LLMEngine
from aurora_rl.engine.sampling import processed_probs, served_stats
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.training.batching import collate
from tests.conftest import tiny_target
from tests.test_engine import prompts
from tests.test_speculative import make_draft

pytestmark = pytest.mark.unit
LN = math.log


def t(x, **kw):
    return torch.tensor(x, **kw)


def test_served_stats_by_hand_at_t07_with_top_p():
    # logits = 0.7 ln [6, 3, 1] -> z = logits / 0.7 = ln [6, 3, 1], p_T = [.6, .3, .1]. top_p .8:
    # masses before each sorted token [0, .6, .9] -> the third is cut. logsumexp z = ln 10, the
    # smallest kept z = ln 3, logsumexp of the kept z = ln 9.
    logits = 0.7 * t([[LN(6), LN(3), LN(1)]])
    stats = served_stats(logits, SamplingParams(temperature=0.7, top_p=0.8))
    assert_close(stats, t([[LN(10), LN(3), LN(9)]]))
    # Greedy: the normaliser at T = 1, nothing cut.
    g = served_stats(t([[0.0, 0.0]]), SamplingParams(temperature=0.0))
    assert_close(g, t([[LN(2), float("-inf"), LN(2)]]))


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.7, 0.9, 0), (1.3, 1.0, 5), (0.7, 0.6, 7), (1.0, 1.0, 0)])
def test_served_logprobs_match_the_engines_processed_probs(temperature, top_p, top_k):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    engine = processed_probs(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))
    ours = served_logprobs(logits / temperature, torch.full((6,), top_p), torch.full((6,), top_k)).exp()
    assert_close(ours, engine, atol=1e-6, rtol=1e-5)


def mixed_batch() -> LossBatch:
    """Row 0 sampled at T=0.7 with top-p .8, row 1 greedy; K = 1, draft vocab = ids 0..2 of a 4-id
    target vocab.

    Row 0: draft logits/T = ln [1, 2, 5] -> q_T = [.125, .25, .625]; top-p .8 cuts .125 (mass before
    it .875) -> q̃ = [0, 2/7, 5/7]. Target p_T over the full vocab = [.6, .3, .05, .05]; top-p .8
    keeps {0, 1} (mass .9) -> p̃ = [2/3, 1/3, 0 | 0]. α = min(0, 2/3) + min(2/7, 1/3) + 0 = 2/7.
    Row 1: greedy, the target emitted draft id 2; q = softmax(ln [1, 1, 2]) -> α = q(2) = .5.
    """
    draft = t([[[LN(1), LN(2), LN(5)]], [[0.0, 0.0, LN(2)]]], requires_grad=True)
    target_logp = t([[[LN(0.6), LN(0.3), LN(0.05)]], [[LN(0.1), LN(0.2), LN(0.6)]]])
    return LossBatch(
        draft_logits=draft, target_logp=target_logp, nucleus_logp=t([[LN(0.3)], [float("-inf")]]),
        nucleus_log_mass=t([[LN(0.9)], [0.0]]), nucleus_known=t([[True], [True]]), top_p=t([0.8, 1.0]),
        top_k=t([0, 0]), greedy=t([False, True]), target_tokens=t([[0], [2]]), mask=t([[True], [True]]),
        proposal_row=t([0, 1]), proposals=t([[2], [2]]), behaviour_logp=t([[LN(5 / 7)], [0.0]]),
        deterministic=t([False, True]), accepted=t([0, 1]), proposal_mask=t([[True], [True]]), lag=t([0, 0]),
    )


def test_alpha_of_a_sampled_row_a_greedy_row_and_a_mixed_batch():
    b = mixed_batch()
    assert_close(served_target_probs(b.target_logp[0], b.nucleus_logp[0], b.nucleus_log_mass[0]),
                 t([[2 / 3, 1 / 3, 0.0]]))
    alpha = acceptance(b, detach=False)
    assert_close(alpha, t([[2 / 7], [0.5]]))
    # Each row alone gives its own value: mixing greedy and sampled rows changes neither.
    for row, expect in ((0, 2 / 7), (1, 0.5)):
        one = LossBatch(**{k: (v[row:row + 1] if k not in ("proposal_row", "proposals", "behaviour_logp",
                                                              "deterministic", "accepted", "proposal_mask", "lag")
                               else v[row:row + 1]) for k, v in vars(b).items()} | {"proposal_row": t([0])})
        assert_close(acceptance(one), t([[expect]]))
    alpha.sum().backward()
    # d/dz of the sampled row: only q̃(1) (below p̃) counts; the cut id 0 gets no gradient.
    assert b.draft_logits.grad[0, 0, 0] == 0 and b.draft_logits.grad[0, 0, 1] > 0


def test_unknown_nucleus_entries_are_left_out_of_acceptance():
    b = mixed_batch()
    b.nucleus_known[0, 0] = False
    assert_close(acceptance(b), t([[0.0], [0.5]]))


def test_expected_accept_length_by_hand_and_its_gradient():
    # Row 0: .5 + .5·.4 = .7; row 1: 1 + 1·0 = 1; mean .85. ∂/∂α_1 of row 0 = 1 + α_2 = 1.4, /2 rows.
    alpha = t([[0.5, 0.4], [1.0, 0.0]], requires_grad=True)
    eal = expected_accept_length(alpha, t([True, True]))
    assert_close(eal, t(0.85))
    eal.backward()
    assert_close(alpha.grad, t([[0.7, 0.25], [0.5, 0.5]]))
    assert_close(expected_accept_length(alpha, t([True, False])), t(0.7))


def test_deterministic_steps_get_no_policy_gradient():
    b = mixed_batch()
    assert learnable_steps(b).tolist() == [True, False]
    cfg = AuroraConfig(ntp_coef=0.0, rkl_coef=0.0, accept_coef=0.0, pg_coef=1.0)
    out = get_algorithm("aurora").loss(b, cfg)
    out.loss.backward()
    # Only the sampled row's logged step carries a policy gradient; the greedy row's is skipped.
    assert b.draft_logits.grad[0].abs().sum() > 0 and b.draft_logits.grad[1].abs().sum() == 0
    assert out.metrics["offpolicy/deterministic_steps"] == 1.0


def serve(model, draft, params, n=3, k=3):
    traces = []
    dec = SpecDecoder(draft, 3, 64, SpecConfig(lookahead=k, trace_dtype="float32"), trace_sink=traces.append)
    LLMEngine(model, EngineConfig(num_slots=3, max_len=64), decoder=dec).generate(prompts(n, 1), params)
    return traces


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_target()
    return model, make_draft(model)


def test_greedy_traces_log_behaviour_logp_zero_and_sampled_traces_their_sampling(tiny):
    model, draft = tiny
    greedy = serve(model, draft, SamplingParams(max_tokens=10, ignore_eos=True))
    assert all(tr.greedy and tr.temperature == 0.0 for tr in greedy)
    assert all(bool((tr.behaviour_logp == 0).all()) for tr in greedy)
    sampled = serve(model, draft, SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.7, top_p=0.9, seed=3))
    assert all((tr.temperature, tr.top_p, tr.greedy) == (0.7, 0.9, False) for tr in sampled)
    made = torch.cat([tr.behaviour_logp[tr.proposals >= 0] for tr in sampled])
    assert made.numel() and bool((made < 0).any()) and bool((made <= 0).all())


def test_collated_target_is_the_engines_served_distribution_over_the_full_vocab(tiny):
    model, draft = tiny
    params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.7, top_p=0.9, seed=5)
    traces = serve(model, draft, params)
    head = model.lm_head.weight.detach().float()
    batch = collate(traces, draft, head, 3)
    lb = batch.loss_batch(torch.zeros(*batch.target_logp.shape), 0)
    d2t = draft.draft_to_target
    for b, tr in enumerate(traces):
        P = len(tr.prompt_ids)
        for s in range(batch.mask.shape[1]):
            for j in range(3):
                if not batch.mask[b, s, j]:
                    continue
                full = tr.hidden[P + s + j].float() @ head.T  # base P-1+s, depth j+1: predicts x[P+s+j+1]
                p_t = torch.softmax(full / 0.7, -1)[d2t]
                assert_close(batch.target_logp[b, s, j].exp(), p_t, atol=1e-5, rtol=1e-4)
                row = b * batch.mask.shape[1] + s
                ours = served_target_probs(lb.target_logp[row, j], lb.nucleus_logp[row, j], lb.nucleus_log_mass[row, j])
                assert_close(ours, processed_probs(full, params)[d2t], atol=1e-5, rtol=1e-4)
    # Not renormalised over the draft vocab: the 64 draft ids of a 128-id vocab hold less than all.
    assert float(batch.target_logp[batch.mask].exp().sum(-1).max()) < 0.999


def test_proposals_outside_the_learners_vocabulary_cut_the_chain_there(tiny):
    """Traces of a draft with another vocabulary (before a refresh, or another draft's recordings): a
    proposal this draft cannot make ends the scored chain, and the logged acceptance counts only as far
    as the chain is kept, so the batch is valid (this raised 'accepted must lie in 0..k' before)."""
    model, draft = tiny
    traces = serve(model, draft, SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=2), n=3, k=3)
    other = make_draft(model, seed=1)  # another 64 of the 128 ids
    batch = collate(traces, other, model.lm_head.weight.detach().float(), 3)
    lb = batch.loss_batch(torch.zeros(*batch.target_logp.shape), 0)
    expect_mask, expect_acc = [], []
    for tr in traces:
        keep = (tr.lookahead > 0) & ~tr.copied
        for step in keep.nonzero().flatten().tolist():
            ids = other.target_to_draft(tr.proposals[step, :3].clamp(min=0)).masked_fill(tr.proposals[step, :3] < 0, -1)
            usable = [True] * 3
            for j in range(3):
                usable[j] = usable[j - 1] if j else True
                usable[j] = usable[j] and j < int(tr.lookahead[step]) and int(ids[j]) >= 0
            expect_mask.append(usable)
            expect_acc.append(min(int(tr.accepted[step]), sum(usable)))
    assert lb.proposal_mask.tolist() == expect_mask and lb.accepted.tolist() == expect_acc
    cut = [a for a, tr_acc in zip(expect_acc, torch.cat([tr.accepted[(tr.lookahead > 0) & ~tr.copied] for tr in traces]).tolist())
           if a < tr_acc]
    assert cut, "the traces should hold an accepted proposal outside the other draft's vocabulary"


def test_served_stats_of_a_batch_are_each_rows_own():
    """``served_stats_rows`` (a plain step's rows in one call, grouped by temperature) gives every row what
    ``served_stats`` gives it alone, for a batch mixing greedy, plain-temperature and truncated rows."""
    from aurora_rl.engine.sampling import served_stats_rows

    logits = (torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 4).bfloat16()
    rules = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_p=0.9),
             SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5)]
    got = served_stats_rows(logits, rules)
    want = torch.cat([served_stats(logits[b : b + 1], p) for b, p in enumerate(rules)])
    assert got.shape == (6, 3)
    assert_close(got, want, atol=2e-5, rtol=2e-6)
