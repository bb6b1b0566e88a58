"""Traffic sources for the serving envs: requests, arrival processes and domain-shift schedules.

Contract:
- A workload is any iterable of ``Request`` (or of ``(prompt_ids, SamplingParams)`` pairs, which
  ``as_request`` accepts). The classes here are re-iterable and deterministic: every ``iter()`` starts
  the same sequence again, so an env can restart its traffic on a seeded reset.
- ``TokenWorkload`` serves token-id prompts once (finite) or forever (``cycle=True``);
  ``random_prompts`` makes token-id prompts for tiny random models; ``sharegpt_workload`` turns
  ShareGPT prompts into chat-templated token ids, phase by phase of a ``DomainShift`` schedule
  (prompts over a token limit are left out and counted, never truncated).
- An arrival process says how many new requests arrive after an engine step: ``ClosedLoop`` keeps a
  fixed number of requests in the system ("always full" when it equals the slots), ``PoissonArrivals``
  draws Poisson(rate * dt) for a step of ``dt`` seconds. Both take the caller's numpy Generator, so the
  env's seed decides the traffic.
Nothing here touches an engine or a model; the tokenizer is any object with ``apply_chat_template``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from aurora_rl.engine.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class Request:
    """One request of traffic: prompt token ids, how to decode it, and its domain label if known."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    domain: str | None = None


def as_request(item: Request | tuple) -> Request:
    """A ``Request`` from a Request or a ``(prompt_ids, SamplingParams)`` pair."""
    if isinstance(item, Request):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], SamplingParams):
        return Request(tuple(int(t) for t in item[0]), item[1])
    raise TypeError(f"a workload item must be a Request or a (prompt_ids, SamplingParams) pair; got {item!r:.80}")


class TokenWorkload:
    """Token-id prompts served in order, once or cycling forever; one SamplingParams for all or one each."""

    def __init__(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, cycle: bool = False,
                 domains: Sequence[str | None] | None = None) -> None:
        if not prompts:
            raise ValueError("a TokenWorkload needs at least one prompt")
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        domains = list(domains) if domains is not None else [None] * len(prompts)
        if len(domains) != len(prompts):
            raise ValueError(f"{len(domains)} domain labels for {len(prompts)} prompts")
        self.requests = [Request(tuple(int(t) for t in p), sp, d) for p, sp, d in zip(prompts, plist, domains)]
        self.cycle = cycle
        self.skipped: dict[str, int] = {}
        """Prompts left out while building the workload, by reason (e.g. ``too_long``)."""

    def __len__(self) -> int:
        """Distinct requests (one pass); a cycling workload repeats them forever."""
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return itertools.cycle(self.requests) if self.cycle else iter(self.requests)


def random_prompts(n: int, vocab_size: int, seed: int, min_len: int = 3, max_len: int = 12,
                   low: int = 2) -> list[list[int]]:
    """``n`` prompts of uniform random ids in [low, vocab_size), lengths uniform in [min_len, max_len]."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if not 0 <= low < vocab_size:
        raise ValueError(f"need 0 <= low < vocab_size={vocab_size}, got low={low}")
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab_size, int(rng.integers(min_len, max_len + 1))).tolist() for _ in range(n)]


# ---- domain shift --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Phase:
    domain: str
    """A ShareGPT domain (``aurora_rl.data.sharegpt.VALID_DOMAINS``)."""
    num_requests: int


class DomainShift:
    """A schedule of traffic phases, e.g. ``[("chat", 500), ("code", 500)]``; iterates domain labels."""

    def __init__(self, phases: Iterable[Phase | tuple[str, int]]) -> None:
        from aurora_rl.data.sharegpt import check_domain

        self.phases = [p if isinstance(p, Phase) else Phase(*p) for p in phases]
        if not self.phases:
            raise ValueError("a DomainShift needs at least one (domain, num_requests) phase")
        for p in self.phases:
            check_domain(p.domain)
            if p.num_requests < 1:
                raise ValueError(f"phase {p.domain!r} has num_requests={p.num_requests}; need >= 1")

    def __len__(self) -> int:
        return sum(p.num_requests for p in self.phases)

    def __iter__(self) -> Iterator[str]:
        for p in self.phases:
            yield from itertools.repeat(p.domain, p.num_requests)

    def boundaries(self) -> list[int]:
        """Request index at which each phase starts."""
        return list(itertools.accumulate([0] + [p.num_requests for p in self.phases[:-1]]))


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ready for the assistant's turn."""
    from aurora_rl.data.sharegpt import chat_token_ids

    return chat_token_ids(tokenizer, messages)


def sharegpt_workload(tokenizer, schedule: DomainShift | Iterable[tuple[str, int]], seed: int,
                      params: SamplingParams | None = None, cycle: bool = False,
                      max_prompt_tokens: int | None = None) -> TokenWorkload:
    """ShareGPT first turns as chat prompts, phase by phase; a domain seen again gets fresh prompts.

    Prompts longer than ``max_prompt_tokens`` are never truncated: they are left out, replaced by the
    next ones of the same seeded order, and counted in ``workload.skipped["too_long"]``.
    """
    shift = schedule if isinstance(schedule, DomainShift) else DomainShift(schedule)
    used: dict[str, int] = {}
    prompts, domains, too_long = [], [], 0
    for phase in shift.phases:
        ids, used[phase.domain], dropped = _phase_prompts(tokenizer, phase, seed, used.get(phase.domain, 0),
                                                          max_prompt_tokens)
        prompts += ids
        domains += [phase.domain] * len(ids)
        too_long += dropped
    workload = TokenWorkload(prompts, params, cycle=cycle, domains=domains)
    workload.skipped["too_long"] = too_long
    return workload


def _phase_prompts(tokenizer, phase: Phase, seed: int, skip: int, max_tokens: int | None):
    """One phase's prompt ids, from position ``skip`` of the seeded order on.

    Returns (prompt ids, the next unused position, how many were too long).
    """
    from aurora_rl.data.sharegpt import domain_counts, sample_prompts

    available = domain_counts()[phase.domain]
    out: list[list[int]] = []
    dropped = 0
    while len(out) < phase.num_requests:
        want = min(phase.num_requests - len(out), available - skip)
        if want <= 0:
            raise ValueError(f"ShareGPT domain {phase.domain!r} has too few prompts within max_prompt_tokens="
                             f"{max_tokens}: found {len(out)} of {phase.num_requests} ({dropped} too long)")
        for p in sample_prompts(phase.domain, want, seed, skip=skip):
            ids = chat_prompt_ids(tokenizer, p.messages)
            if max_tokens is None or len(ids) <= max_tokens:
                out.append(ids)
            else:
                dropped += 1
        skip += want
    return out, skip, dropped


# ---- arrival processes ---------------------------------------------------------------------------
class ClosedLoop:
    """Keeps ``concurrency`` requests in the system: a finished request is replaced at once."""

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency

    def due(self, dt: float, in_system: int, rng: np.random.Generator) -> int:
        return max(0, self.concurrency - in_system)


class PoissonArrivals:
    """Open-loop traffic: requests arrive as a Poisson process of ``rate`` per second.

    An idle system waits for the next arrival (at least one is due when nothing is in the system), so a
    step loop never spins on an empty engine.
    """

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"arrival rate must be > 0 requests/s, got {rate}")
        self.rate = rate

    def due(self, dt: float, in_system: int, rng: np.random.Generator) -> int:
        n = int(rng.poisson(self.rate * max(dt, 0.0)))
        return max(n, 1) if in_system == 0 else n


ArrivalProcess = ClosedLoop | PoissonArrivals


def make_arrivals(kind: str, num_slots: int, rate: float = 20.0) -> ArrivalProcess:
    """``closed`` (always full: concurrency = slots) or ``poisson`` (``rate`` requests/s)."""
    if kind == "closed":
        return ClosedLoop(num_slots)
    if kind == "poisson":
        return PoissonArrivals(rate)
    raise ValueError(f"arrival={kind!r}; choose 'closed' or 'poisson'")
