"""ExternalEngineWorker, the code every external engine (SGLang, vLLM) runs: weight sync, swap failures
counted and retried, served version, request records, and recomputed traces.

The engine here is a stand-in backend defined in this file (it answers with made-up tokens and can be
told to fail its next draft loads): what is under test is the shared worker around it, with a real
local Ray, a real WeightStore actor and the tiny target for the recompute. The vLLM tests exercise the
same worker with the real engine (tests/test_vllm_driver.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch

from aurora_rl.config import EngineSection, ModelSection
from aurora_rl.runtime.external import ExternalRollout
from aurora_rl.runtime.external_worker import ExternalEngineWorker
from aurora_rl.sglang.client import GenerateResult
from tests.test_ray_runtime import local_ray  # noqa: F401  (a fixture)

pytestmark = pytest.mark.unit


class FlakyBackend:
    """An ``EngineBackend`` stand-in: output token i is ``last prompt token + 1 + i``; every response
    counts two verify steps; ``fail_loads`` draft loads fail before one succeeds."""

    name = "fake"

    def __init__(self, fail_loads: int = 0) -> None:
        self.fail_loads, self.loaded, self.version = fail_loads, [], 0

    def start(self) -> str:
        return "in-process"

    def sampling(self, params: dict) -> dict:
        if set(params) - {"max_tokens", "temperature"}:
            raise ValueError(f"unsupported {sorted(set(params) - {'max_tokens', 'temperature'})}")
        return {"max_tokens": params.get("max_tokens", 4)}

    def is_greedy(self, sampling: dict) -> bool:
        return True

    def generate(self, rid: str, prompt: list[int], sampling: dict) -> GenerateResult:
        n = sampling["max_tokens"]
        ids = [(prompt[-1] + 1 + i) % 128 for i in range(n)]
        return GenerateResult(rid, ids, None, "length", len(prompt), n, 2, n - 1 - 2, 6, str(self.version),
                              meta_info={"spec_verify_ct": 2, "completion_tokens": n, "weight_version": str(self.version)})

    def load_draft(self, draft, version: int, folder: Path) -> None:
        if self.fail_loads:
            self.fail_loads -= 1
            raise RuntimeError("draft transport down")
        assert (folder / "model.safetensors").exists()
        self.loaded.append((version, draft.fc.weight.detach().clone()))
        self.version = version

    def check_lookahead(self, lookahead) -> None:
        pass

    def launched_draft(self):
        return None

    def close(self) -> None:
        pass


class FakeEngineWorker(ExternalEngineWorker):
    poll_s = 3600.0  # the test drives sync_once itself
    backend: FlakyBackend

    def _build_rollout(self, index, model, engine, draft, version, target, buffer, export_dir):
        return ExternalRollout(index, target, draft.config, self.backend, version, export_dir=export_dir,
                               buffer=buffer, trace_dtype=torch.float32), True


@pytest.mark.usefixtures("local_ray")
def test_swap_failures_are_counted_and_retried_with_the_newest_version(tmp_path):
    from aurora_rl.runtime.buffer import TraceBuffer
    from aurora_rl.runtime.factory import load_target_model
    from aurora_rl.runtime.weights import WeightStore
    from aurora_rl.config import BufferSection
    from tests.test_speculative import make_draft

    target, _ = load_target_model(ModelSection(target="tiny", dtype="float32"))
    draft = make_draft(target, vocab=48)
    store = ray.remote(WeightStore).remote()
    buffer = ray.remote(TraceBuffer).remote(BufferSection(), 0)
    initial = (0, [ray.put(draft.state_dict())])
    ray.get(store.publish.remote(0, initial[1]))
    FakeEngineWorker.backend = FlakyBackend(fail_loads=2)
    worker = FakeEngineWorker(0, ModelSection(target="tiny", dtype="float32"), EngineSection(num_slots=2), draft.config,
                              initial, buffer, store, export_dir=str(tmp_path))
    try:
        worker.sync_once()  # nothing newer than the launch version
        assert worker.backend.loaded == [] and worker.swap_failures == 0
        trained = {"fc.weight": torch.full_like(draft.fc.weight, 0.5)}  # the learner publishes trainables only
        ray.get(store.publish.remote(1, [ray.put(trained)]))
        worker.sync_once()
        worker.sync_once()
        assert worker.swap_failures == 2 and worker.backend.loaded == [] and worker.stats()["system/worker_version"] == 0
        ray.get(store.publish.remote(2, [ray.put({"fc.weight": torch.full_like(draft.fc.weight, 0.25)})]))
        worker.sync_once()  # the retry takes the newest version, overlaid on the full state
        (version, fc), = worker.backend.loaded
        assert version == 2 and torch.equal(fc, torch.full_like(fc, 0.25))
        stats = worker.stats()
        assert stats["system/swap_failures"] == 2 and stats["system/swaps"] == 1 and stats["system/worker_version"] == 2

        assert worker.submit([("a", [3, 4, 5], {"max_tokens": 4}), ("bad", [1], {"beam": 2})]) == ["bad"]
        deadline, outs = time.monotonic() + 30, []
        while len(outs) < 2 and time.monotonic() < deadline:
            outs += worker.poll()["outputs"]
            time.sleep(0.02)
        by_id = {o["request_id"]: o for o in outs}
        assert by_id["a"]["policy_version"] == 2 and by_id["a"]["source"] == "fake" and by_id["a"]["verify_steps"] == 2
        assert by_id["bad"]["status"] == "error" and "beam" in by_id["bad"]["error"]
        worker.sync_once()  # ships the recomputed trace
        assert ray.get(buffer.stats.remote())["buffer/received"] == 1
        assert worker.stats()["fake/traces"] == 1
    finally:
        worker.shutdown()


@pytest.mark.parametrize("overrides, named", [
    (["engine.adaptive_lookahead=true"], "engine.adaptive_lookahead"),
    (["engine.context_copy=true"], "engine.context_copy"),
    (["learner.vocab_refresh_every=10"], "learner.vocab_refresh_every"),
    (["model=tiny"], "model.target"),
    (["+engine.vllm.kv_cache=2"], "engine.vllm.kv_cache"),
    (["engine.vllm.dtype=fp8"], "engine.vllm.dtype"),
    (["+engine.vllm.engine_args.max_num_seqs=3"], "max_num_seqs"),
    (["model.quant=q4_1"], "model.quant"),
])
def test_engine_vllm_refuses_what_it_cannot_do_by_name(tmp_path, overrides, named):
    from aurora_rl.cli import compose
    from aurora_rl.config import validate

    cfg = compose(["experiment=day0", "engine=vllm"], tmp_path)
    validate(cfg)  # the day-0 job composes with engine=vllm as it is
    assert (cfg.engine.kind, cfg.engine.context_copy, cfg.engine.lookahead) == ("vllm", False, 4)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        validate(compose(["experiment=day0", "engine=vllm", *overrides], tmp_path))
