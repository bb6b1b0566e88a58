"""EngineLoop: an LLMEngine stepped in a background thread, fed from any thread.

``submit`` validates a request at once (bad input raises there), queues it, and returns a Future for
its RequestOutput; ``on_delta`` (optional) is called from the loop thread with each step's new token
ids, for streaming. ``before_step`` runs at every step boundary: that is where newer draft weights
are swapped in. If a step raises, every request in flight is answered with an error output and the
loop goes on: no request vanishes.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from aurora_rl.engine.engine import LLMEngine
from aurora_rl.engine.sampling import SamplingParams
from aurora_rl.engine.sequence import RequestOutput, Sequence, Status

log = logging.getLogger(__name__)

DeltaFn = Callable[[list[int]], None]


@dataclass
class _Pending:
    future: Future
    on_delta: DeltaFn | None
    sent: int = 0


class EngineLoop:
    def __init__(self, engine: LLMEngine, before_step: Callable[[], None] | None = None,
                 idle_wait_s: float = 0.005) -> None:
        self.engine = engine
        self.before_step = before_step
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.errors = 0
        self.hook_errors = 0

    def start(self) -> "EngineLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping; requests still pending are answered with an error, never left hanging."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            outs = self._fail_all(RuntimeError("engine loop stopped"))
            pending = [(self._pending.pop(o.request_id, None), o) for o in outs]
        for p, out in pending:
            if p is not None and not p.future.done():
                p.future.set_result(out)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: list[int] | str, params: SamplingParams | None = None,
               request_id: str | None = None, on_delta: DeltaFn | None = None) -> Future:
        fut: Future = Future()
        with self._lock:
            rid = self.engine.add_request(prompt, params, request_id)  # raises on bad input
            self._pending[rid] = _Pending(fut, on_delta)
        fut.request_id = rid  # type: ignore[attr-defined]
        self._wake.set()
        return fut

    def abort(self, request_id: str) -> bool:
        with self._lock:
            out = self.engine.abort(request_id)
            pending = self._pending.pop(request_id, None)
        if pending is not None and out is not None:
            pending.future.set_result(out)
        return out is not None

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            if self.before_step is not None:
                try:
                    self.before_step()
                except Exception:  # noqa: BLE001 - a failed weight pull must not stop serving
                    self.hook_errors += 1
                    log.exception("before_step hook failed; serving goes on with the current draft")
            with self._lock:
                try:
                    finished = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - answered to every caller below, then logged
                    log.exception("engine step failed; failing the requests in flight")
                    finished = self._fail_all(exc)
                self.steps += 1
                deltas = self._collect_deltas()
                done = [(self._pending.pop(o.request_id, None), o) for o in finished]
            for pending, ids in deltas:
                self._deliver(pending, ids)
            for pending, out in done:
                if pending is None:
                    continue
                if pending.on_delta is not None and len(out.output_ids) > pending.sent:
                    self._deliver(pending, out.output_ids[pending.sent:])
                pending.future.set_result(out)

    def _deliver(self, pending: _Pending, ids: list[int]) -> None:
        try:
            pending.on_delta(ids)
        except Exception:  # noqa: BLE001 - one consumer's bug must not stop the loop for everyone
            self.hook_errors += 1
            log.exception("on_delta callback failed")

    def _collect_deltas(self) -> list[tuple[_Pending, list[int]]]:
        out = []
        for seq in self.engine.scheduler.running.values():
            pending = self._pending.get(seq.request_id)
            if pending is not None and pending.on_delta is not None and len(seq.output_ids) > pending.sent:
                out.append((pending, seq.output_ids[pending.sent:]))
                pending.sent = len(seq.output_ids)
        return out

    def _fail_all(self, exc: Exception) -> list[RequestOutput]:
        self.errors += 1
        outs = []
        seqs: list[Sequence] = list(self.engine.scheduler.running.values()) + list(self.engine.scheduler.waiting)
        for seq in seqs:
            self.engine.scheduler.abort(seq.request_id)
            self.engine._release(seq)
            seq.status, seq.finish_reason, seq.error = Status.ERROR, "error", f"{type(exc).__name__}: {exc}"
            seq.t_finished = time.perf_counter()
            outs.append(self.engine._output(seq))
        return outs
