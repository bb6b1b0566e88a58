"""SGLangRollout: a rollout worker whose serving engine is an SGLang server with EAGLE3 and our draft.

The engine-independent part (thread pool of requests, trace recompute, trace shipping, counters,
evaluation, export + swap bookkeeping) is ``aurora_rl.runtime.external.ExternalRollout``, which the
vLLM worker runs too; this module is the SGLang backend of it. The server is started lazily on the
first request from a ``SGLangServerConfig`` (``python -m sglang.launch_server``) or attached to by URL;
requests go over HTTP (``/generate``). A swap loads the exported tensors into the running server's
draft only (``/update_weights_from_tensor`` with ``selector: "draft"``), tagging ``weight_version``
with the policy version, without a restart. Nothing here imports sglang.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from aurora_rl.models.draft import DraftConfig, Eagle3Draft
from aurora_rl.models.eagle3_io import to_eagle3_tensors
from aurora_rl.runtime.external import ExternalRollout, SwapResult, summarize_result  # noqa: F401 (re-exported)
from aurora_rl.sglang.args import SGLangServerConfig, build_launch_command
from aurora_rl.sglang.client import GenerateResult, SGLangClient, to_sampling_params
from aurora_rl.sglang.recompute import SOURCE, RecomputedTrace

log = logging.getLogger(__name__)


class SGLangBackend:
    """An SGLang server (launched here as a subprocess, or attached to by URL) as an ``EngineBackend``."""

    name = SOURCE

    def __init__(self, index: int, *, server: SGLangServerConfig | None, url: str | None, export_dir: Path,
                 weight_dtype: torch.dtype, startup_timeout_s: float, api_key: str | None, tp_size: int) -> None:
        if (server is None) == (url is None):
            raise ValueError("SGLangRollout needs exactly one of server= (launch a server) or url= (attach to one)")
        self.index, self.server, self.export_dir = index, server, export_dir
        self.weight_dtype, self.startup_timeout_s, self.tp_size = weight_dtype, startup_timeout_s, tp_size
        self.client = SGLangClient(url or server.url, api_key=api_key)
        self._attach = url is not None
        self._proc: subprocess.Popen | None = None
        self._started = False
        self._start_lock = threading.Lock()
        self._d2t: torch.Tensor | None = None

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

    def sampling(self, params: dict[str, Any]) -> dict[str, Any]:
        return to_sampling_params(params)

    def is_greedy(self, sampling: dict[str, Any]) -> bool:
        return sampling.get("temperature", 0.0) == 0.0

    def generate(self, rid: str, prompt: list[int], sampling: dict[str, Any]) -> GenerateResult:
        return self.client.generate(prompt, sampling, rid=rid)

    def load_draft(self, draft: Eagle3Draft, version: int, folder: Path) -> None:
        exported = to_eagle3_tensors(draft, include_embedding=False)
        # The vocabulary map cannot be hot-swapped: sglang 0.5.22's eagle worker copies hot_token_id
        # (from d2t) at start, and its load_weights adds a CPU arange to d2t, which fails for the
        # GPU tensors the tensor path hands it. So d2t/t2d stay out and must not change.
        d2t = exported.pop("d2t")
        exported.pop("t2d")
        if self._d2t is not None and not torch.equal(self._d2t, d2t):
            raise ValueError(f"draft v{version} has a different draft vocabulary than the one this SGLang replica "
                             f"serves; restart the replica with --speculative-draft-model-path {folder}")
        # the target's embedding is already in the server; the rest goes in the server's dtype
        tensors = [(n, t.to(self.weight_dtype)) for n, t in exported.items()]
        self.client.update_draft_from_tensors(tensors, version, tp_size=self.tp_size)
        self._d2t = d2t

    def check_lookahead(self, lookahead: int | None) -> None:
        if self.server is not None and lookahead != self.server.speculative_num_steps:
            raise ValueError(f"lookahead={lookahead}: this SGLang replica runs speculative_num_steps="
                             f"{self.server.speculative_num_steps}; start another replica to compare lookaheads")

    def launched_draft(self) -> Path | None:
        return Path(self.server.draft_path) if self.server is not None else None

    def close(self) -> None:
        self.client.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class SGLangRollout(ExternalRollout):
    def __init__(self, index: int, target: Any, draft_config: DraftConfig, initial_version: int = 0, *,
                 server: SGLangServerConfig | None = None, url: str | None = None,
                 export_dir: str | Path = "sglang_drafts", trace_sink: Callable[[RecomputedTrace], None] | None = None,
                 buffer: Any = None, capture_traces: bool = True, trace_dtype: torch.dtype = torch.bfloat16,
                 weight_dtype: torch.dtype = torch.bfloat16, max_concurrency: int = 8,
                 startup_timeout_s: float = 1800.0, api_key: str | None = None, tp_size: int | None = None) -> None:
        backend = SGLangBackend(index, server=server, url=url, export_dir=Path(export_dir), weight_dtype=weight_dtype,
                                startup_timeout_s=startup_timeout_s, api_key=api_key,
                                tp_size=tp_size or (server.tp_size if server is not None else 1))
        super().__init__(index, target, draft_config, backend, initial_version, export_dir=export_dir,
                         trace_sink=trace_sink, buffer=buffer, capture_traces=capture_traces, trace_dtype=trace_dtype,
                         max_concurrency=max_concurrency)
        self.server, self.client = server, backend.client
