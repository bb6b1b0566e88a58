"""VLLMBackend: vLLM's engine in this process as an ``ExternalRollout`` backend (EAGLE3 with our draft).

One thread owns the engine (``vllm.LLM``'s ``LLMEngine``, engine core in process): it adds queued
requests, steps, hands finished outputs back to the callers waiting in ``generate``, and runs draft
swaps between steps, so no swap ever lands inside a forward pass. Speculation counters per request
come from that loop: every engine step that adds tokens to a request after its first token is one
verify step, and a step that adds n tokens kept n - 1 drafted ones (vLLM reports acceptance only in
aggregate). A swap replaces the draft's weights through ``LLM.collective_rpc`` running
``rpc.reload_draft`` inside the worker (vLLM's own weight loader plus its post-load processing; the
drafter's plain ``load_weights`` cannot be used on CPU, see ``rpc``). ``vllm`` is imported only here.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.eagle3_io import to_eagle3_tensors
from aurora_rl.sglang.client import GenerateResult

log = logging.getLogger(__name__)
SOURCE = "vllm"

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
"""Our SamplingParams fields that vLLM's ``SamplingParams`` takes under the same names."""

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def configure_environment(kv_cache_gib: float, threads: int) -> None:
    """vLLM CPU reads these at import/engine start: in-process engine core (no extra process, and
    ``collective_rpc`` reaches the worker directly), the KV cache size, and no core pinning (the
    rollout worker shares the machine's cores with the learner)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gib))))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    sampling: Any
    future: Future
    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    verify_steps: int = 0
    accepted: int = 0


@dataclass
class _Call:
    """Work the engine thread runs between steps (a draft swap)."""

    fn: Callable[[], Any]
    future: Future


class VLLMBackend:
    """An in-process vLLM engine; ``generate`` may be called from many threads."""

    name = SOURCE

    def __init__(self, engine_kwargs: dict[str, Any], launched_draft: Path | None, policy_version: int = 0) -> None:
        self.kwargs, self._launched = dict(engine_kwargs), launched_draft
        spec = self.kwargs.get("speculative_config") or {}
        self.lookahead = int(spec.get("num_speculative_tokens", 0))
        self.version = policy_version
        self.llm: Any = None
        self._queue: queue.Queue = queue.Queue()
        self._running: dict[str, _Request] = {}
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps, self.reload_ms = 0, 0.0

    # ---- engine ---------------------------------------------------------------------------------
    def start(self) -> str:
        with self._start_lock:
            if self.llm is None:
                from vllm import LLM

                t0 = time.perf_counter()
                self.llm = LLM(**self.kwargs)
                log.info("vLLM engine up in %.1f s (%s)", time.perf_counter() - t0, self.kwargs)
                self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
                self._thread.start()
            return "in-process"

    def _loop(self) -> None:
        engine = self.llm.llm_engine
        while not self._stop.is_set():
            busy = engine.has_unfinished_requests()
            try:
                item = self._queue.get_nowait() if busy else self._queue.get(timeout=0.05)
            except queue.Empty:
                item = None
            while item is not None:
                self._take(engine, item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if engine.has_unfinished_requests():
                try:
                    self._step(engine)
                except Exception as exc:  # the engine is unusable: fail every waiting request loudly
                    log.exception("vLLM engine step failed")
                    for req in self._running.values():
                        req.future.set_exception(exc)
                    self._running.clear()

    def _take(self, engine, item) -> None:
        if isinstance(item, _Call):
            try:
                item.future.set_result(item.fn())
            except Exception as exc:
                item.future.set_exception(exc)
            return
        try:
            engine.add_request(item.rid, {"prompt_token_ids": item.prompt}, item.sampling)
        except Exception as exc:  # a request vLLM refuses (too long, bad params) fails alone
            item.future.set_exception(exc)
            return
        self._running[item.rid] = item

    def _step(self, engine) -> None:
        outputs = engine.step()
        self.steps += 1
        for out in outputs:
            req = self._running.get(out.request_id)
            if req is None:
                continue
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            new = n - req.tokens
            if new > 0 and req.tokens > 0:  # the first token comes from the prefill, not a verify
                req.verify_steps += 1
                req.accepted += new - 1
            req.tokens = max(n, req.tokens)
            if out.finished:
                del self._running[out.request_id]
                req.future.set_result(self._result(req, out))

    def _result(self, req: _Request, out) -> GenerateResult:
        comp = out.outputs[0]
        ids = [int(t) for t in comp.token_ids]
        reason = FINISH_REASONS.get(str(comp.finish_reason), str(comp.finish_reason))
        return GenerateResult(
            request_id=req.rid, output_ids=ids, text=comp.text, finish_reason=reason,
            prompt_tokens=len(req.prompt), completion_tokens=len(ids), verify_steps=req.verify_steps,
            accepted_tokens=req.accepted, proposed_tokens=req.verify_steps * self.lookahead,
            weight_version=str(self.version), latency_s=time.perf_counter() - req.t0,
            meta_info={"spec_verify_ct": req.verify_steps, "spec_num_correct_drafts": req.accepted,
                       "completion_tokens": len(ids) - 1 if req.verify_steps else len(ids),
                       "weight_version": str(self.version)})

    def call_between_steps(self, fn: Callable[[], Any], timeout_s: float = 600.0) -> Any:
        """Run ``fn`` on the engine thread between two steps; returns its result (or raises its error)."""
        self.start()
        fut: Future = Future()
        self._queue.put(_Call(fn, fut))
        return fut.result(timeout=timeout_s)

    # ---- EngineBackend --------------------------------------------------------------------------
    def sampling(self, params: dict[str, Any]):
        from vllm import SamplingParams

        unknown = sorted(set(params) - set(SAMPLING_KEYS) - {"lookahead", "extra"})
        if unknown:
            raise ValueError(f"sampling parameter(s) {unknown} are not supported by the vLLM engine; "
                             f"valid: {list(SAMPLING_KEYS)}")
        if params.get("lookahead") is not None and params["lookahead"] != self.lookahead:
            raise ValueError(f"per-request lookahead={params['lookahead']} is not supported by the vLLM engine "
                             f"(num_speculative_tokens={self.lookahead} is fixed at start)")
        kw = {k: v for k, v in params.items() if k in SAMPLING_KEYS and v is not None}
        for key in ("stop", "stop_token_ids"):
            if key in kw:
                kw[key] = list(kw[key])
        kw.setdefault("temperature", 0.0)  # ours defaults to greedy, vLLM to 1.0
        kw.setdefault("max_tokens", 128)  # our SamplingParams default; vLLM's is 16
        if kw["max_tokens"] < 1:
            raise ValueError(f"max_tokens must be >= 1, got {kw['max_tokens']}")
        try:
            return SamplingParams(**kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"vLLM refused the sampling parameters {kw}: {exc}") from None

    def is_greedy(self, sampling) -> bool:
        return sampling.temperature == 0.0

    def generate(self, rid: str, prompt: list[int], sampling) -> GenerateResult:
        self.start()
        fut: Future = Future()
        self._queue.put(_Request(rid, list(prompt), sampling, fut))
        return fut.result()

    def load_draft(self, draft: Eagle3Draft, version: int, folder: Path) -> None:
        if not self.lookahead:
            raise ValueError("this vLLM replica serves without speculation (lookahead 0): no draft to swap")
        from aurora_rl.vllm_engine.rpc import reload_draft

        tensors = {n: t.contiguous() for n, t in to_eagle3_tensors(draft, include_embedding=False).items()
                   if n != "t2d"}  # vLLM ignores t2d

        def swap() -> None:
            t0 = time.perf_counter()
            self.llm.collective_rpc(reload_draft, args=(tensors,))
            self.reload_ms = (time.perf_counter() - t0) * 1000
            self.version = version  # requests finishing from here on were served by this draft

        self.call_between_steps(swap)

    def check_lookahead(self, lookahead: int | None) -> None:
        if lookahead != self.lookahead:
            raise ValueError(f"lookahead={lookahead}: this vLLM replica runs num_speculative_tokens="
                             f"{self.lookahead}; start another replica to compare lookaheads")

    def launched_draft(self) -> Path | None:
        return self._launched

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for req in self._running.values():
            req.future.cancel()
        self._running.clear()
        self.llm = None
