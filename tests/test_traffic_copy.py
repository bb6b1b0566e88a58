"""Traffic copies: the index of earlier outputs (against a brute-force search, its memory window, freezing),
lossless decoding with traffic copies, and the settings' checks."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.bench_spec import parse_lookaheads, split_suffix
from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.engine.traffic_copy import TrafficIndex
from tests.conftest import tiny_target
from tests.test_speculative import make_draft


def _reference(outputs: list[list[int]], context: list[int], k: int, lo: int, hi: int) -> list[int]:
    """Brute force: the longest suffix of ``context`` (hi..lo) that occurs, followed by a token, in one of
    ``outputs``; the most recently added output first, its last occurrence first; the next k tokens."""
    for n in range(min(hi, len(context)), lo - 1, -1):
        suffix = context[len(context) - n:]
        for out in reversed(outputs):
            for end in range(len(out) - 2, n - 2, -1):
                if out[end - n + 1:end + 1] == suffix:
                    return out[end + 1:end + 1 + k]
    return []


@pytest.mark.unit
def test_index_proposes_what_a_brute_force_search_finds():
    g = torch.Generator().manual_seed(0)
    index = TrafficIndex(2, 4, window=10_000)
    outputs = []
    for trial in range(30):
        out = torch.randint(0, 7, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
        index.add(out)
        outputs.append(out)
        for _ in range(5):
            context = torch.randint(0, 7, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for k in (1, 5):
                assert index.propose(context, k) == _reference(outputs, context, k, 2, 4), (trial, context, k)
    assert index.outputs == 30 and index.tokens == sum(map(len, outputs))
    assert index.hits > 0 and index.lookups > index.hits  # some lookups matched, some did not
    assert index.propose([1, 2], 0) == []


@pytest.mark.unit
def test_the_window_drops_the_oldest_outputs_and_frozen_learns_nothing():
    index = TrafficIndex(2, 2, window=20)  # generations of 10 tokens
    index.add([1, 2, 3] + [0] * 7)  # 10 tokens: the first generation is full
    assert index.propose([1, 2], 1) == [3]
    index.add([4, 5, 6] + [0] * 7)  # goes into a new generation; the first is still the previous one
    assert index.propose([1, 2], 1) == [3] and index.propose([4, 5], 1) == [6]
    index.add([7, 8, 9])  # a third generation: the first is dropped
    assert index.propose([1, 2], 1) == [] and index.propose([4, 5], 1) == [6] and index.propose([7, 8], 1) == [9]
    assert index.tokens == 13
    index.frozen = True
    index.add([1, 2, 3])
    assert index.propose([1, 2], 1) == [] and index.outputs == 3
    with pytest.raises(ValueError, match="min_match"):
        TrafficIndex(3, 2)
    with pytest.raises(ValueError, match="window"):
        TrafficIndex(2, 4, window=1)


def _traffic_engine(model, draft, traffic: bool = True):
    dec = SpecDecoder(draft, 3, 96, SpecConfig(lookahead=3, context_copy=True, traffic_copy=traffic,
                                               traffic_min_match=2))
    return LLMEngine(model, EngineConfig(num_slots=3, max_len=96), decoder=dec), dec


@pytest.mark.unit
def test_traffic_copies_are_lossless_and_come_from_earlier_outputs():
    model, _ = tiny_target()
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(2, 128, (8,), generator=g).tolist() for _ in range(6)]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=96)).generate(ps, sp)
    engine, dec = _traffic_engine(model, make_draft(model))
    first = engine.generate(ps, sp)
    learned = dec.traffic.outputs
    assert learned == len(ps)  # every finished request's output went into the index
    copies_before, accepted_before = dec.proposer.traffic_copies, dec.copy_accepted
    second = engine.generate(ps, sp)  # the same prompts again: their earlier answers are in the traffic
    assert [o.output_ids for o in first] == [o.output_ids for o in base] == [o.output_ids for o in second]
    assert dec.proposer.traffic_copies > copies_before and dec.copy_accepted > accepted_before
    # With traffic copies off the same engine never asks the index (there is none).
    engine, dec = _traffic_engine(model, make_draft(model), traffic=False)
    engine.generate(ps, sp)
    assert dec.traffic is None and dec.proposer.traffic_copies == 0


@pytest.mark.unit
def test_traffic_settings_are_checked_and_the_bench_names_them():
    with pytest.raises(ValueError, match="traffic_copy needs context_copy"):
        SpecConfig(traffic_copy=True, context_copy=False)
    with pytest.raises(ValueError, match="traffic_window"):
        SpecConfig(context_copy=True, traffic_copy=True, traffic_window=0)
    with pytest.raises(ValueError, match="traffic_min_match"):
        SpecConfig(context_copy=True, traffic_copy=True, traffic_min_match=9)
    assert split_suffix("adaptive+traffic") == ("adaptive", True, True)
    assert split_suffix("4+copy") == ("4", True, False) and split_suffix("tree") == ("tree", False, False)
    assert parse_lookaheads("0+traffic,adaptive-tree+traffic,3") == ["0+traffic", "adaptive-tree+traffic", 3]
    with pytest.raises(ValueError, match=r"\+traffic"):
        parse_lookaheads("4+trafic")


@pytest.mark.unit
def test_run_config_checks_traffic_copy():
    from aurora_rl.config import RunConfig, validate

    cfg = RunConfig()
    cfg.engine.traffic_copy = True
    validate(cfg)  # native engine, context copies on by default
    cfg.engine.context_copy = False
    with pytest.raises(ValueError, match="engine.traffic_copy=true needs engine.context_copy"):
        validate(cfg)
    cfg.engine.context_copy, cfg.engine.kind = None, "vllm"
    with pytest.raises(ValueError, match="engine.traffic_copy=true needs engine.kind=native"):
        validate(cfg)
    cfg.engine.kind, cfg.engine.traffic_window = "native", 1
    with pytest.raises(ValueError, match="engine.traffic_window=1"):
        validate(cfg)
