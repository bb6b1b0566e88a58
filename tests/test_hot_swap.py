"""The hot swap off the engine thread: newer drafts are validated and built in the background, swapped by
reference at a step boundary; a bad payload leaves the serving draft untouched.

The WeightStore is replaced by a list of payloads behind the same ``fetch`` contract (the Ray path is
exercised in tests/test_serve_recovery.py); the engine, draft and EngineLoop are the real ones.
"""

from __future__ import annotations

import time

import pytest
import torch

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.hot_swap import BadDraftPayload, DraftSwapper, validate_state
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.serving.loop import EngineLoop
from envs.models import random_draft, tiny_target
from tests.test_engine import prompts


class Payloads:
    """A stand-in WeightStore: ``publish`` a state, ``fetch`` answers the newest one above a version."""

    def __init__(self) -> None:
        self.versions: dict[int, dict] = {}

    def publish(self, version: int, state: dict) -> None:
        self.versions[version] = state

    def fetch(self, version: int):
        newer = [v for v in self.versions if v > version]
        return (max(newer), self.versions[max(newer)]) if newer else None


def _trainable(draft) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in draft.named_parameters() if p.requires_grad}


def _snapshot(draft) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in draft.state_dict().items()}


def _wait(cond, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.mark.unit
def test_validate_state_names_every_problem():
    draft = random_draft(tiny_target(0), 0, 64)
    good = _trainable(draft)
    validate_state(good, draft)
    name = next(iter(good))
    cases = {
        "not a tensor of the serving draft": {**good, "fc.weigth": good[name]},
        "has shape": {**good, name: good[name][:1]},
        "holds NaN or Inf": {**good, name: good[name].clone().fill_(float("inf"))},
        "outside the target vocabulary": {**good, "d2t": draft.d2t + 10_000},
        "non-empty dict": {},
    }
    for words, state in cases.items():
        with pytest.raises(BadDraftPayload, match=words):
            validate_state(state, draft)


@pytest.mark.unit
def test_swap_is_built_off_the_engine_thread_and_a_bad_payload_leaves_the_draft_untouched():
    target = tiny_target(0)
    draft = random_draft(target, 0, 64)
    decoder = SpecDecoder(draft, 4, 256, SpecConfig(lookahead=3))
    engine = LLMEngine(target, EngineConfig(num_slots=4, max_len=256), None, decoder)
    store = Payloads()
    swapper = DraftSwapper(decoder, store.fetch, idle_poll_s=0.01).start()
    loop = EngineLoop(engine, before_step=swapper.apply).start()
    plain = LLMEngine(tiny_target(0), EngineConfig(num_slots=4, max_len=256))
    ps = prompts(4, seed=3)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    want = [o.output_ids for o in plain.generate(ps, greedy)]

    def serve_all():
        outs = [f.result(60) for f in [loop.submit(p, greedy) for p in ps]]
        assert [o.output_ids for o in outs] == want  # lossless whatever draft serves
    try:
        # A good version: built in the background, swapped by reference.
        v1 = {n: t + 0.01 for n, t in _trainable(draft).items()}
        store.publish(1, v1)
        _wait(lambda: swapper._ready is not None)
        serve_all()
        assert decoder.policy_version == 1 and decoder.draft is not draft
        for n, t in v1.items():
            torch.testing.assert_close(decoder.draft.get_parameter(n), t.to(decoder.draft.dtype))
        s = swapper.stats
        assert s.swaps == 1 and s.build_ms > 0 and s.stall_ms < s.build_ms, s
        serving, before = decoder.draft, _snapshot(decoder.draft)
        # Bad versions: the last tensor poisoned (an inline copy would have half-copied the others),
        # a wrong shape, an unknown name. Each is refused, the serving draft is the same object, unchanged.
        names = list(v1)
        bad = {2: {**{n: t + 1 for n, t in v1.items()}, names[-1]: torch.full_like(v1[names[-1]], float("nan"))},
               3: {**v1, names[0]: v1[names[0]][:, :1]}, 4: {**v1, "no.such.weight": v1[names[0]]}}
        for version, state in bad.items():
            store.publish(version, state)
            _wait(lambda: swapper.stats.refused == version - 1)
            serve_all()
            assert decoder.draft is serving and decoder.policy_version == 1
            assert all(torch.equal(before[k], v) for k, v in decoder.draft.state_dict().items())
        assert "version 4" in s.last_error and "no.such.weight" in s.last_error
        # Serving goes on and a later good version is taken.
        store.publish(5, {n: t - 0.01 for n, t in v1.items()})
        _wait(lambda: swapper._ready is not None)
        serve_all()
        assert decoder.policy_version == 5 and s.swaps == 2 and s.refused == 3
        print(f"build {s.build_ms:.2f} ms off the engine thread, stall {s.max_stall_ms:.3f} ms max")
    finally:
        loop.stop()
        swapper.stop()
