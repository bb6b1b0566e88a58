"""The adaptive tree budget (``aurora_rl.engine.adaptive_tree``): choices from measured tokens per
second by hand, exploration gated by the optimistic bound, and lossless outputs in the engine."""

from __future__ import annotations

import pytest

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.adaptive_tree import AdaptiveTreeBudget, TreeBudgetConfig, quarter_budgets
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
