"""The requests a run serves, from its ``workload`` section: training traffic by phase, and held-out
prompts for the final evaluation that never reach the learner.

For each ShareGPT domain the seeded prompt order is split once: the first ``held_out`` prompts are
held out, the rest feed the phases. A phase longer than its domain's supply repeats that supply (live
traffic repeats too). Prompts longer than ``max_prompt_tokens`` are skipped and counted, never cut.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from aurora_rl.config import WorkloadSection


@dataclass
class Traffic:
    requests: list[tuple[list[int], str]]
    """(prompt ids, domain) in serving order."""
    held_out: dict[str, list[list[int]]]
    """Per domain: prompts for the final evaluation only."""
    phase_starts: list[int]
    """Index in ``requests`` where each phase begins."""
    skipped: dict[str, int] = field(default_factory=dict)

    def params(self, section: WorkloadSection, index: int) -> dict[str, Any]:
        """SamplingParams fields of request ``index`` (a per-request seed when sampling)."""
        p: dict[str, Any] = {"max_tokens": section.max_tokens, "temperature": section.temperature}
        if section.temperature > 0:
            p["seed"] = index
        return p


def _domain_prompts(domain: str, tokenizer, seed: int, max_tokens: int, skipped: dict) -> list[list[int]]:
    from aurora_rl.data.sharegpt import chat_token_ids, domain_counts, sample_prompts

    out = []
    for p in sample_prompts(domain, domain_counts()[domain], seed):
        ids = chat_token_ids(tokenizer, p.messages)
        if len(ids) > max_tokens:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        out.append(ids)
    return out


def build_traffic(section: WorkloadSection, tokenizer, vocab_size: int, seed: int) -> Traffic:
    skipped: dict[str, int] = {}
    supply: dict[str, list[list[int]]] = {}
    held: dict[str, list[list[int]]] = {}
    requests: list[tuple[list[int], str]] = []
    starts = []
    for phase in section.phases:
        domain, n = phase["domain"], int(phase["requests"])
        if domain not in supply:
            if section.source == "random":
                from envs.workloads import random_prompts

                prompts = random_prompts(n + section.held_out, vocab_size, seed + len(supply))
            else:
                prompts = _domain_prompts(domain, tokenizer, seed, section.max_prompt_tokens, skipped)
            if len(prompts) <= section.held_out:
                raise ValueError(f"workload domain {domain!r} has {len(prompts)} usable prompts, not more than "
                                 f"workload.held_out={section.held_out}")
            held[domain], supply[domain] = prompts[: section.held_out], prompts[section.held_out:]
        starts.append(len(requests))
        requests += [(ids, domain) for ids in itertools.islice(itertools.cycle(supply[domain]), n)]
    return Traffic(requests, held, starts, skipped)


def vocab_sample(traffic: Traffic, n: int) -> list[list[int]]:
    """Prompt ids of the first ``n`` training requests (what picks the day-0 draft vocabulary)."""
    return [ids for ids, _ in traffic.requests[:n]]
