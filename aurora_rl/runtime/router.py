"""WorkerRouter: the HTTP front's backend over the Ray rollout workers, which may die and come back.

- Each request goes to the live worker with the fewest requests in flight from this router, as a Ray
  streaming call (``RolloutWorker.generate``); token deltas come back as they are made.
- A worker that fails a call is taken out of the rotation; a watcher pings every worker every
  ``watch_s`` and puts a restarted one (Ray restarts it, ``max_restarts=-1``) back within seconds.
- A request that has sent no token to its client (every non-streaming request, and a stream before
  its first token) is retried on a live worker when its worker dies. A stream cut after tokens went
  out ends with a retryable error (``RETRYABLE_PREFIX``) that says so. With no worker alive for
  ``retry_wait_s``, a request gets a retryable error too (the front answers 503). Every retry, cut
  stream and unavailable answer is counted (``/health``, TensorBoard ``serve/``); none vanishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from aurora_rl.engine.engine import PromptTooLongError
from aurora_rl.engine.sampling import SamplingParams
from aurora_rl.engine.sequence import RequestOutput, Status
from aurora_rl.serving.backend import RETRYABLE_PREFIX, DeltaFn

log = logging.getLogger(__name__)
_WORKER_GONE = (RayActorError, ActorUnavailableError, GetTimeoutError)
ACCEPT_TIMEOUT_S = 120.0


class _NoWorker(Exception):
    """No rollout worker answered within the wait."""


def error_output(request_id: str, prompt: list[int], message: str) -> RequestOutput:
    """A request finished with a retryable error (no worker could serve it)."""
    return RequestOutput(request_id, list(prompt), [], None, Status.ERROR, "error", len(prompt), 0, 0.0, 0.0, 0.0,
                         0, 0, 0, error=RETRYABLE_PREFIX + message)


class WorkerRouter:
    def __init__(self, workers: list[Any], max_len: int, has_tokenizer: bool, retry_wait_s: float = 30.0,
                 watch_s: float = 1.0, extra_health: Callable[[], dict] | None = None,
                 per_worker_limit: int = 24) -> None:
        self.workers, self.max_len, self.has_tokenizer = workers, max_len, has_tokenizer
        self.retry_wait_s, self.watch_s, self.extra_health = retry_wait_s, watch_s, extra_health
        self.per_worker_limit = per_worker_limit
        """Streaming calls in flight per worker: below its ``max_concurrency``, so pings still get a thread."""
        self.alive = [True] * len(workers)
        self.load = [0] * len(workers)
        self.routed = [0] * len(workers)
        self.where: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self.counts: Counter = Counter()
        self.version: int | None = None
        """The newest draft version published (set by the serve supervisor)."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._watcher.join(5 * self.watch_s + 5)

    # ---- Backend --------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, request_id: str,
               on_delta: DeltaFn | None) -> Future:
        fut: Future = Future()
        try:
            call = self._start(request_id, prompt, params, on_delta is not None)
        except _NoWorker as exc:
            self.counts["unavailable"] += 1
            fut.set_result(error_output(request_id, prompt, str(exc)))
            return fut
        threading.Thread(target=self._pump, args=(call, request_id, prompt, params, on_delta, fut),
                         name=f"route-{request_id[-8:]}", daemon=True).start()
        return fut

    def abort(self, request_id: str) -> bool:
        index = self.where.get(request_id)
        if index is None:
            return False
        try:
            return bool(ray.get(self.workers[index].abort.remote(request_id), timeout=10))
        except _WORKER_GONE:
            return False

    def policy_version(self) -> int | None:
        return self.version

    def health(self) -> dict:
        with self._lock:
            alive, load, routed = list(self.alive), list(self.load), list(self.routed)
        extra = self.extra_health() if self.extra_health else {}
        degraded = list(extra.pop("degraded", []))
        if not all(alive):
            degraded.append(f"rollout workers down: {[i for i, a in enumerate(alive) if not a]}")
        ok = any(alive)
        status = "no rollout worker available" if not ok else ("degraded" if degraded else "ok")
        workers = [{"alive": a, "in_flight": n, "routed": r} for a, n, r in zip(alive, load, routed)]
        return {"ok": ok, "status": status, "degraded": degraded, "in_flight": sum(load),
                "policy_version": self.version, "workers": workers, "routing": dict(self.counts), **extra}

    # ---- routing --------------------------------------------------------------------------------
    def _pick(self, deadline: float) -> int:
        with self._lock:
            while True:
                live = [i for i, a in enumerate(self.alive) if a and self.load[i] < self.per_worker_limit]
                if live:
                    index = min(live, key=lambda i: self.load[i])
                    self.load[index] += 1
                    return index
                left = deadline - time.monotonic()
                if any(self.alive):  # all live workers are busy: wait for a free call, however long
                    left = self.watch_s
                elif left <= 0:
                    raise _NoWorker(f"no rollout worker came back within {self.retry_wait_s:.0f}s; retry the request")
                self._changed.wait(min(left, self.watch_s))

    def _release(self, index: int) -> None:
        with self._lock:
            self.load[index] -= 1
            self._changed.notify_all()

    def _mark_dead(self, index: int, exc: BaseException) -> None:
        with self._lock:
            if self.alive[index]:
                self.alive[index] = False
                self.counts["worker_failures"] += 1
                log.warning("rollout worker %d failed (%s): out of the rotation until it answers again",
                            index, type(exc).__name__)

    def _start(self, request_id: str, prompt: list[int], params: SamplingParams, stream: bool):
        """Open the streaming call on a live worker; refused input raises here (a 400 upstream)."""
        deadline = time.monotonic() + self.retry_wait_s
        while True:
            index = self._pick(deadline)
            gen = self.workers[index].generate.options(num_returns="streaming").remote(
                request_id, list(prompt), params, stream)
            try:
                first = ray.get(next(gen), timeout=ACCEPT_TIMEOUT_S)
            except _WORKER_GONE as exc:
                self._release(index)
                self._mark_dead(index, exc)
                continue
            if "error" in first:
                self._release(index)
                raise (PromptTooLongError if first["kind"] == "PromptTooLongError" else ValueError)(first["error"])
            self.where[request_id] = index
            self.counts["routed"] += 1
            self.routed[index] += 1
            return index, gen

    def _pump(self, call, request_id: str, prompt: list[int], params: SamplingParams, on_delta: DeltaFn | None,
              fut: Future) -> None:
        sent = 0
        while call is not None:
            index, gen = call
            try:
                out = self._drain(index, gen, request_id, on_delta)
                fut.set_result(out)
                call = None
            except _WORKER_GONE as exc:
                self._mark_dead(index, exc)
                sent = self._sent.pop(request_id, 0)
                call = None
                if sent:  # tokens reached the client: a retry would repeat them
                    self.counts["cut_streams"] += 1
                    fut.set_result(error_output(request_id, prompt, f"rollout worker {index} died after {sent} "
                                                "streamed tokens; the stream is cut: retry the request"))
                else:
                    self._release(index)
                    index = None
                    self.counts["retried"] += 1
                    log.info("request %s: its worker died before its first token; retrying on a live worker", request_id)
                    try:
                        call = self._start(request_id, prompt, params, on_delta is not None)
                    except (_NoWorker, ValueError) as err:
                        self.counts["unavailable"] += 1
                        fut.set_result(error_output(request_id, prompt, str(err)))
            except Exception as exc:  # noqa: BLE001 - answered to the caller as an engine error, then logged
                log.exception("routing request %s failed", request_id)
                call = None
                fut.set_result(RequestOutput(request_id, list(prompt), [], None, Status.ERROR, "error", len(prompt),
                                             0, 0.0, 0.0, 0.0, 0, 0, 0, error=f"{type(exc).__name__}: {exc}"))
            if call is None and index is not None:
                self._release(index)
        self.where.pop(request_id, None)
        self._sent.pop(request_id, None)

    def _drain(self, index: int, gen, request_id: str, on_delta: DeltaFn | None) -> RequestOutput:
        for ref in gen:
            item = ray.get(ref)
            if isinstance(item, RequestOutput):
                return item
            if on_delta is not None and item:
                self._sent[request_id] = self._sent.get(request_id, 0) + len(item)
                on_delta(item)
        raise RuntimeError(f"rollout worker {index} ended request {request_id} without an output")

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_s):
            for i, worker in enumerate(self.workers):
                try:
                    ray.get(worker.ping.remote(), timeout=30.0)
                    up = True
                except GetTimeoutError:  # busy, not dead: a dead actor fails at once
                    continue
                except (RayActorError, ActorUnavailableError):
                    up = False
                with self._lock:
                    if not up and self.alive[i]:
                        self.counts["worker_failures"] += 1
                        log.warning("rollout worker %d does not answer: out of the rotation", i)
                    if up and not self.alive[i]:
                        self.counts["worker_returns"] += 1
                        log.warning("rollout worker %d answers again: back in the rotation", i)
                    self.alive[i] = up
                    self._changed.notify_all()
