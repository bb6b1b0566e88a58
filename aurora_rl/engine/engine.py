"""LLMEngine: the serving step loop over a target model with continuous batching.

``add_request`` queues a request (a prompt longer than the context is refused here, not truncated);
``step`` advances every running request by one target pass, frees finished slots and admits waiting
requests into them in the same step; ``generate`` runs requests to completion. A ``decoder`` object
(plain decoding by default, speculative decoding in ``aurora_rl.engine.speculative``) decides what one
step does for the running rows; the engine only schedules and finishes requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import torch

from aurora_rl.engine.runner import ModelRunner
from aurora_rl.models import cpu_kernels
from aurora_rl.engine.sampling import SamplingParams, sample_tokens
from aurora_rl.engine.scheduler import Scheduler
from aurora_rl.engine.sequence import RequestOutput, Sequence, Status
from aurora_rl.models.target import TargetModel

log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """A prompt that does not fit the context window (it is refused, never silently truncated)."""


@dataclass(slots=True)
class EngineConfig:
    """Serving engine settings."""

    num_slots: int = 8
    """Concurrent requests (the maximum batch size)."""
    max_len: int = 2048
    """Context limit per request: prompt plus generated tokens."""
    deterministic: bool = False
    """Batch-invariant target passes: at temperature 0 a prompt gets the same tokens alone or batched,
    streamed or not, with speculation on or off (``TargetModel.set_batch_invariant``). Costs speed
    (``make bench`` prints how much); needs the native CPU kernels."""

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")


class Decoder(Protocol):
    """What one engine step does for the running rows: plain decoding or speculation."""

    def prefill(self, engine: "LLMEngine", seqs: list[Sequence]) -> None: ...
    def decode(self, engine: "LLMEngine", seqs: list[Sequence]) -> None: ...
    def release(self, engine: "LLMEngine", seq: Sequence) -> None: ...


class PlainDecoder:
    """One target forward per step, one token per row."""

    def prefill(self, engine: "LLMEngine", seqs: list[Sequence]) -> None:
        for seq in seqs:
            out = engine.runner.extend([seq.slot], [seq.prompt_ids], last_only=True)
            engine.append_tokens(seq, sample_tokens(out.logits, [seq.params], [seq.generator]))

    def decode(self, engine: "LLMEngine", seqs: list[Sequence]) -> None:
        out = engine.runner.extend([s.slot for s in seqs], [[s.last_token] for s in seqs], last_only=True)
        tokens = sample_tokens(out.logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, tok in zip(seqs, tokens):
            seq.verify_steps += 1
            engine.append_tokens(seq, [tok])

    def release(self, engine: "LLMEngine", seq: Sequence) -> None:
        pass


class LLMEngine:
    def __init__(self, model: TargetModel, config: EngineConfig | None = None, tokenizer: Any = None,
                 decoder: Decoder | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, self.config.num_slots, self.config.max_len, self.config.deterministic)
        if self.config.deterministic:
            if not (cpu_kernels.available() and model.runs_ragged(self.runner.cache, 2)):
                raise ValueError("engine.deterministic=true needs the native CPU kernels (AVX2 or AVX-512) for "
                                 f"the target's dtype {model.dtype}; this machine or dtype has none: set it false")
            model.set_batch_invariant(True)
        self.scheduler = Scheduler(self.config.num_slots)
        self.decoder: Decoder = decoder or PlainDecoder()
        self.eos_ids = set(model.config.eos_token_ids)
        self._finished: list[Sequence] = []

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an engine tokenizer; pass token ids instead")
            prompt = self.tokenizer.encode(prompt)
        if not prompt:
            raise ValueError("empty prompt: at least one token is needed")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got min={min(prompt)} max={max(prompt)}")
        if len(prompt) >= self.config.max_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt)} tokens but the context limit is {self.config.max_len} "
                f"(at least one token must be left to generate)")
        seq = Sequence(list(prompt), params)
        if request_id is not None:
            if self._known(request_id):
                raise ValueError(f"request id {request_id!r} is already in use")
            seq.request_id = request_id
        self.scheduler.add(seq)
        return seq.request_id

    def _known(self, request_id: str) -> bool:
        return any(s.request_id == request_id for s in self.scheduler.waiting) or any(
            s.request_id == request_id for s in self.scheduler.running.values())

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        self._release(seq)
        return self._output(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance running requests one step, then fill free slots; returns requests finished now."""
        running = self.scheduler.decoding()
        if running:
            self.decoder.decode(self, running)
        self._reap()
        admitted = self.scheduler.admit()
        if admitted:
            self.decoder.prefill(self, admitted)
            self._reap()
        done, self._finished = self._finished, []
        return [self._output(s) for s in done]

    def generate(self, prompts: Iterable[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run all prompts to completion; outputs in the order of ``prompts``."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, RequestOutput] = {}
        while self.has_work():
            for out in self.step():
                results[out.request_id] = out
        return [results[i] for i in ids]

    # ---- called by decoders ---------------------------------------------------------------------
    def append_tokens(self, seq: Sequence, tokens: list[int]) -> None:
        """Append generated tokens, stopping at the first that ends the request."""
        if not seq.output_ids:
            seq.t_first_token = time.perf_counter()
        p = seq.params
        for tok in tokens:
            seq.output_ids.append(tok)
            if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                return self._mark_finished(seq, "stop")
            if p.stop and self._hit_stop_string(seq):
                return self._mark_finished(seq, "stop")
            if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_len:
                return self._mark_finished(seq, "length")

    def _hit_stop_string(self, seq: Sequence) -> bool:
        if self.tokenizer is None:
            raise ValueError("stop strings need an engine tokenizer")
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text_end = min(hits)
        return bool(hits)

    def _mark_finished(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _reap(self) -> None:
        for seq in self.scheduler.decoding():
            if seq.status is Status.FINISHED:
                self.scheduler.finish(seq, Status.FINISHED, seq.finish_reason or "stop")
                self._release(seq)
                self._finished.append(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.decoder.release(self, seq)
            self.runner.release(seq.slot)

    def _output(self, seq: Sequence) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            if seq.text_end is not None:
                text = text[: seq.text_end]
        return RequestOutput.from_sequence(seq, text)


def set_threads(n: int | None) -> None:
    """Torch intra-op threads (defaults to all cores)."""
    if n:
        torch.set_num_threads(n)
