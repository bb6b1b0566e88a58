"""Speculative decoding: pure accept math, lossless greedy and sampled outputs, rollback, traces."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.chain_proposer import ChainProposer
from aurora_rl.engine.spec_math import greedy_verify_batch, rejection_verify
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.models.draft import DraftConfig, Eagle3Draft, select_draft_vocab, token_frequencies
from tests.conftest import tiny_target
from tests.test_engine import prompts


def make_draft(model, vocab=64, seed=0):
    draft = Eagle3Draft(DraftConfig.for_target(model.config, draft_vocab_size=vocab)).init_from_target(model, seed)
    draft.set_vocab(torch.arange(128)[torch.randperm(128, generator=torch.Generator().manual_seed(seed))[:vocab]])
    return draft


def spec_engine(model, draft, k, slots=3, max_len=64, sink=None):
    dec = SpecDecoder(draft, slots, max_len, SpecConfig(lookahead=k), trace_sink=sink)
    return LLMEngine(model, EngineConfig(num_slots=slots, max_len=max_len), decoder=dec)


@pytest.mark.unit
def test_greedy_verify_by_hand():
    props = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 2, 3]])
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [4, 2, 3, 8]])
    acc, nxt = greedy_verify_batch(props, torch.tensor([3, 3, 2]), target)
    assert acc.tolist() == [3, 1, 0] and nxt.tolist() == [8, 6, 4]
    acc, nxt = greedy_verify_batch(props, torch.tensor([2, 0, 3]), target)
    assert acc.tolist() == [2, 0, 0] and nxt.tolist() == [7, 5, 4]


@pytest.mark.unit
def test_rejection_verify_emits_the_target_distribution():
    """Empirical law of the first emitted token over 20k draws equals p, not q (TV < 0.015)."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(20000):
        d = torch.multinomial(q[0], 1, generator=g)
        v = rejection_verify(d, q, p, g)
        tok = int(d) if v.accepted == 1 else v.next_token
        counts[tok] += 1
        accepted += v.accepted
    assert 0.5 * (counts / counts.sum() - p[0]).abs().sum() < 0.015
    # Acceptance rate is sum_v min(p, q) = 0.1 + 0.2 + 0.2 + 0 = 0.5.
    assert abs(accepted / 20000 - 0.5) < 0.015
    # A proposal the target gives zero mass is always rejected.
    assert rejection_verify(torch.tensor([3]), q, p, g).accepted == 0


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_speculation_is_token_identical(family):
    model, _ = tiny_target(family)
    ps = prompts(7)
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=64)).generate(ps, sp)
    draft = make_draft(model)
    for k in (0, 1, 3, 5):
        outs = spec_engine(model, draft, k).generate(ps, sp)
        assert [o.output_ids for o in outs] == [o.output_ids for o in base], f"lookahead {k}"
    # Mixed lookaheads in one batch, changing per request.
    mixed = [SamplingParams(max_tokens=20, ignore_eos=True, lookahead=i % 4) for i in range(7)]
    outs = spec_engine(model, draft, 2).generate(ps, mixed)
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]


class OracleProposer(ChainProposer):
    """Proposes the true greedy continuation, corrupted at chosen depths: exercises accept + rollback
    with real acceptances, which a random draft never produces."""

    truth: dict[tuple[int, ...], list[int]] = {}
    corrupt_every, calls = 3, 0

    def propose(self, seqs, ks):
        chains = super().propose(seqs, ks)
        for b, seq in enumerate(seqs):
            true = self.truth[tuple(seq.prompt_ids)][len(seq.output_ids):][: ks[b]]
            self.calls += 1
            bad = self.calls % self.corrupt_every
            chains.proposals[b] = [t if j != bad else (t + 1) % 128 for j, t in enumerate(true)]
        return chains


class OracleDecoder(SpecDecoder):
    """A decoder whose chains come from ``OracleProposer``."""

    proposer_type = OracleProposer

    def __init__(self, *a, truth, corrupt_every=3, **kw):
        super().__init__(*a, **kw)
        self.proposer.truth, self.proposer.corrupt_every = truth, corrupt_every


@pytest.mark.unit
def test_accepted_tokens_and_rollback_keep_outputs_identical():
    model, _ = tiny_target()
    ps = prompts(5)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=2, max_len=64)).generate(ps, sp)
    truth = {tuple(p): o.output_ids for p, o in zip(ps, base)}
    traces = []
    dec = OracleDecoder(make_draft(model), 2, 64, SpecConfig(lookahead=4), trace_sink=traces.append, truth=truth)
    outs = LLMEngine(model, EngineConfig(num_slots=2, max_len=64), decoder=dec).generate(ps, sp)
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]
    assert all(o.accept_length > 1.5 for o in outs)
    for o, t in zip(outs, traces_by_id(traces, outs)):
        assert t.accepted_tokens == o.accepted_tokens and t.verify_steps == o.verify_steps
        # Every accepted proposal is the token the target emitted at that position.
        tokens = t.tokens
        for i, pos in enumerate(t.step_position.tolist()):
            a = int(t.accepted[i])
            assert t.proposals[i, :a].tolist() == tokens[pos + 2: pos + 2 + a].tolist()
    assert dec.cache.lengths.sum() == 0  # every slot released


class EagerProposer(ChainProposer):
    """Feeds kept positions to the draft at once (no queue): the reference for lazy feeding."""

    def defer(self, slot, start, tokens, taps, copy=True):
        super().defer(slot, start, tokens, taps, copy)
        self.catch_up([SimpleNamespace(slot=slot)])


class EagerDecoder(SpecDecoder):
    proposer_type = EagerProposer


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_feeding_last_only_equals_the_full_pass(dtype):
    """Feeding a run of positions with ``logit_index`` computes only the indexed query: the same keys
    and values reach the cache and the indexed row's hidden state and logits equal the full pass's."""
    model, _ = tiny_target()
    draft = make_draft(model, vocab=48, seed=5).to_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    ids, feats = torch.randint(0, 128, (2, 9), generator=g), torch.randn(2, 9, 192, generator=g).to(dtype)
    pos = torch.stack([torch.arange(9), torch.arange(3, 12)])  # the second row continues a cached prefix
    last = torch.tensor([8, 5])
    slots = torch.tensor([1, 0])
    full_cache, lean_cache = draft.new_cache(2, 32), draft.new_cache(2, 32)
    with torch.inference_mode():
        full = draft(ids, draft.fuse(feats), pos, full_cache, slots)
        lean = draft(ids, draft.fuse(feats), pos, lean_cache, slots, logit_index=last)
    rows = torch.arange(2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lean.hidden, full.hidden[rows, last], **tol)
    torch.testing.assert_close(lean.logits, full.logits[rows, last], **tol)
    torch.testing.assert_close(lean_cache.k[0], full_cache.k[0])
    torch.testing.assert_close(lean_cache.v[0], full_cache.v[0])


@pytest.mark.unit
def test_lazy_draft_feeding_proposes_what_eager_feeding_proposes():
    """Rows at k = 0 only queue positions; the catch-up before their next proposal gives the same
    proposals as feeding every step, and a run at k = 0 throughout makes no draft call at all."""
    model, _ = tiny_target()
    ps = prompts(5)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=64)).generate(ps, sp)
    schedule = [0, 0, 3, 0, 1, 2, 0, 0, 0, 4]
    runs = {}
    for cls in (SpecDecoder, EagerDecoder):
        traces = []
        dec = cls(make_draft(model), 3, 64, SpecConfig(lookahead=3), trace_sink=traces.append)
        dec.lookahead_fn = lambda seqs: [schedule[(s.verify_steps + i) % len(schedule)] for i, s in enumerate(seqs)]
        outs = LLMEngine(model, EngineConfig(num_slots=3, max_len=64), decoder=dec).generate(ps, sp)
        assert [o.output_ids for o in outs] == [o.output_ids for o in base]
        runs[cls.__name__] = (dec, traces_by_id(traces, outs))
    (lazy, lazy_traces), (eager, eager_traces) = runs["SpecDecoder"], runs["EagerDecoder"]
    for a, b in zip(lazy_traces, eager_traces):
        assert a.proposals.tolist() == b.proposals.tolist() and a.proposals.gt(0).any()
        torch.testing.assert_close(a.behaviour_logp, b.behaviour_logp, atol=1e-4, rtol=1e-4)
    assert lazy.draft_calls < eager.draft_calls
    assert not lazy.proposer.pending and lazy.cache.lengths.sum() == 0

    plain = SpecDecoder(make_draft(model), 3, 64, SpecConfig(lookahead=0))
    outs = LLMEngine(model, EngineConfig(num_slots=3, max_len=64), decoder=plain).generate(ps, sp)
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]
    assert plain.draft_calls == 0


def traces_by_id(traces, outs):
    by_id = {t.request_id: t for t in traces}
    return [by_id[o.request_id] for o in outs]


@pytest.mark.unit
def test_trace_features_equal_a_fresh_target_pass():
    """Captured taps/hidden are exactly the target's features of the final token sequence."""
    model, _ = tiny_target()
    traces = []
    ps = prompts(3)
    outs = spec_engine(model, make_draft(model), 3, sink=traces.append).generate(
        ps, SamplingParams(max_tokens=15, ignore_eos=True))
    for o, t in zip(outs, traces_by_id(traces, outs)):
        tokens = t.tokens[:-1].unsqueeze(0)
        L = tokens.shape[1]
        ref = model(tokens, torch.arange(L)[None], model.new_cache(1, 64), torch.tensor([0]))
        assert t.num_positions == L == o.num_prompt_tokens + o.num_output_tokens - 1
        torch.testing.assert_close(t.taps.float(), ref.taps[0].bfloat16().float(), atol=0.02, rtol=0.02)
        torch.testing.assert_close(t.hidden.float(), ref.hidden[0].bfloat16().float(), atol=0.02, rtol=0.02)
        assert t.proposals.shape == (o.verify_steps, 3) and t.nbytes() > 0
        assert (t.policy_version == 0).all() and t.behaviour_logp.le(0).all()


@pytest.mark.unit
def test_sampled_speculation_has_the_target_distribution():
    """Temperature 1: the joint law of tokens 2-3 with speculation matches plain sampling (chi-square)."""
    model, _ = tiny_target()
    p = prompts(1)[0]
    n = 1200
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
    plain = LLMEngine(model, EngineConfig(num_slots=16, max_len=32)).generate([p] * n, params)
    params2 = [SamplingParams(max_tokens=3, temperature=1.0, seed=10_000 + s, ignore_eos=True) for s in range(n)]
    spec = spec_engine(model, make_draft(model, vocab=128), 2, slots=16, max_len=32).generate([p] * n, params2)
    assert sum(o.accepted_tokens for o in spec) > 0.2 * n  # rejection sampling really exercised both branches
    assert_same_token_law(plain, spec)


def assert_same_token_law(plain, spec, positions=(1, 2), buckets: int = 8) -> None:
    """Chi-square two-sample test (p = 0.001) that outputs at ``positions`` follow one law, ids bucketed mod 8."""
    def hist(outs, i):
        return torch.bincount(torch.tensor([o.output_ids[i] % buckets for o in outs]), minlength=buckets).float()

    for i in positions:
        a, b = hist(plain, i), hist(spec, i)
        expected = (a + b) / 2
        chi2 = (((a - expected) ** 2 + (b - expected) ** 2) / expected.clamp_min(1)).sum().item()
        assert chi2 < 24.3, f"token {i}: chi2 {chi2:.1f} >= 24.3 (p=0.001, 7 dof)"


@pytest.mark.unit
def test_draft_vocab_from_frequencies_and_remap():
    counts = token_frequencies([[3, 3, 3, 7, 7, 9], torch.tensor([9, 9, 9, 9, 2])], 12)
    assert counts.tolist()[:10] == [0, 0, 1, 3, 0, 0, 0, 2, 0, 5]
    ids = select_draft_vocab(counts, 3, always=(11,))
    assert ids.tolist() == [3, 9, 11]
    model, _ = tiny_target()
    draft = make_draft(model, vocab=4)
    draft.set_vocab(torch.tensor([3, 9, 11, 40]))
    row9 = draft.lm_head.weight[1].clone()
    assert draft.remap_vocab(torch.tensor([9, 40, 50, 60])) == 2
    torch.testing.assert_close(draft.lm_head.weight[0], row9)
    assert draft.draft_to_target.tolist() == [9, 40, 50, 60]
    assert draft.target_to_draft(torch.tensor([60, 3])).tolist() == [3, -1]
    with pytest.raises(ValueError, match="unique"):
        draft.set_vocab(torch.tensor([1, 1, 2, 3]))


@pytest.mark.unit
def test_served_chains_equal_a_from_scratch_chain_at_every_step():
    """Each step's proposals equal the draft's greedy chain computed afresh from the context (one
    prefill of the target, one extend of the draft, then depth d + 1 at rope position base + d): the
    draft cache the engine keeps between steps holds exactly the target-feature keys, and chain steps
    run where training's unroll and vLLM run them. (Until the vLLM fidelity test, the chain ran one
    position early and overwrote the base's key.)"""
    from aurora_rl.vllm_engine.fidelity import chain_with_margins, ours

    model, _ = tiny_target()
    draft = make_draft(model, vocab=96).eval()
    ps = [list(range(3, 20)), [7, 8, 9, 10, 11, 7, 8, 9], [40, 2, 90, 17, 5]]
    served = ours(model, draft, ps, lookahead=3, max_tokens=20)
    steps = 0
    for prompt, req in zip(ps, served):
        tokens = prompt + req.output_ids
        for props, n in zip(req.proposals, req.context_lengths):
            fresh, _ = chain_with_margins(model, draft, tokens[:n], 3)
            assert fresh[: len(props)] == props
            steps += 1
    assert steps >= 3 * 6


@pytest.mark.unit
def test_a_k0_step_records_the_served_stats_of_every_row_as_row_by_row():
    """A k = 0 step (``plain_step``) records in the trace the served-distribution stats of every row under
    that row's own sampling rule: a batch mixing greedy, T = 0.7 top-p 0.9 and T = 1.0 rows records what
    ``served_stats`` gives each row's logits alone (recomputed from a fresh target pass)."""
    from aurora_rl.engine.sampling import served_stats

    model, _ = tiny_target()
    ps = prompts(3)
    rules = [SamplingParams(max_tokens=6, ignore_eos=True),
             SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.7, top_p=0.9, seed=1),
             SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=2)]
    traces = []
    dec = SpecDecoder(make_draft(model), 3, 64, SpecConfig(lookahead=0), trace_sink=traces.append)
    outs = LLMEngine(model, EngineConfig(num_slots=3, max_len=64), decoder=dec).generate(ps, rules)
    assert len(traces) == 3
    for o, t, sp in zip(outs, traces_by_id(traces, outs), rules):
        ids = o.prompt_ids + o.output_ids[:-1]
        logits = model(torch.tensor([ids]), torch.arange(len(ids)).view(1, -1), model.new_cache(1, 64),
                       torch.tensor([0]), with_taps=False).logits[0]
        P = len(o.prompt_ids)
        got, want = t.served_stats[P:], served_stats(logits[P:], sp)  # the decode steps' rows
        assert got.shape == want.shape == (len(o.output_ids) - 1, 3)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (sp, got, want)
