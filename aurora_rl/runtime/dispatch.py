"""Dispatcher: keeps rollout workers fed with traffic, collects what they finish, and recovers faults.

Each worker holds at most two batches' worth of requests; the dispatcher remembers every request it
handed out until its answer comes back. A worker that dies is restarted by Ray (``max_restarts``);
its unanswered requests are submitted again to the new incarnation, so none vanish. A learner that
dies is restarted by Ray, resumes from its last checkpoint, and is started again here. Every retry,
restart and unanswered request is counted in the summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from tqdm import tqdm

from aurora_rl.config import RunConfig
from aurora_rl.runtime.metrics import RunLogger
from aurora_rl.runtime.traffic import Traffic

log = logging.getLogger(__name__)
POLL_S = 0.2
RPC_TIMEOUT_S = 60.0
RESTART_TIMEOUT_S = 600.0


class Dispatcher:
    def __init__(self, cfg: RunConfig, actors: dict[str, Any], traffic: Traffic, logger: RunLogger) -> None:
        self.cfg, self.actors, self.traffic, self.logger = cfg, actors, traffic, logger
        self.workers = actors["workers"]
        self.in_flight: list[dict[str, tuple[list[int], dict]]] = [{} for _ in self.workers]
        self.next_index = 0
        self.answered = 0
        self.errors = 0
        self.worker_restarts = 0
        self.learner_restarts = 0
        self.retried = 0
        self.abandoned = 0
        self.version = 0
        self.bar = tqdm(total=cfg.max_requests or None, unit="req", disable=not cfg.progress, dynamic_ncols=True)

    # ---- main loop ------------------------------------------------------------------------------
    def serve_until_budget(self) -> None:
        deadline = time.time() + self.cfg.time_budget_s if self.cfg.time_budget_s > 0 else float("inf")
        while time.time() < deadline and not self._request_budget_spent():
            if self.next_index >= len(self.traffic.requests) and not any(self.in_flight):
                break
            self._feed()
            self._poll_workers()
            self.poll_learner()
            time.sleep(POLL_S)

    def drain(self, timeout_s: float = 300.0) -> None:
        """Wait for requests in flight; any still unanswered at the timeout are counted as abandoned."""
        end = time.time() + timeout_s
        while any(self.in_flight) and time.time() < end:
            self._poll_workers()
            time.sleep(POLL_S)
        self.abandoned += sum(len(f) for f in self.in_flight)
        self.bar.close()

    def counters(self) -> dict[str, int]:
        return {"answered": self.answered, "errors": self.errors, "worker_restarts": self.worker_restarts,
                "learner_restarts": self.learner_restarts, "retried_requests": self.retried,
                "abandoned_requests": self.abandoned, "submitted": self.next_index}

    # ---- workers --------------------------------------------------------------------------------
    def _request_budget_spent(self) -> bool:
        return bool(self.cfg.max_requests) and self.answered >= self.cfg.max_requests

    def _feed(self) -> None:
        limit = 2 * self.cfg.engine.num_slots
        for i, worker in enumerate(self.workers):
            batch = []
            while len(self.in_flight[i]) + len(batch) < limit and self.next_index < len(self.traffic.requests):
                if self.cfg.max_requests and self.next_index >= self.cfg.max_requests:
                    break
                ids, _ = self.traffic.requests[self.next_index]
                batch.append((f"r{self.next_index}", ids, self.traffic.params(self.cfg.workload, self.next_index)))
                self.next_index += 1
            if batch:
                self.in_flight[i].update({rid: (ids, p) for rid, ids, p in batch})
                try:
                    ray.get(worker.submit.remote(batch), timeout=RPC_TIMEOUT_S)
                except (RayActorError, GetTimeoutError):
                    self._recover_worker(i)

    def _poll_workers(self) -> None:
        for i, worker in enumerate(self.workers):
            try:
                res = ray.get(worker.poll.remote(), timeout=RPC_TIMEOUT_S)
            except (RayActorError, GetTimeoutError):
                self._recover_worker(i)
                continue
            for r in res["outputs"]:
                if self.in_flight[i].pop(r["request_id"], None) is None:
                    continue
                self.answered += 1
                self.errors += r["status"] != "finished"
                r["index"] = index = int(r["request_id"][1:])
                r["domain"] = self.traffic.requests[index][1]
                self.logger.request(r)
                self.bar.update(1)
            stats = res["stats"]
            self.version = max(self.version, int(stats["system/worker_version"]))
            self.logger.scalars({k: v for k, v in stats.items() if not k.startswith("spec/")},
                                prefix=f"system/worker{i}/" if len(self.workers) > 1 else "")
            self.logger.depth_acceptance(stats)
        w = self.logger.window("end")
        self.bar.set_postfix(accept_len=f"{w['accept_length']:.2f}", tok_s=f"{w['tokens_per_s']:.1f}", version=self.version)

    def _recover_worker(self, i: int) -> None:
        """Wait for Ray to restart worker ``i``, then hand it back every request it had not answered."""
        self.worker_restarts += 1
        log.warning("rollout worker %d died; waiting for its restart", i)
        wait_alive(self.workers[i].ping)
        pending = [(rid, ids, p) for rid, (ids, p) in self.in_flight[i].items()]
        self.retried += len(pending)
        if pending:
            ray.get(self.workers[i].submit.remote(pending), timeout=RPC_TIMEOUT_S)

    # ---- learner and system scalars -------------------------------------------------------------
    def poll_learner(self) -> None:
        learner = self.actors["learner"]
        try:
            res = ray.get(learner.poll.remote(), timeout=RPC_TIMEOUT_S)
        except (RayActorError, GetTimeoutError):
            self.learner_restarts += 1
            log.warning("learner died; it resumes from its last checkpoint")
            wait_alive(learner.info)
            ray.get(learner.start.remote())
            return
        if res["error"]:
            raise RuntimeError(f"learner failed: {res['error']}")
        for m in res["metrics"]:
            self.logger.scalars(m, prefix="learner/")
        self.logger.scalars(ray.get(self.actors["buffer"].stats.remote()), prefix="system/")
        self.logger.scalars(ray.get(self.actors["store"].stats.remote()), prefix="system/")


def wait_alive(method) -> Any:
    """Call an actor method until the actor answers (Ray restarts it meanwhile); raise after the limit."""
    end = time.time() + RESTART_TIMEOUT_S
    while True:
        try:
            return ray.get(method.remote(), timeout=RPC_TIMEOUT_S)
        except (RayActorError, GetTimeoutError):
            if time.time() > end:
                raise
            time.sleep(1.0)
