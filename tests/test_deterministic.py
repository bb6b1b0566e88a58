"""engine.deterministic: at temperature 0 a prompt gets the same tokens alone, in a batch of 8, streamed or
not, with speculation on or off (batch-invariant target passes).

Tiny random target in bfloat16, where the default mode is not batch-invariant (measured: 1 of 8
answers differs between alone and batched, the bf16 gemv sums a lone row over two accumulators),
and in float32. The kernel-level check compares one row's logits bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.models.layers import Linear
from aurora_rl.models import cpu_kernels
from aurora_rl.serving.loop import EngineLoop
from envs.models import random_draft, tiny_target
from tests.test_engine import prompts

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="deterministic mode needs the native kernels")
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def _engine(dtype: torch.dtype, spec: bool) -> LLMEngine:
    target = tiny_target(0).to_dtype(dtype)
    decoder = None
    if spec:
        decoder = SpecDecoder(random_draft(target, 0, 64).to_dtype(dtype), 8, 256,
                              SpecConfig(lookahead=3, context_copy=True))
    return LLMEngine(target, EngineConfig(num_slots=8, max_len=256, deterministic=True), None, decoder)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_rows_do_not_depend_on_the_batch(dtype):
    torch.manual_seed(0)
    lin = Linear(64, 200, bias=True).to(dtype)
    lin.batch_invariant = True
    x = torch.randn(300, 64).to(dtype)
    with torch.inference_mode():
        full = lin(x)  # three chunks: 128, 128, 44 rows
        for rows in (1, 2, 3, 5, 8, 129):
            torch.testing.assert_close(lin(x[:rows]), full[:rows], rtol=0, atol=0)
        torch.testing.assert_close(lin(x[7:8]), full[7:8], rtol=0, atol=0)
        ref = x.float() @ lin.weight.float().T + lin.bias.float()
        torch.testing.assert_close(full.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_tokens_are_the_same_alone_batched_streamed_and_speculated(dtype):
    ps = prompts(8, seed=5)
    alone = _engine(dtype, spec=False)
    want = [alone.generate([p], GREEDY)[0].output_ids for p in ps]
    for spec in (False, True):
        batch = _engine(dtype, spec)
        assert [o.output_ids for o in batch.generate(ps, GREEDY)] == want, f"batch of 8, speculation {spec}"
        one = _engine(dtype, spec)
        assert [one.generate([p], GREEDY)[0].output_ids for p in ps] == want, f"alone, speculation {spec}"
    # Streamed through the engine loop, 8 at once, speculating: the deltas concatenate to the same tokens.
    loop = EngineLoop(_engine(dtype, spec=True)).start()
    try:
        streams: list[list[int]] = [[] for _ in ps]
        futs = [loop.submit(p, GREEDY, on_delta=streams[i].extend) for i, p in enumerate(ps)]
        outs = [f.result(120) for f in futs]
    finally:
        loop.stop()
    assert [o.output_ids for o in outs] == want and streams == want


@pytest.mark.unit
def test_deterministic_mode_refuses_a_machine_without_the_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    with pytest.raises(ValueError, match="engine.deterministic=true needs the native CPU kernels"):
        LLMEngine(tiny_target(0), EngineConfig(num_slots=2, max_len=64, deterministic=True))
