"""RolloutWorker (a Ray actor): one serving replica that records traces and hot-swaps draft weights.

It wraps an EngineLoop over an LLMEngine with a SpecDecoder. Requests arrive by ``submit`` (from the
driver's workload or the HTTP front, ``generate`` streams one request's tokens); finished ones are
collected by ``poll``. Newer draft weights are fetched from the WeightStore, validated and built in
the background (``aurora_rl.engine.hot_swap``; the fetcher is woken every ``weight_poll_steps`` steps)
and swapped in by reference at a step boundary without pausing the slots in flight; finished traces
go to the TraceBuffer as object refs.
When the buffer refuses traces (``block`` policy), the worker holds them and stops stepping until
they are taken: that is the backpressure. Requests whose id starts with ``eval-`` are served but not
recorded for learning.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import ray
import torch

from aurora_rl.config import EngineSection, ModelSection
from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.hot_swap import DraftSwapper
from aurora_rl.engine.sequence import RequestOutput, Status
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.engine.trace import Trace
from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.runtime.buffer import Entry
from aurora_rl.runtime.factory import load_target_model
from aurora_rl.serving.loop import EngineLoop

log = logging.getLogger(__name__)
MAX_HELD_TRACES = 64


def summarize(out: RequestOutput, worker: int, version: int) -> dict[str, Any]:
    """The small record the driver keeps per finished request."""
    return {
        "request_id": out.request_id, "worker": worker, "status": out.status.value,
        "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
        "output_tokens": out.num_output_tokens, "accept_length": out.accept_length,
        "tokens_per_s": out.tokens_per_s, "latency_s": out.latency_s, "verify_steps": out.verify_steps,
        "accepted_tokens": out.accepted_tokens, "draft_tokens": out.draft_tokens, "policy_version": version,
        "error": out.error, "t": time.time(),
    }


class RolloutWorker:
    def __init__(self, index: int, model: ModelSection, engine: EngineSection, draft_config: DraftConfig,
                 initial: tuple[int, list], buffer: Any, weight_store: Any, seed: int = 0,
                 threads: int = 1) -> None:
        torch.set_num_threads(max(1, engine.threads or threads))
        self.index, self.cfg, self.buffer, self.store = index, engine, buffer, weight_store
        target, self.tokenizer = load_target_model(model, seed)
        version, (state_ref,) = initial
        draft = Eagle3Draft(draft_config)
        draft.load_state_dict(ray.get(state_ref))
        draft.to_dtype(target.dtype)
        self.decoder = SpecDecoder(draft, engine.num_slots, engine.max_len,
                                   SpecConfig(lookahead=engine.lookahead, capture_traces=engine.capture_traces,
                                              trace_dtype=engine.trace_dtype,
                                              context_copy=engine.context_copy is not False,
                                              traffic_copy=engine.traffic_copy, traffic_window=engine.traffic_window,
                                              tree_topk=engine.tree_topk, tree_budget=engine.tree_budget,
                                              tree_depth=engine.tree_depth),
                                   trace_sink=self._on_trace, policy_version=version)
        if engine.adaptive_lookahead and engine.tree_topk > 0:
            from aurora_rl.engine.adaptive_tree import AdaptiveTreeBudget, quarter_budgets

            AdaptiveTreeBudget(quarter_budgets(engine.tree_budget)).attach(self.decoder)
        elif engine.adaptive_lookahead:
            from aurora_rl.engine.adaptive import AdaptiveLookahead

            AdaptiveLookahead(engine.lookahead).attach(self.decoder)
        self.engine = LLMEngine(target, EngineConfig(engine.num_slots, engine.max_len, engine.deterministic),
                                self.tokenizer, self.decoder)
        self._lock = threading.Lock()
        self._trace_lock = threading.Lock()
        self._held: list[Trace] = []
        self._done: list[dict] = []
        self._steps = 0
        self.blocked_s, self.traces_sent = 0.0, 0
        self.swapper = DraftSwapper(self.decoder, self._fetch_weights).start()
        self.loop = EngineLoop(self.engine, before_step=self._before_step).start()

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, requests: list[tuple[str, list[int], dict]]) -> list[str]:
        """Queue requests; returns the ids refused as invalid (answered as errors by ``poll``)."""
        refused = []
        for rid, prompt, params in requests:
            try:
                fut = self.loop.submit(prompt, SamplingParams(**params), request_id=rid)
            except ValueError as exc:
                refused.append(rid)
                with self._lock:
                    self._done.append({"request_id": rid, "worker": self.index, "status": "error",
                                       "finish_reason": "error", "error": str(exc), "t": time.time()})
                continue
            fut.add_done_callback(self._finished)
        return refused

    def generate(self, request_id: str, prompt: list[int], params: SamplingParams, stream: bool):
        """Serve one request as a Ray streaming generator: first ``{"accepted": True}`` (or ``{"error":
        message, "kind": exception name}`` for a request the engine refuses), then, when ``stream``, a list
        of new token ids per step, and last its RequestOutput."""
        deltas: queue.Queue = queue.Queue()
        try:
            fut = self.loop.submit(prompt, params, request_id=request_id, on_delta=deltas.put if stream else None)
        except ValueError as exc:
            yield {"error": str(exc), "kind": type(exc).__name__}
            return
        fut.add_done_callback(lambda _: deltas.put(None))  # after the loop delivered the last delta
        yield {"accepted": True}
        while (ids := deltas.get()) is not None:
            yield ids
        yield fut.result()

    def abort(self, request_id: str) -> bool:
        return self.loop.abort(request_id)

    def _finished(self, fut) -> None:
        out: RequestOutput = fut.result()
        with self._lock:
            self._done.append(summarize(out, self.index, self.decoder.policy_version))

    def poll(self) -> dict[str, Any]:
        self._flush_traces()  # an idle engine takes no steps, so its last traces leave from here
        with self._lock:
            done, self._done = self._done, []
        return {"outputs": done, "stats": self.stats()}

    def stats(self) -> dict[str, float]:
        sw = self.swapper.stats
        s = {"system/worker_version": float(self.decoder.policy_version), "system/swaps": float(sw.swaps),
             "system/swap_latency_ms": sw.stall_ms, "system/swap_stall_max_ms": sw.max_stall_ms,
             "system/swap_build_ms": sw.build_ms, "system/swaps_refused": float(sw.refused),
             "system/swap_fetch_errors": float(sw.fetch_errors), "system/backpressure_s": self.blocked_s,
             "system/engine_steps": float(self.loop.steps), "system/in_flight": float(self.loop.in_flight()),
             "system/traces_sent": float(self.traces_sent), "system/traces_held": float(len(self._held))}
        for j, (p, a) in enumerate(zip(self.decoder.depth_proposed, self.decoder.depth_accepted), start=1):
            s[f"spec/proposed_depth_{j}"] = float(p)
            s[f"spec/accepted_depth_{j}"] = float(a)
        return s

    def ping(self) -> int:
        return self.index

    def pid(self) -> int:
        """This worker's process id (fault-injection tests kill it)."""
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # ---- step boundary: weights in, traces out --------------------------------------------------
    def _before_step(self) -> None:
        self._steps += 1
        if self._steps % self.cfg.weight_poll_steps == 0:
            self.swapper.wake()
        self.swapper.apply()
        self._flush_traces()
        while len(self._held) >= MAX_HELD_TRACES:
            t0 = time.perf_counter()
            time.sleep(0.05)
            self._flush_traces()
            self.blocked_s += time.perf_counter() - t0

    def _fetch_weights(self, version: int) -> tuple[int, dict] | None:
        """The swapper's ``fetch``: the store's newest weights above ``version`` (runs in its thread)."""
        newer = ray.get(self.store.get_if_newer.remote(version), timeout=60)
        if newer is None:
            return None
        newest, (ref,) = newer
        return newest, ray.get(ref, timeout=120)

    def _on_trace(self, trace: Trace) -> None:
        if trace.request_id.startswith("eval-") or trace.status.value != "finished":
            return
        with self._trace_lock:
            self._held.append(trace)

    def _flush_traces(self) -> None:
        with self._trace_lock:
            if not self._held:
                return
            # This worker owns the objects: a crash loses the traces not yet trained on (the learner counts
            # and skips them: learner info ``lost_traces``). Ray 2.56 removed ``ray.put(_owner=...)``.
            entries = [Entry([ray.put(t)], t.nbytes(),
                             int(t.policy_version.max()) if t.verify_steps else self.decoder.policy_version,
                             t.request_id) for t in self._held]
            taken = ray.get(self.buffer.put.remote(entries))
            self.traces_sent += taken
            self._held = self._held[taken:]

    # ---- evaluation ----------------------------------------------------------
    def evaluate(self, prompts: list[list[int]], params: dict, lookahead: int | None, batch_size: int) -> list[dict]:
        """Serve ``prompts`` ``batch_size`` at a time with the given lookahead (None: adaptive, over
        0..``engine.lookahead``, with a fresh controller unless the worker already runs one); no traces
        are kept."""
        from aurora_rl.engine.adaptive import AdaptiveLookahead

        controller = None
        if lookahead is None and self.decoder.lookahead_fn is None:
            controller = AdaptiveLookahead(self.cfg.lookahead).attach(self.decoder)
        tag = "adaptive" if lookahead is None else lookahead
        results = []
        try:
            for i in range(0, len(prompts), batch_size):
                futs = [self.loop.submit(p, SamplingParams(**params, lookahead=lookahead), request_id=f"eval-{tag}-{i + j}")
                        for j, p in enumerate(prompts[i:i + batch_size])]
                results += [summarize(f.result(), self.index, self.decoder.policy_version) for f in futs]
        finally:
            if controller is not None:
                controller.detach(self.decoder)
        return results

    def shutdown(self) -> None:
        self.swapper.stop()
        self.loop.stop()
        for seq in list(self.engine.scheduler.running.values()):
            if seq.status is Status.RUNNING:
                self.engine.abort(seq.request_id)
