"""Adaptive lookahead: the pure math by hand, the controller's choices, and lossless outputs in the engine."""

from __future__ import annotations

import pytest

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.adaptive import (AdaptiveConfig, AdaptiveLookahead, acceptance_rates, best_lookahead,
                                       expected_tokens, predict_costs)
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from tests.conftest import tiny_target
from tests.test_engine import prompts
from tests.test_speculative import OracleDecoder, make_draft


class StepClock:
    """Fake clock for the wrapped decode (called at step start, then step end): a step 'takes'
    ``base + per_token * k`` seconds, k the deepest proposal in the decoder's counters that step."""

    def __init__(self, decoder, per_token: float, base: float = 1.0) -> None:
        self.decoder, self.per_token, self.base = decoder, per_token, base
        self.now, self.calls, self.ks, self._before = 0.0, 0, [], []

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2:
            self._before = list(self.decoder.depth_proposed)
        else:
            before = self._before + [0] * (len(self.decoder.depth_proposed) - len(self._before))
            k = sum(1 for n, b in zip(self.decoder.depth_proposed, before) if n > b)
            self.ks.append(k)
            self.now += self.base + self.per_token * k
        return self.now


@pytest.mark.unit
def test_expected_tokens_by_hand():
    alphas = [0.8, 0.5, 0.5]
    assert expected_tokens(alphas, 0) == 1.0
    assert expected_tokens(alphas, 1) == pytest.approx(1.8)
    assert expected_tokens(alphas, 2) == pytest.approx(1.8 + 0.4)
    assert expected_tokens(alphas, 3) == pytest.approx(1.8 + 0.4 + 0.2)
    with pytest.raises(ValueError, match="k=4"):
        expected_tokens(alphas, 4)


@pytest.mark.unit
def test_best_lookahead_by_hand():
    alphas = [0.8, 0.5, 0.5]
    # tokens/s: 1/1, 1.8/1.2 = 1.5, 2.2/1.5 = 1.467, 2.4/2.0 = 1.2
    assert best_lookahead(alphas, [1.0, 1.2, 1.5, 2.0]) == 1
    # verifying more is nearly free: 2.4/1.05 beats 2.2/1.04 and 1.8/1.02
    assert best_lookahead(alphas, [1.0, 1.02, 1.04, 1.05]) == 3
    # an untrained draft: E[k] = 1 for all k, any cost growth means no speculation
    assert best_lookahead([0.0] * 3, [1.0, 1.01, 1.02, 1.03]) == 0
    # k=1 promises 1.5 vs 1.467 at k=2: within a 5% margin the smaller k wins, k=0 (1.0) does not
    assert best_lookahead(alphas, [1.0, 1.2, 1.5, 2.0], min_gain=0.05) == 1
    assert best_lookahead(alphas, [1.0, 1.2, 1.5, 2.0], min_gain=0.6) == 0
    with pytest.raises(ValueError, match="positive"):
        best_lookahead(alphas, [1.0, 0.0])


@pytest.mark.unit
def test_acceptance_rates_by_hand():
    proposed, accepted = [10, 10, 5], [8, 4, 1]
    # reach rates 0.8, 0.4, 0.2 -> conditional 0.8, 0.5, 0.5
    assert acceptance_rates(proposed, accepted, 0.6, 0.0) == pytest.approx([0.8, 0.5, 0.5])
    # with 2 pseudo-counts: (8 + 1.2) / 12; (4 + 2*a1) / (10*0.8 + 2); (1 + 2*a2) / (5*0.4 + 2)
    a1 = 9.2 / 12
    a2 = (4 + 2 * a1) / 10
    a3 = (1 + 2 * a2) / 4
    assert acceptance_rates(proposed, accepted, 0.6, 2.0) == pytest.approx([a1, a2, a3])
    # nothing measured: the prior at depth 1, then its geometric continuation
    assert acceptance_rates([0, 0], [0, 0], 0.6, 2.0) == pytest.approx([0.6, 0.6])
    # depth 1 measured useless, depth 2 never tried: depth 2 inherits depth 1's low rate
    a1 = (0 + 1.2) / (100 + 2)
    assert acceptance_rates([100, 0], [0, 0], 0.6, 2.0) == pytest.approx([a1, a1])


@pytest.mark.unit
def test_predict_costs_by_hand():
    assert predict_costs({}, 2, 0.1) == pytest.approx([1.0, 1.1, 1.2])
    # one measured k: prior slope relative to that step's time
    assert predict_costs({0: (2.0, 5)}, 2, 0.1) == pytest.approx([2.0, 2.2, 2.4])
    assert predict_costs({1: (2.2, 5)}, 2, 0.1) == pytest.approx([2.0, 2.2, 2.4])
    # two measured ks: least-squares slope 0.5, extrapolated from the nearest measured k
    assert predict_costs({0: (1.0, 1), 2: (2.0, 1)}, 3, 0.1) == pytest.approx([1.0, 1.5, 2.0, 2.5])
    # a timing that falls with k is noise: slope clamped at 0
    assert predict_costs({0: (2.0, 1), 1: (1.0, 1)}, 2, 0.1) == pytest.approx([2.0, 1.0, 1.0])


@pytest.mark.unit
def test_config_and_bounds_errors():
    with pytest.raises(ValueError, match="max_lookahead"):
        AdaptiveLookahead(-1)
    with pytest.raises(ValueError, match="epsilon=1.5"):
        AdaptiveConfig(epsilon=1.5)
    with pytest.raises(ValueError, match="horizon=0"):
        AdaptiveConfig(horizon=0)
    with pytest.raises(ValueError, match="seconds"):
        AdaptiveLookahead(2).observe(1, 0, 0.0, [], [])


@pytest.mark.unit
def test_exploration_stays_in_range_and_visits_neighbours():
    assert {AdaptiveLookahead(5, AdaptiveConfig(epsilon=1.0, epsilon_min=1.0)).choose(1)
            for _ in range(20)} == {1}  # the default prior starts at k* = 0, so exploring means k = 1
    optimistic = AdaptiveConfig(prior_acceptance=0.6, epsilon=1.0, epsilon_min=1.0, min_gain=0.02)
    ctrl = AdaptiveLookahead(5, optimistic)
    # this prior's best is k = 3 (tokens/s 2.18 / 1.3); always exploring means 2 or 4, never 3 or beyond 0..5
    assert best_lookahead(ctrl.alphas(), ctrl.costs(1)) == 3
    assert {ctrl.choose(1) for _ in range(100)} == {2, 4}
    ctrl = AdaptiveLookahead(3, optimistic)
    assert {ctrl.choose(1) for _ in range(20)} == {2}  # from k* = K only down
    for _ in range(50):  # make k = 0 best: useless draft, costs grow
        ctrl.observe(1, 1, 1.5, [1], [0])
        ctrl.observe(1, 0, 1.0, [], [])
    # always exploring, yet never up to k = 1: 50 rejected proposals bound its acceptance below what the
    # 1.5x dearer step needs (optimistic alpha about 0.09 < 0.5)
    assert ctrl.optimistic_alphas()[0] < 0.1
    assert {ctrl.choose(1) for _ in range(20)} == {0}
    ctrl.forget(0.98)  # a new draft (hot swap): little evidence left, k = 1 might pay again
    assert ctrl.optimistic_alphas()[0] > 0.5
    assert {ctrl.choose(1) for _ in range(20)} == {1}  # from k* = 0 only to 1
    assert {AdaptiveLookahead(0, AdaptiveConfig(epsilon=1.0)).choose(4) for _ in range(20)} == {0}


@pytest.mark.unit
def test_a_hot_swap_halves_the_acceptance_evidence():
    model, _ = tiny_target()
    dec = SpecDecoder(make_draft(model), 2, 64, SpecConfig(lookahead=2, capture_traces=False))
    ctrl = AdaptiveLookahead(2).attach(dec)
    engine = LLMEngine(model, EngineConfig(num_slots=2, max_len=64), decoder=dec)
    engine.generate(prompts(2), SamplingParams(max_tokens=20, ignore_eos=True))
    before = ctrl._proposed[0]
    assert before > 0
    dec.load_draft_state({}, version=1)
    engine.generate(prompts(1), SamplingParams(max_tokens=2, ignore_eos=True))  # one step at most adds k rows
    assert ctrl._proposed[0] <= 0.5 * before + 2


@pytest.mark.unit
def test_a_cold_controller_probes_acceptance_with_one_row():
    """Before acceptance is known it does not speculate with the whole batch: one row proposes one
    token per step (priced as a k = 0 step) until ``probe_evidence`` proposals are counted."""
    model, _ = tiny_target()
    dec = SpecDecoder(make_draft(model), 4, 64, SpecConfig(lookahead=3, capture_traces=False))
    ctrl = AdaptiveLookahead(3, AdaptiveConfig(epsilon=0.0, epsilon_min=0.0)).attach(dec)
    engine = LLMEngine(model, EngineConfig(num_slots=4, max_len=64), decoder=dec)
    ps, sp = prompts(4), SamplingParams(max_tokens=20, ignore_eos=True)
    assert [o.output_ids for o in engine.generate(ps, sp)] == _plain(model, ps, sp, slots=4)
    assert 8 <= ctrl.probes <= 9 and dec.depth_proposed == [ctrl.probes]  # one token per probe, then none
    assert ctrl._cost and all(set(cells) == {0} for cells in ctrl._cost.values())


@pytest.mark.unit
def test_choice_depends_on_batch_size():
    """High acceptance; at batch 1 extra verified tokens are cheap, at batch 16 they cost as much as a step."""
    cold = AdaptiveLookahead(2)  # before any measurement, the cost prior scales with the batch
    assert cold.costs(1) == pytest.approx([1.0, 1.1, 1.2])
    assert cold.costs(4) == pytest.approx([1.0, 1.4, 1.8])
    assert cold.costs(16) == pytest.approx([1.0, 2.0, 3.0])
    ctrl = AdaptiveLookahead(4, AdaptiveConfig(epsilon=0.0, epsilon_min=0.0))
    for _ in range(30):
        for k in range(5):
            ctrl.observe(1, k, 1.0 + 0.05 * k, [10] * k, [9, 8, 7, 6][:k])
            ctrl.observe(16, k, 1.0 + 1.0 * k, [160] * k, [144, 128, 112, 96][:k])
    assert ctrl.alphas()[0] == pytest.approx(0.9, abs=0.01)
    assert ctrl.choose(1) == 4 and ctrl.choose(20) == 0
    assert ctrl(_seqs(16, pinned=2)) == [0] * 15 + [2]  # a request's own lookahead is kept
    # a draft that stops being accepted: the batch-1 choice falls back to no speculation
    ks = []
    for _ in range(300):
        k = ctrl.choose(1)
        ks.append(k)
        ctrl.observe(1, k, 1.0 + 0.05 * k, [10] * k, [0] * k)
    assert ks[0] == 4 and ks[-50:] == [0] * 50


def _seqs(n, pinned):
    from aurora_rl.engine.sequence import Sequence

    return [Sequence([1, 2], SamplingParams(lookahead=pinned if i == n - 1 else None)) for i in range(n)]


def _plain(model, ps, sp, slots=3, max_len=64):
    return [o.output_ids for o in LLMEngine(model, EngineConfig(num_slots=slots, max_len=max_len)).generate(ps, sp)]


@pytest.mark.unit
def test_random_draft_converges_to_no_speculation_and_stays_lossless():
    model, _ = tiny_target()
    ps, sp = prompts(6), SamplingParams(max_tokens=40, ignore_eos=True)
    dec = SpecDecoder(make_draft(model), 3, 64, SpecConfig(lookahead=4, capture_traces=False))
    clock = StepClock(dec, per_token=0.3)
    ctrl = AdaptiveLookahead(4, clock=clock).attach(dec)
    outs = LLMEngine(model, EngineConfig(num_slots=3, max_len=64), decoder=dec).generate(ps, sp)
    assert [o.output_ids for o in outs] == _plain(model, ps, sp)
    assert ctrl.alphas()[0] < 0.1
    assert best_lookahead(ctrl.alphas(), ctrl.costs(3)) == 0
    # A cold controller does not speculate on faith: it probes with one row at k = 1 (a few steps, the
    # clock charges them as k = 1), finds the draft useless and stays at k = 0 but for rare exploration.
    assert len(clock.ks) > 60 and 0 < ctrl.probes <= 10 and max(clock.ks[:ctrl.probes]) == 1
    late = clock.ks[20:]
    assert sum(k == 0 for k in late) >= 0.9 * len(late), clock.ks


@pytest.mark.unit
def test_high_acceptance_with_cheap_verify_speculates():
    model, _ = tiny_target()
    ps, sp = prompts(4), SamplingParams(max_tokens=40, ignore_eos=True)
    base = _plain(model, ps, sp, slots=2)
    truth = {tuple(p): o for p, o in zip(ps, base)}
    dec = OracleDecoder(make_draft(model), 2, 64, SpecConfig(lookahead=1, capture_traces=False), truth=truth,
                        corrupt_every=1000)
    clock = StepClock(dec, per_token=0.05)
    ctrl = AdaptiveLookahead(4, clock=clock).attach(dec)
    outs = LLMEngine(model, EngineConfig(num_slots=2, max_len=64), decoder=dec).generate(ps, sp)
    assert [o.output_ids for o in outs] == base
    assert ctrl.alphas()[0] > 0.9
    assert best_lookahead(ctrl.alphas(), ctrl.costs(2)) == 4
    late = clock.ks[len(clock.ks) // 2:]
    assert sum(k >= 3 for k in late) >= 0.7 * len(late), clock.ks  # k is capped by room near the end


@pytest.mark.unit
def test_switching_off_restores_fixed_lookahead():
    model, _ = tiny_target()
    ps, sp = prompts(3), SamplingParams(max_tokens=12, ignore_eos=True)
    dec = SpecDecoder(make_draft(model), 3, 64, SpecConfig(lookahead=2, capture_traces=False))
    ctrl = AdaptiveLookahead(4)  # real clock
    with pytest.raises(ValueError, match="SpecDecoder"):
        ctrl.attach(object())
    ctrl.attach(dec)
    with pytest.raises(ValueError, match="attached twice"):
        ctrl.attach(dec)
    engine = LLMEngine(model, EngineConfig(num_slots=3, max_len=64), decoder=dec)
    assert [o.output_ids for o in engine.generate(ps, sp)] == _plain(model, ps, sp)
    assert ctrl.steps > 0 and ctrl.costs(3)[0] < 1.0  # measured seconds replaced the unitless prior
    ctrl.detach(dec)
    assert dec.lookahead_fn is None and "decode" not in vars(dec)
    steps = ctrl.steps
    before = _pad(dec.depth_proposed)
    assert [o.output_ids for o in engine.generate(ps, sp)] == _plain(model, ps, sp)
    grown = [n - b for n, b in zip(_pad(dec.depth_proposed), before)]
    assert ctrl.steps == steps and grown[0] >= grown[1] > 0 and grown[2:] == [0] * 6


def _pad(counts):
    return list(counts) + [0] * (8 - len(counts))


@pytest.mark.unit
def test_noise_never_makes_a_larger_lookahead_cheaper():
    ctrl = AdaptiveLookahead(3, AdaptiveConfig(epsilon=0.0, epsilon_min=0.0))
    for _ in range(10):
        ctrl.observe(4, 0, 1.0, [], [])
        ctrl.observe(4, 1, 0.9, [4], [2])  # a lucky spell: k = 1 timed below k = 0
    costs = ctrl.costs(4)
    assert costs == sorted(costs) and costs[1] == pytest.approx(1.0)
    # alpha 0.5 (E[1] = 1.5): k = 1 pays at equal cost, but only because it is really no dearer
    assert ctrl.choose(4) >= 1


@pytest.mark.unit
def test_copying_rows_get_their_own_lookahead():
    """Copies accepted to depth 2 always and to depth 4 half the time, draft proposals never: rows that
    can copy speculate deep, the others not at all, in the same step; copy evidence survives a draft swap."""
    from types import SimpleNamespace

    ctrl = AdaptiveLookahead(4, AdaptiveConfig(epsilon=0.0, epsilon_min=0.0, probe_evidence=0))
    for _ in range(50):
        ctrl.observe(1, 0, 1.0, [0] * 4, [0] * 4)  # k = 0 steps: 1 s
        ctrl.observe(1, 4, 1.5, [1, 1, 1, 1], [0, 0, 0, 0])  # drafted k = 4: rejected at once, 1.5 s
        ctrl.observe(1, 4, 1.4, [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], copy_step=True)
        ctrl.observe(1, 4, 1.4, [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], copy_step=True)
    assert ctrl.alphas()[0] < 0.05 and ctrl.copy_alphas()[0] > 0.9
    seqs = [SimpleNamespace(params=SimpleNamespace(lookahead=None), slot=i) for i in range(3)]
    assert ctrl(seqs, [True, False, True]) == [4, 0, 4]
    assert ctrl(seqs) == [0, 0, 0]  # no copies on offer: the draft's k for all
    ctrl.forget(0.99)
    assert ctrl.copy_alphas()[0] > 0.9


@pytest.mark.unit
def test_adaptive_with_context_copy_stays_lossless():
    model, _ = tiny_target()
    ps = [p * 3 for p in prompts(4)]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    dec = SpecDecoder(make_draft(model), 2, 96, SpecConfig(lookahead=3, capture_traces=False, context_copy=True))
    ctrl = AdaptiveLookahead(3).attach(dec)
    outs = LLMEngine(model, EngineConfig(num_slots=2, max_len=96), decoder=dec).generate(ps, sp)
    assert [o.output_ids for o in outs] == _plain(model, ps, sp, slots=2, max_len=96)
    assert dec.copy_steps > 0 and sum(ctrl._cproposed) > 0  # copies were chosen and measured apart
    assert sum(dec.copy_depth_proposed) <= sum(dec.depth_proposed)


@pytest.mark.unit
def test_copy_lookahead_is_explored_past_a_pessimistic_cost_prior():
    """Copies that are always right and cheap to verify, under a prior that prices each extra token at
    0.8 of a step: without exploration the copy k never leaves 0 (no deeper step is ever timed); with it
    a deeper copy is tried, timed, and adopted."""

    def run(epsilon):
        ctrl = AdaptiveLookahead(4, AdaptiveConfig(prior_slope=0.8, epsilon=epsilon, epsilon_min=min(epsilon, 0.02),
                                                   probe_evidence=0))
        ks = []
        for _ in range(300):
            k = ctrl.choose_copy(1)
            ks.append(k)
            hits = [1] * k + [0] * (4 - k)
            ctrl.observe(1, k, 1.0 + 0.1 * k, hits, hits, hits, hits, copy_step=k > 0)
        return ks

    assert set(run(0.0)) == {0}
    explored = run(0.1)
    assert explored[-50:].count(4) >= 45


@pytest.mark.unit
def test_a_step_is_charged_the_draft_catch_up_it_triggers():
    """The first drafting step after k = 0 steps feeds their queued positions to the draft: that is part
    of what drafting costs when the controller switches, so its cost cell holds it (as the tree
    controller's does). A fake decoder and clock: the step takes 1.0 s, of which 0.6 s is catch-up."""
    import torch
    from types import SimpleNamespace

    class Fake:
        def __init__(self):
            self.depth_proposed, self.depth_accepted = [0], [0]
            self.copy_depth_proposed, self.copy_depth_accepted = [0], [0]
            self.catch_up_s, self.policy_version, self.lookahead_fn = 0.0, 0, None
            self.draft = torch.nn.Linear(1, 1)

        def decode(self, engine, seqs):
            self.depth_proposed[0] += 1
            self.catch_up_s += 0.6

    times = iter([0.0, 1.0])
    dec = Fake()
    ctrl = AdaptiveLookahead(1, clock=lambda: next(times)).attach(dec)
    seqs = [SimpleNamespace(params=SimpleNamespace(lookahead=None), slot=0)]
    assert ctrl(seqs, [False]) == [1]  # a cold controller's one-row probe
    dec.decode(SimpleNamespace(), seqs)
    (cells,) = ctrl._cost.values()
    assert cells == {1: [pytest.approx(1.0), 1]}  # the old rule charged 0.4


@pytest.mark.unit
def test_on_cpu_the_cost_prior_takes_the_cpu_slope_and_cap():
    """Attached to a CPU decoder the prior is the CPU one: 0.2 x B per lookahead token, at most
    ``cpu_max_prior_slope`` of a step. With only k = 0 measured, the cap decides whether a copy can be
    tried at batch 8: at 1.0 (the default) a one-token copy is priced at 2 steps and can never pay, so it
    is not explored; at 0.6 it is priced at 1.6 steps and a copy right 90% of the time may pay."""
    model, _ = tiny_target()
    dec = SpecDecoder(make_draft(model), 8, 64, SpecConfig(context_copy=True))
    ctrl = AdaptiveLookahead(4).attach(dec)
    assert (ctrl.prior_slope, ctrl.max_prior_slope) == (0.2, 1.0)
    ctrl.observe(8, 0, 0.01, [], [])
    assert ctrl.costs(8)[:2] == pytest.approx([0.01, 0.02]) and ctrl.costs(1)[1] == pytest.approx(0.012)
    alphas = [0.9] * 4
    assert not ctrl._may_pay(1, 0, ctrl.costs(8, copy=True), alphas, [50.0] * 4)
    low = AdaptiveLookahead(4, AdaptiveConfig(cpu_max_prior_slope=0.6)).attach(
        SpecDecoder(make_draft(model), 8, 64, SpecConfig(context_copy=True)))
    low.observe(8, 0, 0.01, [], [])
    assert low.costs(8)[1] == pytest.approx(0.016) and low._may_pay(1, 0, low.costs(8, copy=True), alphas, [50.0] * 4)


@pytest.mark.unit
def test_copy_costs_are_one_buckets_curve_never_spliced_from_two():
    """At batch 16 with plain steps measured there and copy steps only at batch 1, the copy costs come
    from batch 16's k = 0 cell and the prior, not from batch 1's copy cells beside it; with no plain
    step measured anywhere, the nearest bucket's copy curve is borrowed whole."""
    ctrl = AdaptiveLookahead(2, AdaptiveConfig(prior_slope=0.1))
    ctrl.observe(16, 0, 0.030, [], [])
    ctrl.observe(1, 1, 0.008, [1], [1], [1], [1], copy_step=True)
    costs = ctrl.costs(16, copy=True)
    assert costs[0] == pytest.approx(0.030) and costs[1] == pytest.approx(0.030 * (1 + min(0.1 * 16, 1.0)))
    cold = AdaptiveLookahead(2, AdaptiveConfig(prior_slope=0.1))
    cold.observe(1, 1, 0.008, [1], [1], [1], [1], copy_step=True)
    assert cold.costs(16, copy=True)[1] == pytest.approx(0.008)


@pytest.mark.unit
def test_a_stalled_step_counts_at_most_twice_its_cells_mean():
    """One 323 ms step among 20 ms ones (a VM stall) moves the k = 0 cell by what a 40 ms step would,
    and a faster step is taken whole."""
    ctrl = AdaptiveLookahead(4)
    for _ in range(10):
        ctrl.observe(8, 0, 0.020, [], [])
    ctrl.observe(8, 0, 0.323, [], [])
    mean = 0.020 + (0.040 - 0.020) / 11
    assert ctrl.plain_step_time(8) == pytest.approx(mean)
    ctrl.observe(8, 0, 0.002, [], [])
    assert ctrl.plain_step_time(8) == pytest.approx(mean + (0.002 - mean) / 12)
