"""Greedy answers alone vs batched vs speculated, default mode vs ``engine.deterministic``, tiny target.

8 random prompts x 48 tokens through the tiny random Llama target in the given dtype; the reference is
each prompt alone without speculation. Prints, per setting, how many of the 8 answers differ from it.

    python experiments/determinism_alone_vs_batched.py bfloat16 1     # dtype, deterministic (0 or 1)
"""

from __future__ import annotations

import sys

import torch

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from envs.models import random_draft, tiny_target
from tests.test_engine import prompts


def engine(dtype: torch.dtype, deterministic: bool, spec: bool, slots: int = 8) -> LLMEngine:
    t = tiny_target(0).to_dtype(dtype)
    dec = (SpecDecoder(random_draft(t, 0, 64).to_dtype(dtype), slots, 256, SpecConfig(lookahead=3, context_copy=True))
           if spec else None)
    return LLMEngine(t, EngineConfig(num_slots=slots, max_len=256, deterministic=deterministic), None, dec)


def main() -> None:
    dtype, det = getattr(torch, sys.argv[1]), sys.argv[2] == "1"
    ps = prompts(8, seed=5)
    greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    res = {}
    for spec in (False, True):
        res[("batch", spec)] = [o.output_ids for o in engine(dtype, det, spec).generate(ps, greedy)]
        e = engine(dtype, det, spec)
        res[("alone", spec)] = [e.generate([p], greedy)[0].output_ids for p in ps]
    ref = res[("alone", False)]
    for (how, spec), outs in res.items():
        print(f"{sys.argv[1]} deterministic={det} {how} speculation={spec}: "
              f"{sum(a != b for a, b in zip(outs, ref))} of 8 differ from alone without speculation")


if __name__ == "__main__":
    main()
