"""ServeSupervisor: watches what ``aurora-rl serve`` depends on besides the rollout workers, once a second.

- The learner: a learner whose process died is restarted by Ray (``max_restarts=-1``), resumes from its
  latest checkpoint in the state folder, and is started again here, as the run's Dispatcher does.
  Its state (``running``, ``restarting``, ``failed: ...``, ``off``) and restart count go to ``/health``.
- The newest draft: its version (handed to the router for responses) and its age; ``/health`` says
  degraded when the learner is not running or when traces wait in the buffer (a full batch) and no new
  draft came for ``stall_after_s``.
- Process ids of the workers and the learner (``/health`` ``processes``: what an operator's watchdog
  or the fault-injection tests use).
- TensorBoard: ``serve/routing_*`` (retries, cut streams, worker failures and returns) and
  ``serve/requests_*`` (accepted, rejected, retryable errors, aborted) counters, ``learner/`` metrics, ``system/`` store, buffer and worker
  scalars.
``save(state_dir)`` stops the learner, checkpoints it and exports the EAGLE3 draft (on SIGINT/SIGTERM).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from aurora_rl.runtime.dispatch import wait_alive
from aurora_rl.runtime.metrics import RunLogger

log = logging.getLogger(__name__)
_GONE = (RayActorError, ActorUnavailableError)
TICK_S = 1.0


class ServeSupervisor:
    def __init__(self, actors: dict[str, Any], learn: bool, batch_traces: int, stall_after_s: float,
                 logger: RunLogger | None = None) -> None:
        self.actors, self.learn, self.batch_traces, self.stall_after_s = actors, learn, batch_traces, stall_after_s
        self.logger = logger
        self.router = None
        self.request_counts: dict[str, int] = {}
        """The HTTP front's request counters (set once it exists)."""
        self.learner_state = "running" if learn else "off"
        self.learner_restarts = 0
        self.learner_error: str | None = None
        self.learner_info: dict[str, Any] = {}
        self.version, self.published_at, self.buffer_depth = None, time.time(), 0
        self.pids: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-supervisor", daemon=True)
        self._t0 = time.time()

    def start(self) -> "ServeSupervisor":
        self.tick()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one failed look
                log.exception("serve supervisor tick failed")

    # ---- one look -------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.learn:
            self._watch_learner()
        store = ray.get(self.actors["store"].stats.remote(), timeout=30)
        buffer = ray.get(self.actors["buffer"].stats.remote(), timeout=30)
        self.version = int(store["weights/version"])
        self.published_at = store.get("weights/published_at", self.published_at)
        self.buffer_depth = int(buffer["buffer/depth"])
        if self.router is not None:
            self.router.version = self.version
        self._poll_workers()
        if self.logger is not None:
            self.logger.scalars({**store, **buffer, "draft_age_s": self.draft_age_s()}, prefix="system/")
            if self.router is not None:
                self.logger.scalars({k: float(v) for k, v in self.router.counts.items()}, prefix="serve/routing_")
            self.logger.scalars({k: float(v) for k, v in self.request_counts.items()}, prefix="serve/requests_")
            self.logger.scalars({"learner_restarts": float(self.learner_restarts)}, prefix="system/")

    def _watch_learner(self) -> None:
        learner = self.actors["learner"]
        try:
            res = ray.get(learner.poll.remote(), timeout=30)
        except GetTimeoutError:
            return  # busy with an update, not dead
        except _GONE:
            self.learner_state = "restarting"
            self.learner_restarts += 1
            log.warning("the learner died; Ray restarts it and it resumes from its last checkpoint")
            wait_alive(learner.info)
            ray.get(learner.start.remote(), timeout=60)
            self.learner_state = "running"
            return
        # A poll answered: the learner is up, even if the restart path above was cut short (a start that
        # timed out under load raises out of the tick and would otherwise leave "restarting" for good).
        if self.learner_state == "restarting":
            self.learner_state = "running"
        self.learner_info = res["info"]
        if res["error"]:  # the loop thread died but the process lives: start the loop again
            self.learner_restarts += 1
            self.learner_error = res["error"]
            log.error("the learner loop failed (%s); starting it again", res["error"])
            ray.get(learner.start.remote(), timeout=60)
        if self.logger is not None:
            for m in res["metrics"]:
                self.logger.scalars(m, prefix="learner/")

    def _poll_workers(self) -> None:
        """Process ids, and each worker's ``poll``: it ships traces an idle engine still holds, and its
        stats (swaps, swap stall, backpressure) go to TensorBoard."""
        pids: dict[str, Any] = {"workers": []}
        for i, w in enumerate(self.actors["workers"]):
            pid = stats = None
            try:
                pid = ray.get(w.pid.remote(), timeout=10)
                stats = ray.get(w.poll.remote(), timeout=30)["stats"]
            except (*_GONE, GetTimeoutError):
                pass  # down or restarting: the router counts it; nothing to log this second
            pids["workers"].append(pid)
            if stats is None:
                continue
            if self.logger is not None:
                self.logger.scalars({k.removeprefix("system/"): v for k, v in stats.items() if k.startswith("system/")},
                                    prefix=f"system/worker{i}/")
        if self.learn and self.learner_state == "running":
            try:
                pids["learner"] = ray.get(self.actors["learner"].pid.remote(), timeout=10)
            except (*_GONE, GetTimeoutError):
                pids["learner"] = None
        self.pids = pids

    # ---- what /health adds ----------------------------------------------------------------------
    def draft_age_s(self) -> float:
        return max(0.0, time.time() - self.published_at)

    def health(self) -> dict:
        degraded = []
        if self.learn and self.learner_state != "running":
            degraded.append(f"learner {self.learner_state}")
        age = self.draft_age_s()
        if self.learn and self.buffer_depth >= self.batch_traces and age > self.stall_after_s:
            degraded.append(f"learning stalled: {self.buffer_depth} traces wait and the newest draft is {age:.0f}s old")
        return {"degraded": degraded, "draft_age_s": round(age, 1), "buffer_depth": self.buffer_depth,
                "learner": {"state": self.learner_state, "restarts": self.learner_restarts,
                            "last_error": self.learner_error,
                            "policy_version": self.learner_info.get("policy_version"),
                            "step": self.learner_info.get("step"),
                            "lost_traces": self.learner_info.get("lost_traces")},
                "processes": self.pids}

    # ---- stopping -------------------------------------------------------------------------------
    def save(self, state_dir: Path) -> dict[str, Any]:
        """Stop the learner, checkpoint it, export the draft to ``state_dir/draft``; the learner's info."""
        learner = self.actors["learner"]
        info = ray.get(learner.stop.remote(), timeout=600)
        ckpt = ray.get(learner.checkpoint.remote(), timeout=600)
        draft = ray.get(learner.export.remote(str(state_dir / "draft")), timeout=600)
        log.info("saved %s and the EAGLE3 draft %s (policy version %s)", ckpt, draft, info["policy_version"])
        return {**info, "checkpoint": ckpt, "draft": draft}
