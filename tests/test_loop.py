"""EngineLoop: requests from other threads, streamed deltas, and failures answered, never lost."""

from __future__ import annotations

import pytest

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams, Status
from aurora_rl.serving.loop import EngineLoop
from tests.conftest import tiny_target
from tests.test_engine import prompts


@pytest.mark.unit
def test_submit_stream_and_finish():
    model, _ = tiny_target()
    ps = prompts(5)
    ref = LLMEngine(model, EngineConfig(num_slots=2, max_len=64)).generate(ps, SamplingParams(max_tokens=9, ignore_eos=True))
    loop = EngineLoop(LLMEngine(model, EngineConfig(num_slots=2, max_len=64))).start()
    try:
        streams = [[] for _ in ps]
        futs = [loop.submit(p, SamplingParams(max_tokens=9, ignore_eos=True), on_delta=s.extend) for p, s in zip(ps, streams)]
        outs = [f.result(timeout=60) for f in futs]
        assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
        assert streams == [o.output_ids for o in outs]
        with pytest.raises(ValueError, match="empty prompt"):
            loop.submit([])
    finally:
        loop.stop()


@pytest.mark.unit
def test_a_failing_step_answers_every_request_with_an_error():
    model, _ = tiny_target()
    engine = LLMEngine(model, EngineConfig(num_slots=2, max_len=64))
    calls = {"n": 0}
    real = engine.decoder.decode

    def flaky(eng, seqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(eng, seqs)

    engine.decoder.decode = flaky
    loop = EngineLoop(engine).start()
    try:
        futs = [loop.submit(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in prompts(3)]
        outs = [f.result(timeout=60) for f in futs]
        assert all(o.status is Status.ERROR and "boom" in o.error for o in outs)
        assert loop.errors == 1 and loop.in_flight() == 0
        # The loop keeps serving afterwards.
        ok = loop.submit(prompts(1)[0], SamplingParams(max_tokens=4, ignore_eos=True)).result(timeout=60)
        assert ok.status is Status.FINISHED and ok.num_output_tokens == 4
    finally:
        loop.stop()
