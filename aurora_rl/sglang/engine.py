"""SGLangRollout: a rollout worker whose serving engine is an SGLang server with EAGLE3 and our draft.

Same surface as ``aurora_rl.runtime.rollout.RolloutWorker`` where the driver touches it: ``submit``
(queue ``(request_id, prompt_ids, sampling_params)``, returns the refused ids), ``poll`` (finished request
summaries plus ``stats``), ``stats``, ``ping``, ``evaluate``, ``shutdown``. The server is started lazily
on the first request from a ``SGLangServerConfig`` (``python -m sglang.launch_server``) or attached to by
URL. Requests go over HTTP from a thread pool (SGLang batches them); each finished request becomes a
Trace by one prefill through our target (``recompute.recompute_trace``), with no logged verify steps and
SGLang's counters beside it. ``swap_draft`` exports the draft in the EAGLE3 layout (a restart or another
replica can load that folder) and loads the same tensors into the running server's draft only
(``/update_weights_from_tensor`` with ``selector: "draft"``), tagging ``weight_version`` with the policy
version, without a restart. Nothing here imports sglang.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.models.eagle3_io import save_eagle3, to_eagle3_tensors
from aurora_rl.sglang.args import SGLangServerConfig, build_launch_command
from aurora_rl.sglang.client import GenerateResult, SGLangClient, to_sampling_params
from aurora_rl.sglang.recompute import SOURCE, RecomputedTrace, parse_policy_version, recompute_trace

log = logging.getLogger(__name__)
MAX_HELD_TRACES = 256
KEEP_EXPORTS = 2
"""Exported draft folders kept on disk per replica (plus the launch one)."""


@dataclass
class SwapResult:
    version: int
    folder: Path
    seconds: float


def summarize_result(res: GenerateResult, worker: int, version: int, prompt_tokens: int, wall_s: float) -> dict:
    """The driver's per-request record (the keys ``runtime.rollout.summarize`` writes, plus ``source``)."""
    latency = res.latency_s if res.latency_s is not None else wall_s
    return {
        "request_id": res.request_id, "worker": worker, "status": "aborted" if res.finish_reason == "abort" else "finished",
        "finish_reason": res.finish_reason, "prompt_tokens": prompt_tokens, "output_tokens": len(res.output_ids),
        "accept_length": res.accept_length, "tokens_per_s": len(res.output_ids) / max(latency, 1e-9),
        "latency_s": latency, "verify_steps": res.verify_steps, "accepted_tokens": res.accepted_tokens,
        "draft_tokens": res.proposed_tokens, "policy_version": version, "weight_version": res.weight_version,
        "error": None, "t": time.time(), "source": SOURCE,
    }


class SGLangRollout:
    def __init__(self, index: int, target: Any, draft_config: DraftConfig, initial_version: int = 0, *,
                 server: SGLangServerConfig | None = None, url: str | None = None,
                 export_dir: str | Path = "sglang_drafts", trace_sink: Callable[[RecomputedTrace], None] | None = None,
                 buffer: Any = None, capture_traces: bool = True, trace_dtype: torch.dtype = torch.bfloat16,
                 weight_dtype: torch.dtype = torch.bfloat16, max_concurrency: int = 8,
                 startup_timeout_s: float = 1800.0, api_key: str | None = None, tp_size: int | None = None) -> None:
        if (server is None) == (url is None):
            raise ValueError("SGLangRollout needs exactly one of server= (launch a server) or url= (attach to one)")
        self.index, self.target, self.draft_config, self.server = index, target, draft_config, server
        self.policy_version = initial_version
        self.export_dir, self.trace_sink, self.buffer = Path(export_dir), trace_sink, buffer
        self.capture_traces, self.trace_dtype, self.weight_dtype = capture_traces, trace_dtype, weight_dtype
        self.tp_size = tp_size or (server.tp_size if server is not None else 1)
        self.startup_timeout_s = startup_timeout_s
        self.client = SGLangClient(url or server.url, api_key=api_key)
        self._attach = url is not None
        self._proc: subprocess.Popen | None = None
        self._started = False
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=f"sglang-{index}")
        self._lock, self._target_lock, self._start_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._flush_lock = threading.Lock()  # two flushes at once would send the same traces twice
        self._done: list[dict] = []
        self._held: list[RecomputedTrace] = []
        self._in_flight = 0
        self.swaps, self.swap_ms, self.traces_sent, self.traces_dropped = 0, 0.0, 0, 0
        self.sglang_traces, self.requests_failed, self.recompute_s = 0, 0, 0.0
        self.sum_verify, self.sum_accepted, self.sum_completion = 0, 0, 0
        self._d2t: torch.Tensor | None = None

    # ---- the server -----------------------------------------------------------------------------
    def start(self) -> str:
        """Launch (or check) the server; returns its URL. Idempotent."""
        with self._start_lock:
            if self._started:
                return self.client.base_url
            if self._attach:
                self.client.wait_healthy(min(self.startup_timeout_s, 60.0))
            else:
                cmd = build_launch_command(self.server)
                self.export_dir.mkdir(parents=True, exist_ok=True)
                log_path = self.export_dir / f"sglang-server-{self.index}.log"
                log.info("launching SGLang (log %s): %s", log_path, " ".join(cmd))
                with open(log_path, "ab") as log_file:
                    self._proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
                self.client.wait_healthy(self.startup_timeout_s, alive=lambda: self._proc.poll() is None)
            self._started = True
            return self.client.base_url

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, requests: list[tuple[str, list[int], dict]]) -> list[str]:
        """Queue requests; returns the ids refused as invalid (answered as errors by ``poll``)."""
        self.start()
        refused = []
        for rid, prompt, params in requests:
            try:
                sampling = to_sampling_params(dict(params))
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

    def _serve(self, rid: str, prompt: list[int], sampling: dict) -> dict | None:
        t0 = time.perf_counter()
        try:
            res = self.client.generate(prompt, sampling, rid=rid)
            version = parse_policy_version(res.weight_version, self.policy_version)
            summary = summarize_result(res, self.index, version, len(prompt), time.perf_counter() - t0)
            with self._lock:
                self.sum_verify += res.verify_steps
                self.sum_accepted += res.accepted_tokens
                self.sum_completion += res.completion_tokens if res.verify_steps else 0
            if self.capture_traces and not rid.startswith("eval-") and summary["status"] == "finished" and res.output_ids:
                self._record_trace(rid, prompt, res, sampling)
        except Exception as exc:  # reported per request in poll(), and counted; the worker keeps serving
            log.exception("SGLang request %s failed", rid)
            self._record_error(rid, exc)
            return None
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            self._done.append(summary)
        return summary

    def _record_trace(self, rid: str, prompt: list[int], res: GenerateResult, sampling: dict) -> None:
        greedy = sampling.get("temperature", 0.0) == 0.0
        t0 = time.perf_counter()
        with self._target_lock:  # one prefill at a time through the shared target
            rt = recompute_trace(self.target, prompt, res.output_ids, res.meta_info, self.policy_version,
                                 self.trace_dtype, request_id=rid, greedy=greedy, finish_reason=res.finish_reason,
                                 temperature=sampling.get("temperature"), top_p=sampling.get("top_p", 1.0),
                                 top_k=sampling.get("top_k", 0))
        with self._lock:
            self.recompute_s += time.perf_counter() - t0
            self.sglang_traces += 1
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
                               "error": f"{type(exc).__name__}: {exc}", "t": time.time(), "source": SOURCE})

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
        with self._lock:
            return {
                "system/worker_version": float(self.policy_version), "system/swaps": float(self.swaps),
                "system/swap_latency_ms": self.swap_ms, "system/in_flight": float(self._in_flight),
                "system/traces_sent": float(self.traces_sent), "system/traces_held": float(len(self._held)),
                "system/traces_dropped": float(self.traces_dropped),
                # these traces carry no verify steps: the proposal-based loss terms skip them
                "sglang/traces": float(self.sglang_traces), "sglang/zero_step_traces": float(self.sglang_traces),
                "sglang/requests_failed": float(self.requests_failed),
                "sglang/recompute_ms_mean": 1000 * self.recompute_s / max(self.sglang_traces, 1),
                "sglang/verify_steps": float(self.sum_verify), "sglang/accepted_tokens": float(self.sum_accepted),
                "sglang/accept_length": self.sum_completion / self.sum_verify if self.sum_verify else 1.0,
            }

    def ping(self) -> int:
        return self.index

    def evaluate(self, prompts: list[list[int]], params: dict, lookahead: int, batch_size: int) -> list[dict]:
        """Serve ``prompts`` ``batch_size`` at a time; no traces. The lookahead is a server argument
        here, so it must match the running server's ``speculative_num_steps``."""
        if self.server is not None and lookahead != self.server.speculative_num_steps:
            raise ValueError(f"lookahead={lookahead}: this SGLang replica runs speculative_num_steps="
                             f"{self.server.speculative_num_steps}; start another replica to compare lookaheads")
        self.start()
        sampling = to_sampling_params(dict(params))
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
        """Export ``state_dict`` as an EAGLE3 folder and load it into the server's draft, no restart."""
        t0 = time.perf_counter()
        draft = Eagle3Draft(self.draft_config)
        draft.load_state_dict(state_dict)
        folder = save_eagle3(draft, Path(export_dir or self.export_dir) / f"draft-v{version:06d}",
                             extra={"policy_version": version})
        exported = to_eagle3_tensors(draft, include_embedding=False)
        # The vocabulary map cannot be hot-swapped: sglang 0.5.22's eagle worker copies hot_token_id
        # (from d2t) at start, and its load_weights adds a CPU arange to d2t, which fails for the
        # GPU tensors the tensor path hands it. So d2t/t2d stay out and must not change.
        d2t = exported.pop("d2t")
        exported.pop("t2d")
        if self._d2t is not None and not torch.equal(self._d2t, d2t):
            raise ValueError(f"draft v{version} has a different draft vocabulary than the one this SGLang replica "
                             f"serves; restart the replica with --speculative-draft-model-path {folder}")
        self._d2t = d2t
        # the target's embedding is already in the server; the rest goes in the server's dtype
        tensors = [(n, t.to(self.weight_dtype)) for n, t in exported.items()]
        self.start()
        self.client.update_draft_from_tensors(tensors, version, tp_size=self.tp_size)
        seconds = time.perf_counter() - t0
        with self._lock:
            self.policy_version, self.swaps, self.swap_ms = version, self.swaps + 1, seconds * 1000
        log.info("worker %d: draft v%d swapped into SGLang in %.2f s (%s)", self.index, version, seconds, folder)
        self._prune_exports(folder.parent)
        return SwapResult(version, folder, seconds)

    def _prune_exports(self, folder: Path) -> None:
        """Delete exported draft folders but the newest ``KEEP_EXPORTS`` and the one the server was
        launched with (a restart of the server loads that one): a long run swaps thousands of times."""
        launched = Path(self.server.draft_path).resolve() if self.server is not None else None
        exports = sorted(folder.glob("draft-v*"))
        for old in exports[:-KEEP_EXPORTS]:
            if old.resolve() != launched:
                shutil.rmtree(old, ignore_errors=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
