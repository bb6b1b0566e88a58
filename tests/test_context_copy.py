"""Context-copy proposals: the n-gram index, lossless decoding with copies, traces and the learner's view."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.context_copy import ContextIndex
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.training.batching import collate
from aurora_rl.training.trace_io import load_traces, save_traces
from tests.conftest import tiny_target
from tests.test_speculative import assert_same_token_law, make_draft


def _reference(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    """Brute force: the longest suffix (hi..lo) seen before, most recent occurrence, its next k tokens."""
    for n in range(min(hi, len(tokens)), lo - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


@pytest.mark.unit
def test_index_proposes_what_a_brute_force_search_finds():
    idx = ContextIndex(2, 4)
    idx.sync([5, 6, 7, 8, 9], [])
    assert idx.propose(3) == []  # no suffix of length >= 2 occurred before
    idx.sync([5, 6, 7, 8, 9], [5, 6])
    assert idx.propose(3) == [7, 8, 9]  # "5 6" occurred at the start
    idx.sync([5, 6, 7, 8, 9], [5, 6, 1, 2, 5, 6])
    assert idx.propose(2) == [1, 2]  # the most recent occurrence of "5 6" wins
    with pytest.raises(ValueError, match="min_match"):
        ContextIndex(3, 2)
    # Incremental syncs (prompt, then output growing a few tokens a step) against a search from scratch.
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        tokens = torch.randint(0, 6, (80,), generator=g).tolist()
        prompt, out = tokens[:17], tokens[17:]
        idx, n = ContextIndex(2, 4), 0
        while n <= len(out):
            idx.sync(prompt, out[:n])
            for k in (1, 4):
                assert idx.propose(k) == _reference(prompt + out[:n], k, 2, 4), (trial, n, k)
            n += 1 + trial % 3


def _copy_engine(model, draft, k, slots=3, max_len=96, sink=None, copy=True, min_match=2):
    dec = SpecDecoder(draft, slots, max_len, SpecConfig(lookahead=k, context_copy=copy, copy_min_match=min_match),
                      trace_sink=sink)
    return LLMEngine(model, EngineConfig(num_slots=slots, max_len=max_len), decoder=dec), dec


def _repetitive_prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(2, 128, (6,), generator=g).tolist()) * 3 for _ in range(n)]


@pytest.mark.unit
def test_copies_are_lossless_and_recorded_in_traces(tmp_path):
    model, _ = tiny_target()
    ps = _repetitive_prompts(5)
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=96)).generate(ps, sp)
    traces = []
    engine, dec = _copy_engine(model, make_draft(model), 3, sink=traces.append)
    outs = engine.generate(ps, sp)
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]
    assert dec.copy_steps > 0 and 0 <= dec.copy_accepted <= dec.copy_proposed
    copied = torch.cat([t.copied for t in traces])
    assert copied.any() and not copied.all()  # some steps copied, some drafted
    for t in traces:
        tokens = t.tokens.tolist()
        for i in t.copied.nonzero().flatten().tolist():
            pos, k = int(t.step_position[i]), int(t.lookahead[i])
            # A copied chain is what followed the longest earlier match of the context before the step.
            assert t.proposals[i, :k].tolist() == _reference(tokens[:pos + 2], k, 2, 4)
            assert (t.behaviour_logp[i, :k] == 0).all()
    # The flag survives a trace file; files without the field (older ones) read as no copies.
    back = load_traces(save_traces(traces, tmp_path / "t.safetensors"))
    assert all(torch.equal(a.copied, b.copied) for a, b in zip(traces, back))
    # The learner takes logged proposals from drafted steps only: the draft did not propose the copies.
    draft = make_draft(model)
    batch = collate(traces, draft, model.lm_head.weight, depth=3)
    drafted = sum(int(((t.lookahead > 0) & ~t.copied).sum()) for t in traces)
    assert batch.proposal_row.numel() == drafted


@pytest.mark.unit
def test_copy_off_by_default_and_sampled_copies_keep_the_target_distribution():
    model, _ = tiny_target()
    engine, dec = _copy_engine(model, make_draft(model), 3, copy=False)
    engine.generate(_repetitive_prompts(2), SamplingParams(max_tokens=10, ignore_eos=True))
    assert dec.copy_steps == 0 and not SpecConfig().context_copy
    # Temperature 1, a prompt holding every token once and single-token matches: every decode step
    # copies, rejection-sampled against a one-hot q; the law of tokens 2-3 must match plain sampling
    # (chi-square, as in test_speculative).
    p = torch.randperm(126, generator=torch.Generator().manual_seed(2)).add(2).tolist()
    n = 1200
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
    plain = LLMEngine(model, EngineConfig(num_slots=16, max_len=160)).generate([p] * n, params)
    params2 = [SamplingParams(max_tokens=3, temperature=1.0, seed=10_000 + s, ignore_eos=True) for s in range(n)]
    engine, dec = _copy_engine(model, make_draft(model, vocab=128), 2, slots=16, max_len=160, min_match=1)
    spec = engine.generate([p] * n, params2)
    assert dec.copy_steps > 0.8 * n and dec.copy_accepted > 0  # the copy path was exercised, both branches
    assert dec.copy_accepted < dec.copy_proposed
    assert_same_token_law(plain, spec)


@pytest.mark.unit
def test_copy_settings_are_checked():
    with pytest.raises(ValueError, match="copy_min_match"):
        SpecConfig(copy_min_match=0)
    with pytest.raises(ValueError, match="copy_max_match"):
        SpecConfig(copy_min_match=3, copy_max_match=2)
