"""ExternalEngineWorker (a Ray actor base): an existing serving engine in the rollout-worker role.

Same constructor and driver-facing methods as ``runtime.rollout.RolloutWorker`` (``submit``, ``poll``,
``stats``, ``ping``, ``node_id``, ``evaluate``, ``shutdown``), so the driver and the Dispatcher treat
every engine alike. It loads our copy of the target (for the trace recompute), keeps the full draft
state the learner's published tensors overlay, and runs a background thread that checks the
WeightStore every ``poll_s`` seconds and hot-swaps newer draft weights into the engine through
``ExternalRollout.swap_draft``. A failed swap is counted (``system/swap_failures``), logged and
retried at the next check with the newest version; the old draft keeps serving meanwhile.
Subclasses (``SGLangWorker``, ``VLLMWorker``) only build the engine's ``ExternalRollout``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import ray
import torch

from aurora_rl.config import EngineSection, ModelSection
from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.runtime.external import ExternalRollout
from aurora_rl.runtime.factory import load_target_model

log = logging.getLogger(__name__)


class ExternalEngineWorker:
    poll_s: float = 1.0

    def __init__(self, index: int, model: ModelSection, engine: EngineSection, draft_config: DraftConfig,
                 initial: tuple[int, list], buffer: Any, weight_store: Any, seed: int = 0, threads: int = 1,
                 export_dir: str | None = None) -> None:
        torch.set_num_threads(max(1, engine.threads or threads))
        self.index, self.store, self.seed = index, weight_store, seed
        # The engine serves the float weights, so the recompute copy must too (auto would pick the GGUF's
        # quantized blocks for the embedded target).
        if model.quant == "auto":
            model = dataclasses.replace(model, quant="none")
        target, _ = load_target_model(model, seed)
        if torch.cuda.is_available():  # the recompute prefill runs beside the engine, on this worker's GPU
            target = target.to("cuda")
        version, (state_ref,) = initial
        # Published weights are the trainable tensors only; keep a full state to overlay them on.
        self._state = {k: v.clone() for k, v in ray.get(state_ref).items()}
        draft = Eagle3Draft(draft_config)
        draft.load_state_dict(self._state)
        self.rollout, launched = self._build_rollout(index, model, engine, draft, version, target, buffer, export_dir)
        # An engine launched here starts with the initial draft; an attached one gets it pushed first.
        self._served = version if launched else -1
        self.swap_failures = 0
        self._stop = threading.Event()
        self._sync = threading.Thread(target=self._sync_loop, name=f"{self.rollout.source}-sync-{index}", daemon=True)
        self._sync.start()

    def _build_rollout(self, index: int, model: ModelSection, engine: EngineSection, draft: Eagle3Draft,
                       version: int, target: Any, buffer: Any, export_dir: str | None) -> tuple[ExternalRollout, bool]:
        """The engine's rollout, and whether the engine starts with ``draft`` (False: attached, push it)."""
        raise NotImplementedError

    # ---- requests (the RolloutWorker surface) ---------------------------------------------------
    def submit(self, requests: list[tuple[str, list[int], dict]]) -> list[str]:
        """Queue requests; returns the ids refused as invalid (answered as errors by ``poll``)."""
        return self.rollout.submit(requests)

    def poll(self) -> dict[str, Any]:
        out = self.rollout.poll()
        out["stats"] = self._with_sync_stats(out["stats"])
        return out

    def stats(self) -> dict[str, float]:
        return self._with_sync_stats(self.rollout.stats())

    def _with_sync_stats(self, stats: dict[str, float]) -> dict[str, float]:
        stats["system/swap_failures"] = float(self.swap_failures)
        return stats

    def ping(self) -> int:
        return self.index

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def evaluate(self, prompts: list[list[int]], params: dict, lookahead: int, batch_size: int) -> list[dict]:
        """Serve ``prompts`` with the engine's own lookahead (a launch argument); no traces kept."""
        return self.rollout.evaluate(prompts, params, lookahead, batch_size)

    def start_http(self, host: str, port: int, api_key: str | None, model_name: str) -> str:
        raise ValueError(f"engine.kind={self.rollout.source} has no HTTP front of ours; use engine.kind=native to serve")

    def shutdown(self) -> None:
        self._stop.set()
        self._sync.join(timeout=60)
        self.rollout.shutdown()

    # ---- weights in, traces out -----------------------------------------------------------------
    def _sync_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.sync_once()

    def sync_once(self) -> None:
        """One check: swap in a newer draft if there is one, then ship held traces."""
        try:
            self._maybe_swap()
        except Exception:  # counted in stats (system/swap_failures); the old draft keeps serving
            self.swap_failures += 1
            log.exception("worker %d: draft swap failed (retried at the next check)", self.index)
        try:
            self.rollout.flush_traces()
        except Exception:  # the driver's next poll() flushes again and raises it there
            log.exception("worker %d: shipping traces to the buffer failed", self.index)

    def _maybe_swap(self) -> None:
        newer = ray.get(self.store.get_if_newer.remote(self._served))
        if newer is None:
            return
        version, (ref,) = newer
        state = dict(self._state)
        state.update(ray.get(ref))
        self.rollout.swap_draft(state, version)
        # only a swap that went through moves the served version (a failed one is retried)
        self._state, self._served = state, version


def export_root(export_dir: str | None, default: str, index: int) -> Path:
    """Per-replica folder for exported drafts."""
    return Path(export_dir or default) / f"worker{index}"
