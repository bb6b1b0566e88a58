"""Export fidelity: does vLLM, loading our exported EAGLE3 draft, propose what our engine proposes?

Both engines serve the same prompts greedily with the same target weights and the same draft, a chain
of ``k`` proposals per step, our engine with copies off. Under greedy verification the chain of steps
is a function of the proposals alone (each step's base is the accepted prefix so far), so if the two
drafts agree the two engines go through the same steps: same base positions, same proposals, same
accepted counts, same outputs. ``compare`` lines the steps up per request and reports where they first
part, which names the cause when they do (the first differing depth and position).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RequestSteps:
    """One request's verify steps: the proposals of each step and what the engine produced."""

    output_ids: list[int]
    proposals: list[list[int]]
    context_lengths: list[int] | None = None
    """Tokens (prompt + output) before each step, when known (ours: from the trace's base positions)."""


@dataclass
class Agreement:
    requests: int
    steps_compared: int
    steps_equal: int
    tokens_compared: int
    tokens_equal: int
    outputs_equal: int
    first_divergence: list[dict[str, Any]] = field(default_factory=list)
    """Per request that parted: request index, step, depth, and the two proposal chains there."""

    @property
    def step_agreement(self) -> float:
        return self.steps_equal / max(self.steps_compared, 1)

    @property
    def token_agreement(self) -> float:
        return self.tokens_equal / max(self.tokens_compared, 1)


def ours(target, draft, prompts: list[list[int]], lookahead: int, max_tokens: int) -> list[RequestSteps]:
    """Our engine, greedy, copies off, fixed lookahead; per request its steps' proposals (from its traces)."""
    from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
    from aurora_rl.engine.speculative import SpecConfig, SpecDecoder

    traces = {}
    dec = SpecDecoder(draft, len(prompts), 2048, SpecConfig(lookahead=lookahead, capture_traces=True,
                                                            trace_dtype="float32", context_copy=False),
                      trace_sink=lambda t: traces.__setitem__(t.request_id, t))
    engine = LLMEngine(target, EngineConfig(num_slots=len(prompts), max_len=2048), None, dec)
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    result = []
    for out in outs:
        t = traces[out.request_id]
        props = [[int(x) for x in row[: int(k)]] for row, k in zip(t.proposals, t.lookahead)]
        result.append(RequestSteps(list(out.output_ids), props, [int(i) + 2 for i in t.step_position]))
    return result


def vllm_steps(llm, prompts: list[list[int]], max_tokens: int) -> list[RequestSteps]:
    """vLLM (an ``LLM`` started with our draft); per request the proposals it made at every step.

    vLLM proposes for the next step at the end of each step, so a request's proposals after its last
    step were never verified: they are dropped (one list per verify step, like ours)."""
    from vllm import SamplingParams

    from aurora_rl.vllm_engine import rpc

    llm.collective_rpc(rpc.record_proposals)
    llm.collective_rpc(rpc.take_proposals)  # drop anything logged before
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    steps = llm.collective_rpc(rpc.take_proposals)[0]
    by_rid: dict[str, list[list[int]]] = {}
    for step in steps:
        for internal, props in step:
            # the engine core suffixes each request id ("<id>-<8 hex>") to keep them unique
            by_rid.setdefault(internal.rsplit("-", 1)[0], []).append(list(props))
    result = []
    for out in outs:
        ids = list(out.outputs[0].token_ids)
        props = by_rid.get(out.request_id, [])
        result.append(RequestSteps(ids, props[:-1]))  # the last chain's step never ran
    return result


def compare(a: list[RequestSteps], b: list[RequestSteps]) -> Agreement:
    """Line the steps up request by request (until the first step that differs, after which the two
    chains are no longer comparable) and count agreements."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} requests against {len(b)}")
    agg = Agreement(len(a), 0, 0, 0, 0, 0)
    for i, (x, y) in enumerate(zip(a, b)):
        agg.outputs_equal += x.output_ids == y.output_ids
        for s, (px, py) in enumerate(zip(x.proposals, y.proposals)):
            n = min(len(px), len(py))
            if n == 0:
                continue
            same = [u == v for u, v in zip(px[:n], py[:n])]
            agg.steps_compared += 1
            agg.tokens_compared += n
            agg.tokens_equal += sum(same)
            if all(same):
                agg.steps_equal += 1
                continue
            agg.first_divergence.append({"request": i, "step": s, "depth": same.index(False) + 1,
                                         "ours": px, "vllm": py,
                                         "context_length": x.context_lengths[s] if x.context_lengths else None})
            break
    return agg


def accept_length(steps: list[RequestSteps]) -> float:
    """Tokens per verify step over all requests (the first token of each comes from its prefill)."""
    return sum(len(r.output_ids) - 1 for r in steps) / max(sum(len(r.proposals) for r in steps), 1)


def chain_with_margins(target, draft, tokens: list[int], k: int) -> tuple[list[int], list[float]]:
    """Our draft's greedy chain of ``k`` after ``tokens`` (the target verifies from ``tokens[-1]`` on),
    computed from scratch, with the top-1 minus top-2 logit gap at each depth: where the two engines
    part, a gap near 0 says a numerical near-tie rather than an export error."""
    n = len(tokens)
    ids = torch.tensor(tokens[: n - 1])[None]
    cache = target.new_cache(1, n + k)
    out = target.forward(ids, torch.arange(n - 1)[None], cache, torch.zeros(1, dtype=torch.long), with_taps=True)
    dcache = draft.new_cache(1, n + k)
    slots = torch.zeros(1, dtype=torch.long)
    props, gaps = [], []
    with torch.inference_mode():
        d = draft(torch.tensor(tokens[1:])[None], draft.fuse(out.taps), torch.arange(n - 1)[None], dcache, slots,
                  logit_index=torch.tensor([n - 2]))
        logits, hidden = d.logits[0], d.hidden[0]
        for depth in range(k):
            top = logits.float().topk(2)
            props.append(int(draft.draft_to_target[top.indices[0]]))
            gaps.append(float(top.values[0] - top.values[1]))
            if depth + 1 < k:
                d = draft(torch.tensor([[props[-1]]]), hidden[None, None], torch.tensor([[n - 1 + depth]]), dcache, slots)
                logits, hidden = d.logits[0, 0], d.hidden[0, 0]
    return props, gaps
