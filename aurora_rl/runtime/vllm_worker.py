"""VLLMWorker (a Ray actor): a vLLM engine in the rollout-worker role (``engine.kind=vllm``).

The actor surface, the weight-sync thread, swap retries and counters are ``ExternalEngineWorker``'s
(the SGLang worker runs the same code); this class builds the vLLM rollout: the worker exports the
day-0 draft in the EAGLE3 layout, starts vLLM in its own process on ``model.target`` with EAGLE3
speculation by that draft (``engine.lookahead`` tokens per step, ``engine.num_slots`` sequences,
``engine.max_len`` context), and every ``engine.vllm.weight_poll_s`` seconds swaps newer draft
weights in through vLLM's own weight loader. Traces are recomputed on our target copy.
"""

from __future__ import annotations

from typing import Any

import torch

from aurora_rl.config import EngineSection, ModelSection
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.dtypes import resolve_dtype
from aurora_rl.models.eagle3_io import save_eagle3
from aurora_rl.runtime.external import ExternalRollout
from aurora_rl.runtime.external_worker import ExternalEngineWorker, export_root
from aurora_rl.vllm_engine.backend import VLLMBackend, configure_environment
from aurora_rl.vllm_engine.options import VLLMOptions, engine_kwargs


def vllm_model_path(model: ModelSection) -> str:
    """What vLLM's ``model`` gets for our ``model.target`` (a Hugging Face folder or hub id)."""
    if model.target == "smollm2":
        from aurora_rl.assets import ensure_smollm2

        return str(ensure_smollm2())
    return model.target


class VLLMWorker(ExternalEngineWorker):
    def _build_rollout(self, index: int, model: ModelSection, engine: EngineSection, draft: Eagle3Draft,
                       version: int, target: Any, buffer: Any, export_dir: str | None) -> tuple[ExternalRollout, bool]:
        opts = VLLMOptions.from_dict(dict(engine.vllm or {}))
        self.poll_s = opts.weight_poll_s
        configure_environment(opts.kv_cache_gib, torch.get_num_threads())
        export = export_root(opts.export_dir or export_dir, "vllm_drafts", index)
        folder = save_eagle3(draft, export / f"draft-v{version:06d}", extra={"policy_version": version})
        dtype = str(resolve_dtype(model.dtype)).removeprefix("torch.")
        kwargs = engine_kwargs(opts, vllm_model_path(model), str(folder), dtype, engine.lookahead, engine.num_slots,
                               engine.max_len, self.seed)
        backend = VLLMBackend(kwargs, folder, version)
        rollout = ExternalRollout(index, target, draft.config, backend, version, export_dir=export, buffer=buffer,
                                  capture_traces=engine.capture_traces, trace_dtype=getattr(torch, engine.trace_dtype),
                                  max_concurrency=engine.num_slots)
        rollout.start()  # the engine takes a while to start: at actor start, not on the first request
        return rollout, True
