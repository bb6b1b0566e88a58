"""Online draft-vocabulary refresh: decayed token counts, the learner's remap (head rows and AdamW
moments move along, new rows from the target's head), publishing the maps, and the serving side's
hot swap of a new vocabulary."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aurora_rl.config import RunConfig, validate
from aurora_rl.engine import SamplingParams
from aurora_rl.training.vocab import VocabTracker, remap_moments
from tests.test_config import sglang_config
from tests.test_engine import prompts
from tests.test_learner import new_learner, served  # noqa: F401  (fixture)
from tests.test_speculative import make_draft, spec_engine


def _trace(prompt, emitted):
    """The fields of a trace the tracker reads."""
    tokens = torch.tensor(prompt + emitted)
    return type("T", (), {"tokens": tokens, "prompt_ids": torch.tensor(prompt),
                          "num_positions": len(tokens) - 1})()


@pytest.mark.unit
def test_tracker_counts_emitted_tokens_and_prompts_at_their_weight_and_decays_by_half_life():
    tracker = VocabTracker(10, half_life_tokens=5.0, prompt_weight=0.5)
    tracker.observe([_trace([1, 1, 2], [3, 3])])  # 2 emitted + 0.5 * 3 prompt = 3.5 weighted tokens
    assert tracker.counts.tolist() == [0, 1.0, 0.5, 2.0, 0, 0, 0, 0, 0, 0]
    tracker.observe([_trace([4], [5, 5, 5, 5, 5])])  # 5.5 new: the old counts halve once and a tenth more
    decay = 0.5 ** (5.5 / 5.0)
    torch.testing.assert_close(tracker.counts[3], torch.tensor(2.0 * decay, dtype=torch.float64))
    assert float(tracker.counts[5]) == 5.0 and float(tracker.counts[4]) == 0.5
    assert tracker.observed == pytest.approx(9.0)
    with pytest.raises(ValueError, match="half_life_tokens"):
        VocabTracker(10, half_life_tokens=0)


@pytest.mark.unit
def test_remap_moments_keeps_the_rows_of_kept_tokens_and_zeroes_new_ones():
    state = {"exp_avg": torch.arange(6.0).view(3, 2), "exp_avg_sq": torch.ones(3, 2), "step": torch.tensor(4.0)}
    remap_moments(state, torch.tensor([2, -1, 0]))
    assert state["exp_avg"].tolist() == [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]
    assert state["exp_avg_sq"].tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    assert float(state["step"]) == 4.0


@pytest.mark.unit
def test_learner_refreshes_the_vocabulary_to_the_traffic_it_serves(served):
    model, traces = served
    learner = new_learner(model, vocab_refresh_every=1, vocab_half_life_tokens=10_000)
    learner.update(traces)  # a first step, so the head has AdamW moments
    emitted = torch.cat([t.tokens[len(t.prompt_ids): t.num_positions + 1] for t in traces]).unique()
    draft = learner.draft
    # Make the current vocabulary miss the traffic: every emitted token but one leaves it.
    kept_id, new_id = int(emitted[0]), int(emitted[1])
    outside = [i for i in range(model.config.vocab_size) if i not in set(emitted.tolist())]
    draft.set_vocab(torch.tensor(outside[: draft.config.draft_vocab_size - 1] + [kept_id]))
    kept_row = int(draft.target_to_draft(torch.tensor([kept_id]))[0])
    head_before = draft.lm_head.weight.detach().clone()
    moments_before = learner.optimizer.state[draft.lm_head.weight]["exp_avg"].clone()
    best = learner.vocab.propose(draft)
    assert best.current_coverage < 0.5 < best.coverage
    refreshes = learner.vocab_refreshes
    metrics = learner._track_vocab([])  # the check alone: no new counts, no optimizer step
    assert metrics["vocab/refreshes"] == refreshes + 1 and metrics["vocab/new_tokens"] > 0
    vocab = set(draft.draft_to_target.tolist())
    assert set(emitted.tolist()) <= vocab  # the tiny draft vocabulary (64) holds all emitted tokens
    assert torch.equal(draft.draft_to_target, best.target_ids)
    rows = draft.target_to_draft(torch.arange(model.config.vocab_size))
    head = draft.lm_head.weight.detach()
    moments = learner.optimizer.state[draft.lm_head.weight]["exp_avg"]
    r = int(rows[kept_id])  # a kept token keeps its trained row and its moments
    torch.testing.assert_close(head[r], head_before[kept_row])
    torch.testing.assert_close(moments[r], moments_before[kept_row])
    assert float(moments_before[kept_row].abs().sum()) > 0
    torch.testing.assert_close(head[int(rows[new_id])], learner.target_head[new_id])  # from the target's head
    assert float(moments[int(rows[new_id])].abs().sum()) == 0.0
    state = learner.publishable_state()
    assert torch.equal(state["d2t"], draft.d2t) and torch.equal(state["t2d"], draft.t2d)
    # The next update trains under the new vocabulary: emitted tokens are labels now.
    after = learner.update(traces)
    assert after["vocab/coverage"] == pytest.approx(best.coverage, abs=0.05)


@pytest.mark.unit
def test_without_refresh_the_vocabulary_maps_are_not_published(served):
    model, traces = served
    learner = new_learner(model)
    m = learner.update(traces)
    assert learner.vocab is None and not any(k.startswith("vocab/") for k in m)
    assert "d2t" not in learner.publishable_state()


def _slot_logits(decoder):
    return {slot: st.logits.clone() for slot, st in decoder.proposer.state.items()}


@pytest.mark.unit
def test_hot_swap_of_a_new_vocabulary_moves_held_logits_to_the_new_rows():
    from tests.conftest import tiny_target

    model, _ = tiny_target()
    draft = make_draft(model)
    engine = spec_engine(model, draft, 3)
    for p in prompts(2, 0):
        engine.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True))
    decoder = engine.decoder
    while not decoder.proposer.state:
        engine.step()
    before = _slot_logits(decoder)
    old_ids = decoder.draft.draft_to_target.clone()
    new_draft = make_draft(model, seed=1)  # another vocabulary of the same size
    state = {n: p.detach().clone() for n, p in new_draft.named_parameters() if p.requires_grad}
    state.update(d2t=new_draft.d2t.clone(), t2d=new_draft.t2d.clone())
    decoder.load_draft_state(state, version=7)
    assert decoder.policy_version == 7 and torch.equal(decoder.draft.d2t, new_draft.d2t)
    new_ids = decoder.draft.draft_to_target
    old_row = {int(t): r for r, t in enumerate(old_ids)}
    for slot, logits in _slot_logits(decoder).items():
        for r, t in enumerate(new_ids.tolist()):
            want = before[slot][..., old_row[t]] if t in old_row else torch.tensor(float("-inf"))
            assert torch.equal(logits[..., r], want.expand_as(logits[..., r]))
    # A vocabulary with no token in common: nothing to move, the held logits go flat (not all -inf).
    engine.step()
    outside = [i for i in range(model.config.vocab_size) if i not in set(new_ids.tolist())]
    disjoint = make_draft(model, seed=2)
    disjoint.set_vocab(torch.tensor(outside[: disjoint.config.draft_vocab_size]))
    decoder.load_draft_state({"d2t": disjoint.d2t.clone(), "t2d": disjoint.t2d.clone()}, version=8)
    assert decoder.proposer.state and all(bool((st.logits == 0).all()) for st in decoder.proposer.state.values())
    while engine.has_work():  # serving goes on under the new vocabulary
        engine.step()
    with pytest.raises(KeyError, match="bogus"):
        decoder.load_draft_state({"bogus": torch.zeros(1)}, version=9)


@pytest.mark.unit
def test_config_refuses_bad_vocab_refresh_settings_and_sglang():
    cfg = RunConfig(output_dir="/tmp/aurora-rl-test")
    for key, value in (("vocab_refresh_every", -1), ("vocab_refresh_min_gain", 1.5), ("vocab_half_life_tokens", 0),
                       ("vocab_prompt_weight", -0.1)):
        with pytest.raises(ValueError, match=f"learner.{key}={value}"):
            dataclasses.replace(cfg.learner, **{key: value})  # the learner config checks itself
    sg = sglang_config(context_copy=False)
    validate(sg)
    sg = dataclasses.replace(sg, learner=dataclasses.replace(sg.learner, vocab_refresh_every=4))
    with pytest.raises(ValueError, match="vocab_refresh_every=4 is not supported with engine.kind=sglang"):
        validate(sg)


@pytest.mark.unit
def test_a_frozen_draft_keeps_its_vocabulary(served):
    model, traces = served
    learner = new_learner(model, algorithm="frozen", vocab_refresh_every=1)
    vocab = learner.draft.draft_to_target.clone()
    m = learner.update(traces)
    assert learner.vocab is None and "vocab/refreshes" not in m
    assert torch.equal(learner.draft.draft_to_target, vocab)


@pytest.mark.unit
def test_swaps_need_a_count_of_two_and_twice_the_count_of_the_token_replaced():
    from tests.conftest import tiny_target

    model, _ = tiny_target()
    draft = make_draft(model, vocab=4)
    draft.set_vocab(torch.tensor([0, 1, 2, 3]))
    tracker = VocabTracker(model.config.vocab_size, half_life_tokens=1e9)
    tracker.counts[torch.tensor([0, 1, 2, 3])] = torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    tracker.counts[torch.tensor([7, 8, 9])] = torch.tensor([30.0, 1.5, 1.9], dtype=torch.float64)
    best = tracker.propose(draft)
    # 7 (30) replaces 3 (0); 9 (1.9) is below the minimum count; 1 (5) stays against anything under 10.
    assert best.target_ids.tolist() == [0, 1, 2, 7]
    assert best.current_coverage == pytest.approx(16 / 49.4) and best.coverage == pytest.approx(46 / 49.4)
    tracker.counts[9] = 2.5  # now 2.5 > 2 x 1 (token 2): swaps in as well
    assert tracker.propose(draft).target_ids.tolist() == [0, 1, 7, 9]
