"""The cost of ``engine.deterministic`` beside the default mode, and whether each mode is batch-invariant.

For each batch size, the same prompts through one engine in the default mode and in deterministic mode,
chunks alternating between the two so both see the same machine load: per-request tokens/s (mean), the
ratio deterministic / default, and in each mode how many greedy answers equal the same prompt served
alone (batch 1) in that mode. A section of ``python -m aurora_rl.bench``.
"""

from __future__ import annotations

import statistics

from tqdm import tqdm

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.models.target import TargetModel


def _set_mode(engine: LLMEngine, deterministic: bool) -> None:
    engine.model.set_batch_invariant(deterministic)
    engine.runner.deterministic = deterministic


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, deterministic: bool):
    _set_mode(engine, deterministic)
    return engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def deterministic_section(model: TargetModel, prompts: list[list[int]], batch_sizes: tuple[int, ...],
                          max_tokens: int) -> dict:
    max_len = max(len(p) for p in prompts) + max_tokens + 1
    alone_engine = LLMEngine(model, EngineConfig(num_slots=1, max_len=max_len))
    alone = {det: [_generate(alone_engine, [p], max_tokens, det)[0].output_ids for p in prompts]
             for det in (False, True)}
    results = {}
    for batch in batch_sizes:
        engine = LLMEngine(model, EngineConfig(num_slots=batch, max_len=max_len))
        rates: dict[bool, list[float]] = {False: [], True: []}
        outputs: dict[bool, list[list[int]]] = {False: [], True: []}
        for start in tqdm(range(0, len(prompts), batch), desc=f"deterministic batch {batch}", leave=False):
            chunk = prompts[start:start + batch]
            for det in ((False, True) if (start // batch) % 2 == 0 else (True, False)):
                outs = _generate(engine, chunk, max_tokens, det)
                rates[det] += [o.tokens_per_s for o in outs]
                outputs[det] += [o.output_ids for o in outs]
        default, det = statistics.mean(rates[False]), statistics.mean(rates[True])
        results[str(batch)] = {
            "requests": len(prompts), "default_tokens_per_s": default, "deterministic_tokens_per_s": det,
            "ratio": det / default,
            "default_same_as_alone": sum(a == b for a, b in zip(outputs[False], alone[False])),
            "deterministic_same_as_alone": sum(a == b for a, b in zip(outputs[True], alone[True])),
        }
    _set_mode(alone_engine, False)
    return results


def format_rows(section: dict) -> list[str]:
    lines = ["engine.deterministic vs default, greedy, per-request tokens/s (mean); answers equal to batch 1 alone",
             f"{'batch':>5} | {'default':>8} {'determ.':>8} {'ratio':>6} | {'same (default)':>14} {'same (determ.)':>14}"]
    for batch, r in section.items():
        lines.append(f"{batch:>5} | {r['default_tokens_per_s']:8.1f} {r['deterministic_tokens_per_s']:8.1f} "
                     f"{r['ratio']:6.2f} | {r['default_same_as_alone']:>6}/{r['requests']:<7} "
                     f"{r['deterministic_same_as_alone']:>6}/{r['requests']:<7}")
    return lines
