"""The adaptive tree budget (``aurora_rl.engine.adaptive_tree``): choices from measured tokens per
second by hand, exploration gated by the optimistic bound, and lossless outputs in the engine."""

from __future__ import annotations

import pytest

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.adaptive_tree import AdaptiveTreeBudget, TreeBudgetConfig, quarter_budgets
from aurora_rl.engine.lookahead_model import bucket
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from tests.conftest import tiny_target
from tests.test_engine import prompts
from tests.test_speculative import make_draft
from tests.test_token_tree import tree_engine


@pytest.mark.unit
def test_adaptive_tree_budget_chooses_by_measured_tokens_per_second():
    ctl = AdaptiveTreeBudget([4, 8], TreeBudgetConfig(probe_steps=2, epsilon=0.0))
    assert ctl.budgets == [0, 4, 8]
    seen = []
    for _ in range(6):  # probing: every budget twice before any choice
        n = ctl.choose(4)
        seen.append(n)
        cost, acc = {0: (1.0, 0), 4: (1.2, 4), 8: (2.0, 6)}[n]
        ctl.observe(4, n, cost, acc, 4)  # 4 rows: E = 1, 2, 2.5 tokens per row-step
    assert sorted(seen) == [0, 0, 4, 4, 8, 8]
    assert ctl.choose(4) == 4  # rates 1.0, 1.67, 1.25
    useless = AdaptiveTreeBudget([4, 8], TreeBudgetConfig(probe_steps=1, epsilon=0.0))
    for n in (0, 4, 8):
        useless.observe(16, n, 1.0 + n / 8, 0, 16)
    assert useless.choose(16) == 0  # nothing accepted: speculation never pays
    assert quarter_budgets(12) == [0, 3, 6, 9, 12] and quarter_budgets(2) == [0, 1, 2] and quarter_budgets(0) == [0]
    with pytest.raises(ValueError, match="budgets"):
        AdaptiveTreeBudget([])


@pytest.mark.unit
def test_adaptive_tree_budget_stops_exploring_a_budget_shown_not_to_pay():
    """With eps = 0.5, a budget that accepts little and costs 1.5 plain steps is explored while its
    optimistic bound could still pay, then no more; a budget that pays keeps being visited from below;
    a hot swap (forget) widens the bound and exploration resumes."""
    ctl = AdaptiveTreeBudget([4], TreeBudgetConfig(probe_steps=1, epsilon=0.5, seed=3))
    step = {0: (1.0, 0), 4: (1.5, 1)}  # budget 4: 1 token accepted in 4 row-steps, at 1.5x the cost

    def run(steps):
        counts = {0: 0, 4: 0}
        for i in range(steps):
            n = ctl.choose(4)
            cost, _ = step[n]
            acc = [1, 0, 0, 0] if n else [0, 0, 0, 0]  # accepted tokens of the 4 rows
            ctl.observe(4, n, cost, sum(acc), 4, sum(a * a for a in acc))
            counts[n] += 1
        return counts

    first = run(40)
    assert first[4] >= 2  # the probe and at least one exploration step
    assert ctl.optimistic_tokens(4) / 1.5 < 1.0  # the bound now says budget 4 cannot pay ...
    assert run(200)[4] == 0  # ... so it is never tried again
    ctl.forget(0.9)
    assert ctl.optimistic_tokens(4) / 1.5 > 1.0 and run(40)[4] >= 1  # a new draft: worth a look again
    good = AdaptiveTreeBudget([4, 8], TreeBudgetConfig(probe_steps=1, epsilon=0.5, seed=3))
    for n, (cost, acc) in {0: (1.0, 0), 4: (1.2, 8), 8: (2.0, 9)}.items():
        good.observe(4, n, cost, acc, 4)
    assert good.choose(4) in (0, 4) and sum(good.choose(4) == 0 for _ in range(100)) > 10  # smaller: always allowed


@pytest.mark.unit
def test_adaptive_tree_budget_in_the_engine_keeps_outputs_identical():
    model, _ = tiny_target()
    ps = prompts(5)
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=64)).generate(ps, sp)
    engine, dec = tree_engine(model, make_draft(model), 3, 8)
    ctl = AdaptiveTreeBudget([2, 8], TreeBudgetConfig(probe_steps=2)).attach(dec)
    outs = engine.generate(ps, sp)
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]
    assert {0, 2, 8} <= set(ctl.chosen) and all(c[1] > 0 for cells in ctl.cost.values() for c in cells.values())
    with pytest.raises(ValueError, match="tree_topk"):
        AdaptiveTreeBudget([4]).attach(SpecDecoder(make_draft(model), 2, 32, SpecConfig()))


class _Row:
    def __init__(self, slot, lookahead=None):
        self.slot = slot
        self.params = SamplingParams(lookahead=lookahead)


@pytest.mark.unit
def test_at_batch_8_budgets_are_probed_on_one_row_and_a_batch_of_trees_runs_only_once_it_could_pay():
    """At B > 1 the first tries of a budget give it to one row (the lowest slot; not a row that asked for
    lookahead 0), timed apart; a whole batch runs the budget only when the cost predicted from the probes,
    t(B, 0) + B (t_probe - t(B, 0)), with optimistic acceptance beats plain steps."""
    rows = [_Row(s) for s in (5, 2, 7, 3)] + [_Row(0, lookahead=0)] + [_Row(s) for s in (4, 6, 1)]

    def serve(ctl, steps, accepted_per_row, probe_extra):
        full = 0
        for _ in range(steps):
            budgets = ctl(rows)
            n = max(budgets)
            ran = [b > 0 for b in budgets]
            if ctl.probing:
                assert sum(ran) == 1 and budgets[7] == n  # slot 1, the lowest free one
            elif n:
                full += 1
                assert budgets[4] == 0 and sum(ran) == 7
            per_row = accepted_per_row[n]
            seconds = 1.0 + (probe_extra[n] if ctl.probing else 8 * probe_extra[n])
            k = sum(ran) if n else len(rows)
            ctl.observe(8, n, seconds, per_row * sum(ran), k, per_row * per_row * sum(ran), probe=ctl.probing)
        return full

    useless = AdaptiveTreeBudget([4, 8], TreeBudgetConfig(probe_steps=3, epsilon=0.2, seed=1))
    # a row's tree adds 0.3 of a plain batch step and wins 0.2 tokens: a batch of trees costs 3.4 steps
    assert serve(useless, 300, {0: 0, 4: 0.2, 8: 0.25}, {0: 0.0, 4: 0.3, 8: 0.4}) == 0
    assert useless.probes == 6 and useless.step_cost(8, 4) == pytest.approx(1.0 + 8 * 0.3)
    assert useless.cost[bucket(8)].keys() == {0}  # no budget ever ran on the whole batch

    good = AdaptiveTreeBudget([4, 8], TreeBudgetConfig(probe_steps=3, epsilon=0.2, seed=1))
    # each row's tree adds 0.02 of a step and wins 1.5 tokens: trees pay on the whole batch
    full = serve(good, 100, {0: 0, 4: 1.5, 8: 1.8}, {0: 0.0, 4: 0.02, 8: 0.05})
    assert full > 80 and good.cost[bucket(8)][4][1] > 0


@pytest.mark.unit
def test_at_budget_0_rows_that_can_copy_verify_the_copy_alone_while_copies_pay():
    """With trees shown not to pay, a row whose context offers a copy gets a copy-only chain (its budget:
    the copy model's k, at most the copy's length); rows with no copy, or that asked for lookahead 0, stay
    plain; once copies are measured never to be accepted at a dear step, no row copies."""
    from aurora_rl.engine.adaptive import AdaptiveConfig, AdaptiveLookahead

    ctl = AdaptiveTreeBudget([4], TreeBudgetConfig(probe_steps=1, epsilon=0.0))
    for n, cost in ((0, 1.0), (4, 3.0)):
        ctl.observe(1, n, cost, 0, 1)  # a tree of 4 costs 3 plain steps and accepts nothing
    ctl.copy_model = AdaptiveLookahead(4, AdaptiveConfig(epsilon=0.0, epsilon_min=0.0, copy_prior_acceptance=0.8))
    ctl.copy_model.observe(1, 0, 1.0, [], [])
    rows = [_Row(3), _Row(1), _Row(2, lookahead=0)]
    budgets = ctl(rows, [2, 0, 5])
    assert ctl.choose(1) == 0 and budgets[1] == budgets[2] == 0 and budgets[0] == min(ctl.copy_model.last_copy_k, 2) > 0
    assert ctl.copy_steps == 1 and ctl.chosen[-1] == 0
    for _ in range(60):  # copies of 4 at 4x the plain step, never accepted
        ctl._observe_copies(1, [4], 4.0, [1, 1, 1, 1], [0, 0, 0, 0])
    assert ctl(rows[:1], [5]) == [0] and ctl(rows[:1], [0]) == [0]
    # At batch 8 a copy step is priced as the uniform step it stands for: one row copying 4 tokens in
    # 1.34 plain steps is half a token per row, so a k = 1 step would take 1 + 0.34 x 2 = 1.68 steps.
    # A one-row probe of one token (an eighth of a token per row) counts for acceptance only.
    ctl.copy_model.observe(8, 0, 1.0, [], [])
    ctl._observe_copies(8, [4] + [0] * 7, 1.34, [1, 1, 1, 1], [1, 1, 0, 0])
    ctl._observe_copies(8, [1] + [0] * 7, 1.05, [1], [1])
    assert ctl.copy_model._ccost[bucket(8)] == {1: [pytest.approx(1.68), 1]}


@pytest.mark.unit
def test_adaptive_tree_budget_copies_in_the_engine_and_keeps_outputs_identical():
    model, _ = tiny_target()
    ps = prompts(5)
    sp = SamplingParams(max_tokens=32, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=64)).generate(ps, sp)
    engine, dec = tree_engine(model, make_draft(model), 3, 8, copy=True)
    ctl = AdaptiveTreeBudget([2, 8], TreeBudgetConfig(probe_steps=2)).attach(dec)
    assert ctl.copy_model is not None and ctl.copy_model.max_lookahead == dec.config.copy_max_tokens
    outs = engine.generate(ps, sp)
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]
    assert ctl.copy_steps > 0 and dec.copy_steps > 0 and dec.copy_accepted > 0
    assert sum(ctl.copy_model._cproposed) > 0  # the copy-only steps fed the copy model's acceptance
    _, plain_dec = tree_engine(model, make_draft(model), 3, 8)
    assert AdaptiveTreeBudget([2]).attach(plain_dec).copy_model is None  # no copies, no copy model


@pytest.mark.unit
def test_a_row_whose_copy_fills_the_budget_is_no_evidence_for_the_budget():
    """At a budget above 0 a row whose copy is at least the budget runs no draft: the step's tokens say
    nothing of trees, so the row is left out of the budget's evidence (and a step where every such row
    only copied is not observed at all); a row whose copy is shorter drafts the rest and counts."""
    ctl = AdaptiveTreeBudget([4], TreeBudgetConfig(probe_steps=1, epsilon=0.0))
    ctl.observe(1, 0, 1.0, 0, 1)  # budget 0 measured: the next choice tries budget 4
    assert ctl([_Row(1)], [5]) == [4] and ctl._pending[2] == [False]
    assert ctl([_Row(1)], [2]) == [4] and ctl._pending[2] == [True]
    assert ctl([_Row(1)], None) == [4] and ctl._pending[2] == [True]


@pytest.mark.unit
def test_one_stalled_plain_step_does_not_make_a_batch_of_trees_look_cheap():
    """Session 17, batch 8: one budget-0 step of 323 ms among 20 ms ones put the plain cell at 80 ms (an
    EMA of weight 0.2), a batch of trees predicted at t(B, 0) + B max(t_probe - t(B, 0), 0) = 80 ms
    looked cheaper than plain decoding, and the controller ran trees at 3-4x a plain step's cost. A
    step counts at most at twice its cell's mean, so the stall moves the cell by a fifth, not 4x."""
    rows = [_Row(s) for s in range(8)]
    ctl = AdaptiveTreeBudget([4], TreeBudgetConfig(probe_steps=3, epsilon=0.0))
    for _ in range(40):  # probes of budget 4 (one row: +14 ms, 0.43 tokens accepted), then plain steps
        n = max(ctl(rows))
        ctl.observe(8, n, 0.034 if ctl.probing else 0.020, 0.43 if n else 0.0, 1 if n else 8, probe=ctl.probing)
    assert ctl.probes == 3 and ctl.chosen[-1] == 0
    assert max(ctl(rows)) == 0
    ctl.observe(8, 0, 0.323, 0.0, 8)  # the stall
    assert ctl.cost[bucket(8)][0][0] == pytest.approx(0.8 * 0.020 + 0.2 * 0.040)
    assert all(max(ctl(rows)) == 0 for _ in range(50))
