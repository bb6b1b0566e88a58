"""The online runtime on a real local Ray: an end-to-end run with TensorBoard read back, and faults
(a rollout worker killed mid-run, a learner killed and resumed, non-finite weights refused)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from aurora_rl.config import (ClusterSection, EngineSection, EvalSection, LearnerConfig, ModelSection, RunConfig,
                              WorkloadSection)

pytestmark = pytest.mark.smoke


def tiny_config(out: Path, **kw) -> RunConfig:
    base = dict(
        model=ModelSection(target="tiny", dtype="float32", draft_vocab_size=64, vocab_sample=16),
        engine=EngineSection(num_slots=4, max_len=128, lookahead=3, weight_poll_steps=2),
        learner=LearnerConfig(batch_traces=4, replay_ratio=1, depth=3, checkpoint_every=1, warmup_steps=1),
        workload=WorkloadSection(source="random", phases=[{"domain": "code", "requests": 400}], max_tokens=16,
                                 held_out=4),
        cluster=ClusterSection(), eval=EvalSection(max_tokens=16), time_budget_s=120, max_requests=32,
        output_dir=str(out), progress=False)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def wait_for(fn, timeout=120, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def test_end_to_end_run_writes_readable_tensorboard(local_ray, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aurora_rl.models.eagle3_io import load_eagle3
    from aurora_rl.runtime.driver import run

    # The learner also refreshes the draft vocabulary: the new maps travel with the weights and the
    # rollout workers swap them in while serving.
    cfg = tiny_config(tmp_path)
    cfg.learner.vocab_refresh_every = 1
    s = run(cfg)
    assert s["requests_served"] == 32 and s["counters"]["abandoned_requests"] == 0
    assert s["counters"]["answered"] == s["counters"]["submitted"] == 32
    assert s["final_policy_version"] >= 1 and s["eval"]["prompts"] == 4
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = acc.Tags()["scalars"]
    assert len(acc.Scalars("serve/accept_length")) == 32
    for tag in ("serve/tokens_per_s", "learner/losses/ntp", "system/buffer/depth", "system/weights/version"):
        assert tag in tags, tag
    assert max(e.value for e in acc.Scalars("learner/vocab/refreshes")) >= 1
    assert "config" in " ".join(acc.Tags()["tensors"]) or acc.Tags().get("text")
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "summary.json").exists()
    assert load_eagle3(tmp_path / "draft").config.draft_vocab_size == 64


@pytest.fixture
def actors_of():
    """Start a run's actors; they are killed after the test so the next one gets the CPUs."""
    from aurora_rl.runtime.driver import prepare, start_actors, stop_actors

    started = []

    def make(cfg):
        traffic, draft, head, _ = prepare(cfg)
        started.append(start_actors(cfg, draft, head, Path(cfg.output_dir)))
        return traffic, started[-1]

    yield make
    for actors in started:
        stop_actors(actors)


def test_killed_rollout_worker_is_restarted_and_no_request_vanishes(local_ray, tmp_path, actors_of):
    from aurora_rl.runtime.dispatch import Dispatcher
    from aurora_rl.runtime.metrics import RunLogger

    cfg = tiny_config(tmp_path, max_requests=24)
    traffic, actors = actors_of(cfg)
    d = Dispatcher(cfg, actors, traffic, RunLogger(tmp_path, ""))
    d._feed()
    wait_for(lambda: ray.get(actors["workers"][0].stats.remote())["system/engine_steps"] > 2)
    in_flight_at_kill = len(d.in_flight[0])
    ray.kill(actors["workers"][0], no_restart=False)
    d.serve_until_budget()
    d.drain()
    c = d.counters()
    assert in_flight_at_kill > 0 and c["worker_restarts"] >= 1 and c["retried_requests"] >= 1
    assert c["answered"] == c["submitted"] == 24 and c["abandoned_requests"] == 0


def test_killed_learner_resumes_from_checkpoint_with_increasing_version(local_ray, tmp_path, actors_of):
    cfg = tiny_config(tmp_path)
    traffic, actors = actors_of(cfg)
    learner, worker = actors["learner"], actors["workers"][0]
    ray.get(learner.start.remote())
    worker.submit.remote([(f"r{i}", ids, traffic.params(cfg.workload, i)) for i, (ids, _) in enumerate(traffic.requests[:40])])
    wait_for(lambda: ray.get(learner.info.remote())["step"] >= 2, timeout=300)
    before = ray.get(learner.info.remote())["policy_version"]
    ray.kill(learner, no_restart=False)
    # ray.kill returns at once; wait for the restarted incarnation, which says where it resumed from.
    info = wait_for(lambda: (i := _try(lambda: ray.get(learner.info.remote(), timeout=5))) and i["resumed_from"] and i,
                    timeout=300)
    assert info["policy_version"] >= before - 1  # the checkpoint may lag the last update by one
    ray.get(learner.start.remote())
    worker.submit.remote([(f"s{i}", ids, traffic.params(cfg.workload, i)) for i, (ids, _) in enumerate(traffic.requests[40:80])])
    # The learner counts a version up inside its update and publishes it just after: wait on the store,
    # which is what the serving side reads.
    wait_for(lambda: ray.get(actors["store"].stats.remote())["weights/version"] > max(before, info["policy_version"]),
             timeout=300)
    assert ray.get(learner.info.remote())["policy_version"] > before


def test_non_finite_weights_are_never_published(local_ray, tmp_path, actors_of):
    cfg = tiny_config(tmp_path)
    _, actors = actors_of(cfg)
    learner, store = actors["learner"], actors["store"]
    before = ray.get(store.stats.remote())
    ray.get(learner.inject_nonfinite.remote())
    assert ray.get(learner.publish.remote()) is False
    after = ray.get(store.stats.remote())
    assert after["weights/refused_nonfinite"] == before["weights/refused_nonfinite"] + 1
    assert after["weights/version"] == before["weights/version"]


def _try(fn):
    try:
        return fn()
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None
