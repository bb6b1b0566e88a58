"""ExternalRollout: the rollout-worker surface over an existing serving engine (SGLang, vLLM).

Everything that does not depend on which engine serves lives here, so that every engine runs the
same code: requests go to the engine from a thread pool (one blocking ``backend.generate`` per
request; the engine batches them), each finished request becomes a Trace by one prefill through our
copy of the target (``sglang.recompute.recompute_trace``: stock engines return neither the tapped
hidden states nor the per-step proposals), traces go to a sink or the TraceBuffer, and ``swap_draft``
exports the draft in the EAGLE3 layout and hands it to ``backend.load_draft`` (the engine's own way
of replacing draft weights while it serves). Counters are reported under ``<backend.name>/...``.

A backend (``EngineBackend``) knows one engine: how to start or attach to it, translate sampling
parameters, serve one request, and load new draft weights. ``aurora_rl.sglang.engine.SGLangBackend``
talks HTTP to an SGLang server; ``aurora_rl.vllm_engine.backend.VLLMBackend`` drives vLLM in process.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.models.eagle3_io import save_eagle3
from aurora_rl.sglang.client import GenerateResult
from aurora_rl.sglang.recompute import RecomputedTrace, parse_policy_version, recompute_trace

log = logging.getLogger(__name__)
MAX_HELD_TRACES = 256
KEEP_EXPORTS = 2
"""Exported draft folders kept on disk per replica (plus the launch one)."""


class EngineBackend(Protocol):
    """One external serving engine, as ``ExternalRollout`` uses it."""

    name: str
    """``sglang`` or ``vllm``: the metric prefix and the ``source`` of its request records."""

    def start(self) -> str:
        """Start or attach (idempotent); returns where it serves (a URL or ``in-process``)."""

    def sampling(self, params: dict[str, Any]) -> Any:
        """Our SamplingParams fields as the engine takes them; ValueError naming a bad key or value."""

    def is_greedy(self, sampling: Any) -> bool: ...

    def generate(self, rid: str, prompt: list[int], sampling: Any) -> GenerateResult:
        """Serve one request to completion (blocking; called from many threads at once)."""

    def load_draft(self, draft: Eagle3Draft, version: int, folder: Path) -> None:
        """Replace the serving draft's weights by ``draft`` (also exported at ``folder``), tagged ``version``."""

    def check_lookahead(self, lookahead: int | None) -> None:
        """ValueError unless the engine can serve with ``lookahead`` draft tokens per step."""

    def launched_draft(self) -> Path | None:
        """The draft folder the engine was started with (kept on disk: a restart loads it)."""

    def close(self) -> None: ...


@dataclass
class SwapResult:
    version: int
    folder: Path
    seconds: float


def summarize_result(res: GenerateResult, worker: int, version: int, prompt_tokens: int, wall_s: float,
                     source: str) -> dict:
    """The driver's per-request record (the keys ``runtime.rollout.summarize`` writes, plus ``source``)."""
    latency = res.latency_s if res.latency_s is not None else wall_s
    return {
        "request_id": res.request_id, "worker": worker, "status": "aborted" if res.finish_reason == "abort" else "finished",
        "finish_reason": res.finish_reason, "prompt_tokens": prompt_tokens, "output_tokens": len(res.output_ids),
        "accept_length": res.accept_length, "tokens_per_s": len(res.output_ids) / max(latency, 1e-9),
        "latency_s": latency, "verify_steps": res.verify_steps, "accepted_tokens": res.accepted_tokens,
        "draft_tokens": res.proposed_tokens, "policy_version": version, "weight_version": res.weight_version,
        "error": None, "t": time.time(), "source": source,
    }


class ExternalRollout:
    def __init__(self, index: int, target: Any, draft_config: DraftConfig, backend: EngineBackend,
                 initial_version: int = 0, *, export_dir: str | Path = "drafts",
                 trace_sink: Callable[[RecomputedTrace], None] | None = None, buffer: Any = None,
                 capture_traces: bool = True, trace_dtype: torch.dtype = torch.bfloat16,
                 max_concurrency: int = 8) -> None:
        self.index, self.target, self.draft_config, self.backend = index, target, draft_config, backend
        self.source = backend.name
        self.policy_version = initial_version
        self.export_dir, self.trace_sink, self.buffer = Path(export_dir), trace_sink, buffer
        self.capture_traces, self.trace_dtype = capture_traces, trace_dtype
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=f"{self.source}-{index}")
        self._lock, self._target_lock = threading.Lock(), threading.Lock()
        self._flush_lock = threading.Lock()  # two flushes at once would send the same traces twice
        self._done: list[dict] = []
        self._held: list[RecomputedTrace] = []
        self._in_flight = 0
        self.swaps, self.swap_ms, self.traces_sent, self.traces_dropped = 0, 0.0, 0, 0
        self.engine_traces, self.requests_failed, self.recompute_s = 0, 0, 0.0
        self.sum_verify, self.sum_accepted, self.sum_completion = 0, 0, 0

    def start(self) -> str:
        return self.backend.start()

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, requests: list[tuple[str, list[int], dict]]) -> list[str]:
        """Queue requests; returns the ids refused as invalid (answered as errors by ``poll``)."""
        self.start()
        refused = []
        for rid, prompt, params in requests:
            try:
                sampling = self.backend.sampling(dict(params))
                if not prompt:
                    raise ValueError("empty prompt")
            except ValueError as exc:
                refused.append(rid)
                self._record_error(rid, exc)
                continue
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._serve, rid, list(prompt), sampling)
        return refused

    def _serve(self, rid: str, prompt: list[int], sampling: Any) -> dict | None:
        t0 = time.perf_counter()
        try:
            res = self.backend.generate(rid, prompt, sampling)
            version = parse_policy_version(res.weight_version, self.policy_version)
            summary = summarize_result(res, self.index, version, len(prompt), time.perf_counter() - t0, self.source)
            with self._lock:
                self.sum_verify += res.verify_steps
                self.sum_accepted += res.accepted_tokens
                self.sum_completion += res.completion_tokens if res.verify_steps else 0
            if self.capture_traces and not rid.startswith("eval-") and summary["status"] == "finished" and res.output_ids:
                self._record_trace(rid, prompt, res, sampling)
        except Exception as exc:  # reported per request in poll(), and counted; the worker keeps serving
            log.exception("%s request %s failed", self.source, rid)
            self._record_error(rid, exc)
            return None
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            self._done.append(summary)
        return summary

    def _record_trace(self, rid: str, prompt: list[int], res: GenerateResult, sampling: Any) -> None:
        greedy = self.backend.is_greedy(sampling)
        # Backends hold sampling as a dict (SGLang) or a params object (vLLM); both name the fields alike.
        field = sampling.get if isinstance(sampling, dict) else lambda k, d: getattr(sampling, k, d)
        temperature = None if greedy else float(field("temperature", 1.0))
        top_p, top_k = float(field("top_p", 1.0) or 1.0), max(int(field("top_k", 0) or 0), 0)
        t0 = time.perf_counter()
        with self._target_lock:  # one prefill at a time through the shared target
            rt = recompute_trace(self.target, prompt, res.output_ids, res.meta_info, self.policy_version,
                                 self.trace_dtype, request_id=rid, greedy=greedy, finish_reason=res.finish_reason,
                                 temperature=temperature, top_p=top_p, top_k=top_k)
        rt.source = self.source
        with self._lock:
            self.recompute_s += time.perf_counter() - t0
            self.engine_traces += 1
            if self.trace_sink is not None:
                self.trace_sink(rt)
                self.traces_sent += 1
            elif len(self._held) < MAX_HELD_TRACES:
                self._held.append(rt)
            else:
                self.traces_dropped += 1

    def _record_error(self, rid: str, exc: Exception) -> None:
        with self._lock:
            self.requests_failed += 1
            self._done.append({"request_id": rid, "worker": self.index, "status": "error", "finish_reason": "error",
                               "error": f"{type(exc).__name__}: {exc}", "t": time.time(), "source": self.source})

    def poll(self) -> dict[str, Any]:
        self.flush_traces()
        with self._lock:
            done, self._done = self._done, []
        return {"outputs": done, "stats": self.stats()}

    def take_traces(self) -> list[RecomputedTrace]:
        """Traces held because no sink or buffer was given."""
        with self._lock:
            held, self._held = self._held, []
        return held

    def flush_traces(self) -> None:
        """Ship held traces to ``buffer`` (a TraceBuffer actor); those it refuses stay held."""
        if self.buffer is None:
            return
        import ray  # only when wired into the Ray runtime

        from aurora_rl.runtime.buffer import Entry

        with self._flush_lock:
            with self._lock:
                held = list(self._held)
            if not held:
                return
            entries = [Entry([ray.put(rt.trace)], rt.trace.nbytes(), rt.counters.policy_version, rt.trace.request_id)
                       for rt in held]
            taken = ray.get(self.buffer.put.remote(entries))
            with self._lock:
                self.traces_sent += taken
                self._held = self._held[taken:]

    def stats(self) -> dict[str, float]:
        p = self.source
        with self._lock:
            return {
                "system/worker_version": float(self.policy_version), "system/swaps": float(self.swaps),
                "system/swap_latency_ms": self.swap_ms, "system/in_flight": float(self._in_flight),
                "system/traces_sent": float(self.traces_sent), "system/traces_held": float(len(self._held)),
                "system/traces_dropped": float(self.traces_dropped),
                # these traces carry no verify steps: the proposal-based loss terms skip them
                f"{p}/traces": float(self.engine_traces), f"{p}/zero_step_traces": float(self.engine_traces),
                f"{p}/requests_failed": float(self.requests_failed),
                f"{p}/recompute_ms_mean": 1000 * self.recompute_s / max(self.engine_traces, 1),
                f"{p}/verify_steps": float(self.sum_verify), f"{p}/accepted_tokens": float(self.sum_accepted),
                f"{p}/accept_length": self.sum_completion / self.sum_verify if self.sum_verify else 1.0,
            }

    def ping(self) -> int:
        return self.index

    def evaluate(self, prompts: list[list[int]], params: dict, lookahead: int, batch_size: int) -> list[dict]:
        """Serve ``prompts`` ``batch_size`` at a time; no traces. The lookahead is an engine argument
        here, so it must match the running engine's (``backend.check_lookahead``)."""
        self.backend.check_lookahead(lookahead)
        self.start()
        sampling = self.backend.sampling(dict(params))
        results = []
        for i in range(0, len(prompts), batch_size):
            futs: list[Future] = []
            for j, p in enumerate(prompts[i:i + batch_size]):
                with self._lock:
                    self._in_flight += 1
                futs.append(self._pool.submit(self._serve, f"eval-{lookahead}-{i + j}", list(p), sampling))
            results += [f.result() for f in futs]
        with self._lock:  # eval summaries are returned here, not again by poll()
            ids = {r["request_id"] for r in results if r is not None}
            self._done = [d for d in self._done if d["request_id"] not in ids]
        return [r for r in results if r is not None]

    # ---- draft hot swap -------------------------------------------------------------------------
    def swap_draft(self, state_dict: dict[str, torch.Tensor], version: int,
                   export_dir: str | Path | None = None) -> SwapResult:
        """Export ``state_dict`` as an EAGLE3 folder and load it into the engine's draft, no restart."""
        t0 = time.perf_counter()
        draft = Eagle3Draft(self.draft_config)
        draft.load_state_dict(state_dict)
        folder = save_eagle3(draft, Path(export_dir or self.export_dir) / f"draft-v{version:06d}",
                             extra={"policy_version": version})
        self.start()
        self.backend.load_draft(draft, version, folder)
        seconds = time.perf_counter() - t0
        with self._lock:
            self.policy_version, self.swaps, self.swap_ms = version, self.swaps + 1, seconds * 1000
        log.info("worker %d: draft v%d swapped into %s in %.2f s (%s)", self.index, version, self.source, seconds, folder)
        self._prune_exports(folder.parent)
        return SwapResult(version, folder, seconds)

    def _prune_exports(self, folder: Path) -> None:
        """Delete exported draft folders but the newest ``KEEP_EXPORTS`` and the one the engine was
        launched with (a restart loads that one): a long run swaps thousands of times."""
        launched = self.backend.launched_draft()
        launched = launched.resolve() if launched is not None else None
        for old in sorted(folder.glob("draft-v*"))[:-KEEP_EXPORTS]:
            if old.resolve() != launched:
                shutil.rmtree(old, ignore_errors=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.backend.close()
