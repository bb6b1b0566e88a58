"""Trace: everything a learner needs from one served request, and the recorder that builds it.

A trace holds the prompt and completion ids; the target's tapped features (three layers,
concatenated) and final-norm hidden state for every position the target computed and kept; and one
row per verify step: the base position, the proposals, the behaviour draft's log-probabilities, the
accepted count, the draft policy version, and timings. Stored dtype is configurable (bf16 default).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch


class TraceStatus(enum.Enum):
    FINISHED = "finished"
    ABORTED = "aborted"
    ERROR = "error"


@dataclass
class Trace:
    request_id: str
    prompt_ids: torch.Tensor
    """[P] long."""
    output_ids: torch.Tensor
    """[C] long."""
    taps: torch.Tensor
    """[L, num_taps * H]: target features at positions 0..L-1, L = P + C - 1."""
    hidden: torch.Tensor
    """[L, H]: final-norm hidden state (the learner applies the target's lm_head to it)."""
    step_position: torch.Tensor
    """[S] long: base position i of each verify step; depth j proposes the token at i + j + 1."""
    proposals: torch.Tensor
    """[S, K] long target ids, -1 past the step's lookahead."""
    behaviour_logp: torch.Tensor
    """[S, K] float: log-probability of each proposal under the draft that made it."""
    accepted: torch.Tensor
    """[S] long: proposals the target kept."""
    lookahead: torch.Tensor
    """[S] long: proposals made (0 = no speculation in that step)."""
    policy_version: torch.Tensor
    """[S] long: draft version that proposed."""
    step_time_s: torch.Tensor
    """[S] float: wall time of each verify step (draft + verify) for this batch."""
    status: TraceStatus = TraceStatus.FINISHED
    finish_reason: str | None = None
    greedy: bool = True
    copied: torch.Tensor | None = None
    """[S] bool: the step's proposals were copied from the context (``engine.context_copy``), not drawn
    from the draft; their behaviour log-probs are 0 and the learner's proposal terms skip them. None
    (traces from before the field, or from an engine without copies) means all False."""

    def __post_init__(self) -> None:
        if self.copied is None:
            self.copied = torch.zeros(self.accepted.shape[0], dtype=torch.bool)

    @property
    def verify_steps(self) -> int:
        return int(self.accepted.numel())

    @property
    def accepted_tokens(self) -> int:
        return int(self.accepted.sum())

    @property
    def accept_length(self) -> float:
        return 1.0 + self.accepted_tokens / max(self.verify_steps, 1)

    @property
    def num_positions(self) -> int:
        return int(self.taps.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    @property
    def tokens(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.output_ids])


@dataclass
class TraceRecorder:
    """Accumulates one request's features and verify steps while it is served."""

    dtype: torch.dtype = torch.bfloat16
    taps: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    steps: list[tuple] = field(default_factory=list)
    t_step: float = field(default_factory=time.perf_counter)

    def add_positions(self, taps: torch.Tensor, hidden: torch.Tensor) -> None:
        self.taps.append(taps.to(self.dtype))
        self.hidden.append(hidden.to(self.dtype))

    def add_step(self, position: int, proposals: list[int], logp: list[float], accepted: int, version: int,
                 seconds: float, copied: bool = False) -> None:
        self.steps.append((position, proposals, logp, accepted, version, seconds, copied))

    def finish(self, request_id: str, prompt_ids: list[int], output_ids: list[int], status: TraceStatus,
               finish_reason: str | None, greedy: bool) -> Trace:
        L = len(prompt_ids) + len(output_ids) - 1
        taps = torch.cat(self.taps)[:L] if self.taps else torch.zeros(0, 0, dtype=self.dtype)
        hidden = torch.cat(self.hidden)[:L] if self.hidden else torch.zeros(0, 0, dtype=self.dtype)
        K = max((len(s[1]) for s in self.steps), default=0)
        S = len(self.steps)
        proposals = torch.full((S, K), -1, dtype=torch.long)
        logp = torch.zeros(S, K)
        for i, (_, props, lp, *_rest) in enumerate(self.steps):
            proposals[i, :len(props)] = torch.tensor(props, dtype=torch.long)
            logp[i, :len(lp)] = torch.tensor(lp)
        col = lambda j, dt: torch.tensor([s[j] for s in self.steps], dtype=dt)  # noqa: E731
        return Trace(
            request_id=request_id, prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
            output_ids=torch.tensor(output_ids, dtype=torch.long), taps=taps, hidden=hidden,
            step_position=col(0, torch.long), proposals=proposals, behaviour_logp=logp,
            accepted=col(3, torch.long), lookahead=torch.tensor([len(s[1]) for s in self.steps], dtype=torch.long),
            policy_version=col(4, torch.long), step_time_s=col(5, torch.float32), copied=col(6, torch.bool),
            status=status, finish_reason=finish_reason, greedy=greedy,
        )
