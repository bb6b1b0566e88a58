"""One request's state while it is served (Sequence) and what the caller gets back (RequestOutput)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from aurora_rl.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    ERROR = "error"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    """``stop`` (EOS, stop token or string), ``length`` (max_tokens or context), ``abort``, ``error``."""
    slot: int | None = None
    generator: torch.Generator | None = None
    text_end: int | None = None
    """Character offset where a stop string matched (output text is cut there)."""
    error: str | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_admitted: float = 0.0
    t_first_token: float = 0.0
    t_finished: float = 0.0
    verify_steps: int = 0
    """Target forward passes that produced tokens for this request after prefill (decode or verify)."""
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def room(self, max_len: int) -> int:
        """Most draft tokens one step can keep: one token of every step is the target's own."""
        return min(self.params.max_tokens - len(self.output_ids), max_len - self.num_tokens) - 1

    @property
    def is_finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.ABORTED, Status.ERROR)


@dataclass
class RequestOutput:
    """A finished (or aborted) request: its tokens, text, counters and timings."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    status: Status
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    latency_s: float
    """From admission to a slot until the last token."""
    ttft_s: float
    """From arrival to the first generated token (includes queueing)."""
    tokens_per_s: float
    """Output tokens over ``latency_s``."""
    verify_steps: int
    draft_tokens: int
    accepted_tokens: int
    error: str | None = None
    decode_tokens_per_s: float = 0.0
    """Tokens after the first over the time after it: the decoding rate speculation acts on (the prefill
    that produces the first token is the same with and without it). 0 with fewer than 2 tokens."""

    @property
    def accept_length(self) -> float:
        """Tokens the target kept per verify step: 1 + accepted draft tokens per step (1.0 without speculation)."""
        return 1.0 + self.accepted_tokens / max(self.verify_steps, 1)

    @classmethod
    def from_sequence(cls, seq: Sequence, text: str | None) -> "RequestOutput":
        latency = max(seq.t_finished - seq.t_admitted, 1e-9)
        return cls(
            request_id=seq.request_id, prompt_ids=list(seq.prompt_ids), output_ids=list(seq.output_ids),
            text=text, status=seq.status, finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
            latency_s=latency, ttft_s=max(seq.t_first_token - seq.t_arrival, 0.0),
            tokens_per_s=len(seq.output_ids) / latency, verify_steps=seq.verify_steps,
            draft_tokens=seq.draft_tokens, accepted_tokens=seq.accepted_tokens, error=seq.error,
            decode_tokens_per_s=((len(seq.output_ids) - 1) / max(seq.t_finished - seq.t_first_token, 1e-9)
                                 if len(seq.output_ids) > 1 else 0.0),
        )
