"""SGLangWorker (a Ray actor): an SGLang replica in the rollout-worker role (``engine.kind=sglang``).

Same constructor and driver-facing methods as ``runtime.rollout.RolloutWorker`` (``submit``, ``poll``,
``stats``, ``ping``, ``node_id``, ``evaluate``, ``shutdown``), so the driver and the Dispatcher treat
both alike. It wraps ``sglang.engine.SGLangRollout``: requests go to a stock SGLang server, which this
worker launches on its own GPUs (exported day-0 draft, port ``engine.sglang.port + index``) or
attaches to at ``engine.sglang.url``. Each finished request becomes a trace by one prefill through the
worker's copy of the target and goes to the TraceBuffer as an ``Entry``, like RolloutWorker's. A
background thread checks the WeightStore every ``engine.sglang.weight_poll_s`` seconds and hot-swaps
newer draft weights into the server (draft only, tagged with the policy version); an attached server
first gets the store's current version, so the version it reports is ours from then on.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import ray
import torch

from aurora_rl.config import EngineSection, ModelSection
from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.runtime.factory import load_target_model
from aurora_rl.sglang.args import SGLangServerConfig, split_engine_options
from aurora_rl.sglang.engine import SGLangRollout

log = logging.getLogger(__name__)

SERVER_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "half": torch.float16,
                 "float16": torch.float16, "float": torch.float32, "float32": torch.float32}
"""``--dtype`` -> the dtype swapped draft tensors travel in (the server copies them into its own)."""


def sglang_model_path(model: ModelSection) -> str:
    """What ``--model-path`` gets for our ``model.target`` (a Hugging Face folder or hub id)."""
    if model.target == "smollm2":
        from aurora_rl.assets import ensure_smollm2

        return str(ensure_smollm2())
    return model.target


class SGLangWorker:
    def __init__(self, index: int, model: ModelSection, engine: EngineSection, draft_config: DraftConfig,
                 initial: tuple[int, list], buffer: Any, weight_store: Any, seed: int = 0, threads: int = 1,
                 export_dir: str | None = None) -> None:
        torch.set_num_threads(max(1, engine.threads or threads))
        options = split_engine_options(dict(engine.sglang or {}))
        opts = options.worker
        self.index, self.store, self.poll_s = index, weight_store, opts.weight_poll_s
        target, _ = load_target_model(model, seed)
        if torch.cuda.is_available():  # the recompute prefill runs beside the server, on this worker's GPU
            target = target.to("cuda")
        version, (state_ref,) = initial
        # Published weights are the trainable tensors only; keep a full state to overlay them on.
        self._state = {k: v.clone() for k, v in ray.get(state_ref).items()}
        export = Path(opts.export_dir or export_dir or "sglang_drafts") / f"worker{index}"
        server = None
        if opts.url is None:
            from aurora_rl.models.eagle3_io import save_eagle3

            draft = Eagle3Draft(draft_config)
            draft.load_state_dict(self._state)
            folder = save_eagle3(draft, export / f"draft-v{version:06d}", extra={"policy_version": version})
            port = int(options.server.get("port", SGLangServerConfig.port)) + index  # one port per replica
            server = SGLangServerConfig.from_engine(engine, sglang_model_path(model), str(folder), port=port)
        # The server launched here loads the initial draft itself; an attached one gets it pushed first.
        self._served = version if server is not None else -1
        self.rollout = SGLangRollout(
            index, target, draft_config, version, server=server, url=opts.url, export_dir=export, buffer=buffer,
            capture_traces=engine.capture_traces, trace_dtype=getattr(torch, engine.trace_dtype),
            weight_dtype=SERVER_DTYPES[options.server.get("dtype", "auto")], max_concurrency=engine.num_slots,
            startup_timeout_s=opts.startup_timeout_s, api_key=opts.api_key,
            tp_size=int(options.server.get("tp_size", 1)))
        self.swap_failures = 0
        self._stop = threading.Event()
        self._sync = threading.Thread(target=self._sync_loop, name=f"sglang-sync-{index}", daemon=True)
        self._sync.start()

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
        """Serve ``prompts`` with the server's own lookahead (a launch argument); no traces kept."""
        return self.rollout.evaluate(prompts, params, lookahead, batch_size)

    def start_http(self, host: str, port: int, api_key: str | None, model_name: str) -> str:
        raise ValueError("engine.kind=sglang has no HTTP front of ours: SGLang serves its own OpenAI-compatible "
                         f"API at {self.rollout.client.base_url}/v1")

    def shutdown(self) -> None:
        self._stop.set()
        self._sync.join(timeout=60)
        self.rollout.shutdown()

    # ---- weights in, traces out -----------------------------------------------------------------
    def _sync_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
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
        self._state.update(ray.get(ref))
        self.rollout.swap_draft(self._state, version)
        self._served = version
