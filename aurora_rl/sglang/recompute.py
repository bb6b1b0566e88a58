"""A Trace for a request SGLang served: stock outputs plus one prefill through our target for the features.

Stock SGLang returns the output ids and per-request speculation counters, not the target's tapped
hidden states nor the per-step proposals. So the features are recomputed with one prefill of
prompt + completion (positions 0..L-1, L = P + C - 1) through our ``TargetModel``; under the same
weights this is what the serving target computed (up to kernel numerics). The trace has zero logged
verify steps: the loss terms that need proposals (acceptance reward, off-policy correction) see no rows
from it, while NTP and KL use its features. The counters SGLang did report travel beside the trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_rl.engine.trace import Trace, TraceStatus

SOURCE = "sglang"


@dataclass
class SGLangCounters:
    """What SGLang reported for one request (the trace itself logs no verify steps)."""

    verify_steps: int
    accepted_tokens: int
    completion_tokens: int
    policy_version: int
    """Draft version that served the request (from ``weight_version`` when it is an integer)."""
    weight_version: str | None = None

    @property
    def accept_length(self) -> float:
        return self.completion_tokens / self.verify_steps if self.verify_steps else 1.0


@dataclass
class RecomputedTrace:
    trace: Trace
    counters: SGLangCounters
    source: str = SOURCE
    """Marks traces without logged proposals in metrics (``sglang/...``)."""


def parse_policy_version(weight_version: str | None, default: int) -> int:
    """Our swaps tag SGLang's ``weight_version`` with the integer policy version; anything else
    (sglang's own ``"default"``) means the version the replica started with."""
    try:
        return int(weight_version) if weight_version is not None else default
    except ValueError:
        return default


def _empty_steps() -> dict[str, torch.Tensor]:
    long0 = torch.zeros(0, dtype=torch.long)
    return {"step_position": long0, "proposals": torch.zeros(0, 0, dtype=torch.long),
            "behaviour_logp": torch.zeros(0, 0), "accepted": long0.clone(), "lookahead": long0.clone(),
            "policy_version": long0.clone(), "step_time_s": torch.zeros(0)}


def recompute_trace(target, prompt_ids: list[int], output_ids: list[int], meta: dict, policy_version: int,
                    dtype: torch.dtype = torch.bfloat16, request_id: str = "", greedy: bool = True,
                    finish_reason: str | None = None, temperature: float | None = None, top_p: float = 1.0,
                    top_k: int = 0) -> RecomputedTrace:
    """Trace for ``prompt_ids`` + ``output_ids`` with taps/hidden from one prefill through ``target``.

    ``meta`` is SGLang's ``meta_info`` (``spec_verify_ct``, ``spec_num_correct_drafts``,
    ``completion_tokens``, ``weight_version``); ``policy_version`` is used when ``weight_version`` is
    not one of our integer tags.
    """
    P, C = len(prompt_ids), len(output_ids)
    if P < 1 or C < 1:
        raise ValueError(f"recompute_trace needs a prompt and a completion, got {P} prompt and {C} output tokens")
    L = P + C - 1
    tokens = torch.tensor(list(prompt_ids) + list(output_ids)[:-1], dtype=torch.long)
    device = target.embed.weight.device
    cache = target.new_cache(1, L)
    out = target.forward(tokens[None].to(device), torch.arange(L, device=device)[None], cache,
                         torch.zeros(1, dtype=torch.long, device=device),
                         logit_index=torch.tensor([L - 1], device=device), with_taps=True)
    verify = int(meta.get("spec_verify_ct") or 0)
    completion = int(meta.get("completion_tokens", C))
    accepted = int(meta["spec_num_correct_drafts"]) if "spec_num_correct_drafts" in meta else (
        max(completion - verify, 0) if verify else 0)
    weight_version = meta.get("weight_version")
    weight_version = None if weight_version is None else str(weight_version)
    counters = SGLangCounters(verify_steps=verify, accepted_tokens=accepted, completion_tokens=completion,
                              policy_version=parse_policy_version(weight_version, policy_version),
                              weight_version=weight_version)
    trace = Trace(request_id=request_id, prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
                  output_ids=torch.tensor(output_ids, dtype=torch.long),
                  taps=out.taps[0].to("cpu", dtype), hidden=out.hidden[0].to("cpu", dtype),
                  status=TraceStatus.FINISHED, finish_reason=finish_reason, greedy=greedy, **_empty_steps(),
                  # SGLang's default temperature is 1, as OpenAI's; None = that default for sampled requests.
                  temperature=0.0 if greedy else (1.0 if temperature is None else float(temperature)),
                  top_p=float(top_p), top_k=max(int(top_k), 0))
    return RecomputedTrace(trace, counters)
