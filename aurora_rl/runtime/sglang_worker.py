"""SGLangWorker (a Ray actor): an SGLang replica in the rollout-worker role (``engine.kind=sglang``).

The actor surface, the weight-sync thread, swap retries and counters are ``ExternalEngineWorker``'s
(shared with the vLLM worker); this class only builds the SGLang rollout: requests go to a stock
SGLang server, which this worker launches on its own GPUs (exported day-0 draft, port
``engine.sglang.port + index``) or attaches to at ``engine.sglang.url``, checked for newer draft
weights every ``engine.sglang.weight_poll_s`` seconds. An attached server first gets the store's
current version, so the version it reports is ours from then on.
"""

from __future__ import annotations

from typing import Any

import torch

from aurora_rl.config import EngineSection, ModelSection
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.runtime.external_worker import ExternalEngineWorker, export_root
from aurora_rl.sglang.args import SGLangServerConfig, split_engine_options
from aurora_rl.sglang.engine import SGLangRollout

SERVER_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "half": torch.float16,
                 "float16": torch.float16, "float": torch.float32, "float32": torch.float32}
"""``--dtype`` -> the dtype swapped draft tensors travel in (the server copies them into its own)."""


def sglang_model_path(model: ModelSection) -> str:
    """What ``--model-path`` gets for our ``model.target`` (a Hugging Face folder or hub id)."""
    if model.target == "smollm2":
        from aurora_rl.assets import ensure_smollm2

        return str(ensure_smollm2())
    return model.target


class SGLangWorker(ExternalEngineWorker):
    def _build_rollout(self, index: int, model: ModelSection, engine: EngineSection, draft: Eagle3Draft,
                       version: int, target: Any, buffer: Any, export_dir: str | None) -> tuple[SGLangRollout, bool]:
        options = split_engine_options(dict(engine.sglang or {}))
        opts = options.worker
        self.poll_s = opts.weight_poll_s
        export = export_root(opts.export_dir or export_dir, "sglang_drafts", index)
        server = None
        if opts.url is None:
            from aurora_rl.models.eagle3_io import save_eagle3

            folder = save_eagle3(draft, export / f"draft-v{version:06d}", extra={"policy_version": version})
            port = int(options.server.get("port", SGLangServerConfig.port)) + index  # one port per replica
            server = SGLangServerConfig.from_engine(engine, sglang_model_path(model), str(folder), port=port)
        rollout = SGLangRollout(
            index, target, draft.config, version, server=server, url=opts.url, export_dir=export, buffer=buffer,
            capture_traces=engine.capture_traces, trace_dtype=getattr(torch, engine.trace_dtype),
            weight_dtype=SERVER_DTYPES[options.server.get("dtype", "auto")], max_concurrency=engine.num_slots,
            startup_timeout_s=opts.startup_timeout_s, api_key=opts.api_key,
            tp_size=int(options.server.get("tp_size", 1)))
        return rollout, server is not None

    def start_http(self, host: str, port: int, api_key: str | None, model_name: str) -> str:
        raise ValueError("engine.kind=sglang has no HTTP front of ours: SGLang serves its own OpenAI-compatible "
                         f"API at {self.rollout.client.base_url}/v1")
