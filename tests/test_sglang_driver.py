"""``engine.kind=sglang`` through the real driver: start_actors + Dispatcher on a real local Ray.

The SGLang server is a MOCK (``tests.sglang_mock.MockSGLang``): SGLang cannot be installed or run on
the CPU machines these tests run on (see /work/shared/NOTES.md), so the mock stands in for it,
speaking sglang 0.5.22's documented ``/generate`` and draft weight-update formats and recording every
call. Everything on our side is real: the SGLangWorker actors the driver starts, the HTTP calls, the
recompute through the tiny target, the TraceBuffer, the learner, the WeightStore and the hot swap
(whose tensor payload the mock decodes in this process, i.e. across processes).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from aurora_rl.config import EngineSection, EvalSection, validate
from aurora_rl.models.eagle3_io import to_eagle3_tensors
from tests.sglang_mock import MockSGLang
from tests.test_ray_runtime import local_ray, tiny_config, wait_for  # noqa: F401  (local_ray is a fixture)

pytestmark = pytest.mark.smoke


@pytest.fixture
def mock_sglang():
    from aurora_rl.serving.http import serve

    mock = MockSGLang(fail_first_token=None)
    handle = serve(mock.app, port=0)
    yield mock, handle.url
    handle.stop()


def _poll_worker(worker, n: int, timeout_s: float = 60.0) -> list[dict]:
    outputs, deadline = [], time.monotonic() + timeout_s
    while len(outputs) < n and time.monotonic() < deadline:
        outputs += ray.get(worker.poll.remote())["outputs"]
        time.sleep(0.05)
    return outputs


@pytest.mark.usefixtures("local_ray")
def test_sglang_workers_serve_feed_the_learner_and_take_its_weights(tmp_path, mock_sglang):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aurora_rl.runtime.dispatch import Dispatcher
    from aurora_rl.runtime.driver import evaluate, prepare, start_actors, stop_actors
    from aurora_rl.runtime.metrics import RunLogger, format_table

    mock, url = mock_sglang
    cfg = tiny_config(tmp_path, max_requests=16, eval=EvalSection(max_tokens=8),
                      engine=EngineSection(kind="sglang", num_slots=4, max_len=128, lookahead=3, adaptive_lookahead=False,
                                           sglang={"url": url, "weight_poll_s": 0.2}))
    validate(cfg)
    traffic, draft, head, _ = prepare(cfg)
    actors = start_actors(cfg, draft, head, Path(cfg.output_dir))
    learner, store, buffer = actors["learner"], actors["store"], actors["buffer"]
    (worker,) = actors["workers"]
    logger = RunLogger(tmp_path, "")
    try:
        assert "sglang/traces" in ray.get(worker.stats.remote())  # the driver started an SGLang worker
        # an attached server first gets the store's current draft, so the version it reports is ours
        wait_for(lambda: ray.get(worker.stats.remote())["system/swaps"] == 1, timeout=60)
        assert [u.version for u in mock.updates] == ["0"]
        ray.get(learner.start.remote())
        dispatch = Dispatcher(cfg, actors, traffic, logger)
        dispatch.serve_until_budget()
        dispatch.drain()
        c = dispatch.counters()
        assert c["answered"] == c["submitted"] == 16 and c["errors"] == 0 and c["abandoned_requests"] == 0
        served = {b["rid"] for e, b in mock.calls if e == "/generate"}
        assert served == {f"r{i}" for i in range(16)}
        assert all(r["source"] == "sglang" and r["verify_steps"] == 8 for r in logger.requests)

        # every served request became a trace in the buffer, and the learner trained on them
        wait_for(lambda: ray.get(buffer.stats.remote())["buffer/received"] == 16, timeout=60)
        wait_for(lambda: ray.get(learner.info.remote())["step"] >= 4, timeout=300)
        final = ray.get(learner.stop.remote())
        version = int(ray.get(store.stats.remote())["weights/version"])
        assert version == final["policy_version"] >= 4

        # the worker hot-swapped the newest version into the server's draft, tagged with that version
        wait_for(lambda: ray.get(worker.stats.remote())["system/worker_version"] == version, timeout=60)
        updates = list(mock.updates)
        assert updates[-1].version == str(version) and [int(u.version) for u in updates] == sorted(
            int(u.version) for u in updates)
        expected = set(to_eagle3_tensors(draft)) - {"embed_tokens.weight", "d2t", "t2d"}
        assert all(set(u.names) == expected and u.ranks == 1 for u in updates)
        bodies = [b for e, b in mock.calls if e == "/update_weights_from_tensor"]
        assert all(b["selector"] == "draft" and b["flush_cache"] is False for b in bodies)
        assert (tmp_path / "sglang" / "worker0" / f"draft-v{version:06d}" / "config.json").exists()
        stats = ray.get(worker.stats.remote())
        assert stats["system/swap_failures"] == 0 and stats["system/swaps"] == len(updates)
        assert stats["sglang/traces"] == stats["sglang/zero_step_traces"] == stats["system/traces_sent"] == 16

        # the learner says these traces carried no proposals (the proposal-based terms had no rows)
        dispatch.poll_learner()
        logger.close()
        acc = EventAccumulator(str(tmp_path / "tb")).Reload()
        without = [e.value for e in acc.Scalars("learner/traces_without_proposals")]
        assert without and all(v == cfg.learner.batch_traces for v in without)
        assert all(e.value == 0 for e in acc.Scalars("learner/data/num_steps"))

        # a request served after the swap reports the new version, and so does its trace
        ray.get(worker.submit.remote([("after", traffic.requests[20][0], {"max_tokens": 4})]))
        (after,) = _poll_worker(worker, 1)
        assert after["policy_version"] == version and after["weight_version"] == str(version)

        result = evaluate(cfg, worker, traffic)
        assert result["prompts"] == 4 and result["accept_length"] == 2.0
        assert result["plain_tokens_per_s"] is None and result["speedup"] is None
        assert "speedup" not in format_table({"requests_served": 16, "final_policy_version": version,
                                              "start": logger.window("start"), "end": logger.window("end"),
                                              "eval": result})
        ray.get(worker.shutdown.remote())
    finally:
        stop_actors(actors)


FAKE_LAUNCHER = '''#!{python}
"""Stands in for `python -m sglang.launch_server ...`: records its arguments, serves the mock."""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from aurora_rl.serving.http import serve
from tests.sglang_mock import MockSGLang
args = sys.argv[1:]
flags = dict(zip(args[2::2], args[3::2]))
Path(flags["--speculative-draft-model-path"]).parent.joinpath("launch.json").write_text(json.dumps(args))
serve(MockSGLang(fail_first_token=None).app, host=flags["--host"], port=int(flags["--port"]))
parent = os.getppid()
while os.getppid() == parent:  # exit with the worker that launched it, even if it was killed
    time.sleep(1)
'''


@pytest.mark.usefixtures("local_ray")
def test_sglang_worker_launches_its_server_with_the_exported_draft(tmp_path):
    """Launch mode (no ``engine.sglang.url``): the worker exports the day-0 draft, launches the server
    command on ``port + index`` with it, serves through it and stops it at shutdown. The command's
    interpreter (``engine.sglang.python``) is a fake that serves the mock instead of SGLang."""
    import json
    import socket
    import sys

    from aurora_rl.runtime.driver import prepare, start_actors, stop_actors
    from aurora_rl.sglang.client import SGLangClient

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_LAUNCHER.format(python=sys.executable, repo=str(Path(__file__).resolve().parent.parent)))
    fake.chmod(0o755)
    with socket.socket() as s:  # a free port for the server of worker 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No validate(): it rightly refuses a launch of model.target=tiny on zero GPUs, which the fake needs neither of.
    cfg = tiny_config(tmp_path, engine=EngineSection(kind="sglang", num_slots=2, max_len=128, lookahead=3, adaptive_lookahead=False, sglang={
        "python": str(fake), "port": port, "startup_timeout_s": 120, "weight_poll_s": 0.2}))
    traffic, draft, head, _ = prepare(cfg)
    actors = start_actors(cfg, draft, head, Path(cfg.output_dir))
    (worker,) = actors["workers"]
    try:
        ray.get(worker.submit.remote([(f"r{i}", traffic.requests[i][0], {"max_tokens": 6}) for i in range(2)]))
        outs = _poll_worker(worker, 2, timeout_s=180)
        assert sorted(o["request_id"] for o in outs) == ["r0", "r1"] and all(o["status"] == "finished" for o in outs)
        folder = tmp_path / "sglang" / "worker0" / "draft-v000000"
        args = json.loads((folder.parent / "launch.json").read_text())
        flags = dict(zip(args[2::2], args[3::2]))
        assert args[:2] == ["-m", "sglang.launch_server"] and flags["--speculative-draft-model-path"] == str(folder)
        assert (flags["--port"], flags["--speculative-num-steps"], flags["--max-running-requests"]) == (str(port), "3", "2")
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        assert ray.get(worker.stats.remote())["system/swaps"] == 0  # the server started with the current draft
        ray.get(worker.shutdown.remote())
        client = SGLangClient(f"http://127.0.0.1:{port}")
        assert not client.health()  # the launched server was stopped with the worker
        client.close()
    finally:
        stop_actors(actors)
