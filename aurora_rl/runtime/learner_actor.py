"""LearnerActor (a Ray actor): pulls trace batches from the TraceBuffer, updates, publishes weights.

Its loop runs in a thread (``start``/``stop``) so the driver can ``poll`` metrics meanwhile. Weights
are published to the WeightStore after every ``publish_every`` batches, only when every tensor is
finite; non-finite weights are refused and counted. Checkpoints go to ``checkpoint_dir`` every
``checkpoint_every`` batches; a restarted actor resumes from the latest one, so the policy version
keeps increasing across a learner crash.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError

from aurora_rl.config import AlgorithmSection, LearnerSection, WorkloadSection
from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.runtime.weights import check_finite
from aurora_rl.training.checkpoint import latest_checkpoint, resume_learner, save_checkpoint
from aurora_rl.training.learner import Learner, LearnerConfig

log = logging.getLogger(__name__)


def learner_config(section: LearnerSection, algorithm: AlgorithmSection, workload: WorkloadSection) -> LearnerConfig:
    return LearnerConfig(
        algorithm=algorithm.name, algorithm_args=dict(algorithm.args), lr=section.lr,
        warmup_steps=section.warmup_steps, weight_decay=section.weight_decay, grad_clip=section.grad_clip,
        depth=section.depth, dtype=section.dtype, grad_accum=section.grad_accum,
        replay_ratio=section.replay_ratio, prompt_bases=section.prompt_bases,
        vocab_refresh_every=section.vocab_refresh_every, vocab_refresh_min_gain=section.vocab_refresh_min_gain,
        vocab_half_life_tokens=section.vocab_half_life_tokens, vocab_prompt_weight=section.vocab_prompt_weight,
        greedy_verify=workload.temperature == 0.0,
    )


class LearnerActor:
    def __init__(self, section: LearnerSection, algorithm: AlgorithmSection, workload: WorkloadSection,
                 draft_config: DraftConfig, initial: tuple[int, list], target_head_ref: list, buffer: Any,
                 weight_store: Any, checkpoint_dir: str, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.section, self.buffer, self.store = section, buffer, weight_store
        self.checkpoint_dir = Path(checkpoint_dir)
        head = ray.get(target_head_ref[0])
        config = learner_config(section, algorithm, workload)
        latest = latest_checkpoint(self.checkpoint_dir)
        if latest is not None:
            self.learner = resume_learner(latest, head, config)
            self.resumed_from = str(latest)
        else:
            version, (state_ref,) = initial
            draft = Eagle3Draft(draft_config)
            draft.load_state_dict(ray.get(state_ref))
            self.learner = Learner(draft, head, config, policy_version=version)
            self.resumed_from = None
        # Versions published before a restart are already being served: continue above them.
        served = int(ray.get(weight_store.stats.remote())["weights/version"])
        self.learner.policy_version = max(self.learner.policy_version, served)
        self._metrics: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.refused = 0
        self.lost_traces = 0
        self.published_version = self.learner.policy_version
        """The newest version this learner has in the store (a rule that makes no step, like ``frozen``,
        never has anything new to publish)."""
        self.error: str | None = None

    def info(self) -> dict[str, Any]:
        return {"policy_version": self.learner.policy_version, "step": self.learner.step,
                "lost_traces": self.lost_traces,
                "resumed_from": self.resumed_from, "node_id": ray.get_runtime_context().get_node_id()}

    def pid(self) -> int:
        """This learner's process id (fault-injection tests kill it)."""
        return os.getpid()

    def start(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self.error = None
            self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
            self._thread.start()
        return True

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=600)
        return self.info()

    def poll(self) -> dict[str, Any]:
        with self._lock:
            metrics, self._metrics = self._metrics, []
        return {"metrics": metrics, "info": self.info(), "error": self.error}

    def _run(self) -> None:
        held: list[Any] = []
        try:
            while not self._stop.is_set():
                need = self.section.batch_traces - len(held)
                held += ray.get(self.buffer.get_batch.remote(need, self.learner.policy_version))
                if len(held) < self.section.batch_traces:
                    time.sleep(0.2)
                    continue
                traces = self._fetch(held)
                held = []
                if traces:
                    self._train(traces)
        except Exception as exc:  # noqa: BLE001 - reported to the driver through poll()
            log.exception("learner loop failed")
            self.error = f"{type(exc).__name__}: {exc}"

    def _fetch(self, held: list[Any]) -> list[Any]:
        """The traces of ``held``; one whose object was lost (its owner died) is counted and skipped."""
        traces = []
        for e in held:
            try:
                traces.append(ray.get(e.ref[0]))
            except ObjectLostError as exc:
                self.lost_traces += 1
                log.warning("trace %s lost (%s): skipped", e.request_id, type(exc).__name__)
        return traces

    def _train(self, traces) -> None:
        t0 = time.perf_counter()
        m = self.learner.update(traces)
        self.batches += 1
        m["learner/update_s"] = time.perf_counter() - t0
        if self.batches % self.section.publish_every == 0:
            m["learner/published"] = float(self.publish())
        if self.section.checkpoint_every and self.batches % self.section.checkpoint_every == 0:
            self.checkpoint()
        m["t"] = time.time()
        with self._lock:
            self._metrics.append(m)

    def publish(self) -> bool:
        """Put the current weights in the object store and announce them, unless any is non-finite."""
        version = self.learner.policy_version
        state = self.learner.publishable_state()
        bad = check_finite(state)
        if bad:
            self.refused += 1
            log.error("refusing to publish version %d: non-finite tensors %s", version, bad[:4])
            ray.get(self.store.refuse.remote(version, bad))
            return False
        if version <= self.published_version:
            return False
        published = bool(ray.get(self.store.publish.remote(version, [ray.put(state)])))
        if published:
            self.published_version = version
        return published

    def checkpoint(self) -> str:
        return str(save_checkpoint(self.learner, self.checkpoint_dir, keep_last=2))

    def export(self, folder: str) -> str:
        from aurora_rl.models.eagle3_io import save_eagle3

        return str(save_eagle3(self.learner.draft, folder, extra={"policy_version": self.learner.policy_version}))

    def inject_nonfinite(self) -> None:
        """Fault injection for tests: poison one weight so the next publish must be refused."""
        with torch.no_grad():
            self.learner.draft.fc.weight[0, 0] = float("nan")
