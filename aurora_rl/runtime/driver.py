"""The driver: wires rollout workers, the trace buffer, the weight store and the learner, then runs.

``run(cfg)`` reads top to bottom: start (or join) Ray, build traffic and the day-0 draft, start the
actors, serve and learn until the time or request budget is spent, stop the learner (checkpoint and
EAGLE3 export), evaluate the final draft against no speculation on held-out prompts, and write
TensorBoard events, ``summary.json`` and ``curves.png`` into the run directory.
``serve(cfg, ...)`` starts the same actors and serves the OpenAI-compatible HTTP front from this process,
routed over every rollout worker (``aurora_rl.runtime.serve``: recovery, state across restarts).
Rollout workers are ``RolloutWorker`` (our engine) or, with ``engine.kind=sglang`` / ``vllm``, ``SGLangWorker`` /
``VLLMWorker`` (``runtime.external_worker``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from omegaconf import OmegaConf

from aurora_rl.config import RunConfig, validate
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.runtime.dispatch import Dispatcher
from aurora_rl.runtime.factory import initial_draft, load_target_model
from aurora_rl.runtime.metrics import RunLogger, format_table
from aurora_rl.runtime.traffic import Traffic, build_traffic, vocab_sample

log = logging.getLogger(__name__)
WORKER_CONCURRENCY = 32
"""Threads per rollout worker actor: streaming requests from the HTTP front plus control calls."""


def init_ray(cfg: RunConfig) -> bool:
    """Join ``cluster.address`` or start a local Ray; returns True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, log_to_driver=False)
    else:
        start_local_ray(cfg.cluster.num_cpus)
    return True


def start_local_ray(num_cpus: int | None) -> None:
    """A one-machine Ray whose servers (GCS, raylet, object manager, workers) listen on 127.0.0.1 only.

    Ray binds its gRPC servers to the node address, and ``ray.init`` replaces a loopback
    ``_node_ip_address`` with the machine's external address (for multi-node clusters); a local
    cluster has no other node, so that replacement is skipped while this call starts it.
    """
    from ray._private import services

    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    finally:
        services.resolve_ip_for_localhost = resolve


def rollout_worker_class(cfg: RunConfig, out: Path) -> tuple[type, dict[str, Any]]:
    """The rollout actor for ``engine.kind`` and the extra keyword arguments it takes."""
    if cfg.engine.kind == "sglang":
        from aurora_rl.runtime.sglang_worker import SGLangWorker

        return SGLangWorker, {"export_dir": str(out / "sglang")}
    if cfg.engine.kind == "vllm":
        from aurora_rl.runtime.vllm_worker import VLLMWorker

        return VLLMWorker, {"export_dir": str(out / "vllm")}
    from aurora_rl.runtime.rollout import RolloutWorker

    return RolloutWorker, {}


def start_actors(cfg: RunConfig, draft: Eagle3Draft, head, out: Path, checkpoint_dir: Path | None = None,
                 version: int = 0) -> dict[str, Any]:
    """Buffer, store (holding ``draft`` as ``version``), rollout workers and the learner (checkpoints in
    ``checkpoint_dir``, default ``out/checkpoints``; it resumes from the latest one there)."""
    from aurora_rl.runtime.buffer import TraceBuffer
    from aurora_rl.runtime.learner_actor import LearnerActor
    from aurora_rl.runtime.weights import WeightStore

    buffer = ray.remote(TraceBuffer).options(num_cpus=0).remote(cfg.buffer, cfg.seed)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    initial = (version, [ray.put(draft.state_dict())])
    ray.get(store.publish.remote(version, initial[1]))
    head_ref = [ray.put(head)]
    c = cfg.cluster
    worker_cls, extra = rollout_worker_class(cfg, out)
    workers = [
        ray.remote(worker_cls).options(num_cpus=c.rollout_cpus, num_gpus=c.rollout_gpus, max_restarts=-1,
                                       max_concurrency=WORKER_CONCURRENCY, name=None).remote(
            i, cfg.model, cfg.engine, draft.config, initial, buffer, store, cfg.seed, max(1, int(c.rollout_cpus)),
            **extra)
        for i in range(c.rollout_workers)
    ]
    learner = ray.remote(LearnerActor).options(num_cpus=c.learner_cpus, num_gpus=c.learner_gpus, max_restarts=-1,
                                                max_concurrency=4).remote(
        cfg.learner, cfg.algorithm, cfg.workload, draft.config, initial, head_ref, buffer, store,
        str(checkpoint_dir or out / "checkpoints"), max(1, int(c.learner_cpus)))
    ray.get([w.ping.remote() for w in workers] + [learner.info.remote()])
    # The constructor arguments must outlive the actors: Ray re-reads them when it restarts one.
    return {"buffer": buffer, "store": store, "workers": workers, "learner": learner, "initial": initial,
            "head": head_ref}


def stop_actors(actors: dict[str, Any]) -> None:
    """Kill the run's actors (they hold CPUs in a cluster that outlives the run)."""
    for key in ("workers", "learner", "buffer", "store"):
        for actor in actors.get(key, []) if key == "workers" else [actors.get(key)]:
            if actor is not None:
                ray.kill(actor, no_restart=True)


def prepare(cfg: RunConfig) -> tuple[Traffic, Eagle3Draft, Any, Any]:
    """Traffic, the day-0 draft, the target's lm_head (for the learner) and the tokenizer."""
    target, tokenizer = load_target_model(cfg.model, cfg.seed)
    traffic = build_traffic(cfg.workload, tokenizer, target.config.vocab_size, cfg.seed)
    draft = initial_draft(cfg.model, target, vocab_sample(traffic, cfg.model.vocab_sample), cfg.seed)
    return traffic, draft, target.lm_head.weight.detach().float().clone(), tokenizer


def evaluate(cfg: RunConfig, worker, traffic: Traffic) -> dict[str, float | None]:
    """Final draft vs no speculation on held-out prompts, on one worker with no other traffic.

    An SGLang or vLLM replica speculates with the lookahead it was started with, so it has no baseline
    without speculation: ``plain_tokens_per_s`` and ``speedup`` are None there.
    """
    prompts = [p for ps in traffic.held_out.values() for p in (ps[: cfg.eval.prompts] if cfg.eval.prompts else ps)]
    params = {"max_tokens": cfg.eval.max_tokens, "temperature": 0.0}
    spec = ray.get(worker.evaluate.remote(prompts, params, cfg.engine.lookahead, cfg.eval.batch_size))
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    result = {"prompts": len(prompts), "lookahead": cfg.engine.lookahead,
              "accept_length": mean(spec, "accept_length"), "spec_tokens_per_s": mean(spec, "tokens_per_s"),
              "plain_tokens_per_s": None, "speedup": None}
    if cfg.engine.kind == "native":
        plain = ray.get(worker.evaluate.remote(prompts, params, 0, cfg.eval.batch_size))
        result["plain_tokens_per_s"] = mean(plain, "tokens_per_s")
        result["speedup"] = result["spec_tokens_per_s"] / result["plain_tokens_per_s"]
        # The serving default: the adaptive controller picks k in 0..lookahead each step.
        adaptive = ray.get(worker.evaluate.remote(prompts, params, None, cfg.eval.batch_size))
        result["adaptive_accept_length"] = mean(adaptive, "accept_length")
        result["adaptive_tokens_per_s"] = mean(adaptive, "tokens_per_s")
        result["adaptive_speedup"] = result["adaptive_tokens_per_s"] / result["plain_tokens_per_s"]
    return result


def run(cfg: RunConfig) -> dict[str, Any]:
    validate(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(out, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    traffic, draft, head, _ = prepare(cfg)
    started = init_ray(cfg)
    actors: dict[str, Any] = {}
    try:
        actors = start_actors(cfg, draft, head, out)
        ray.get(actors["learner"].start.remote())
        dispatch = Dispatcher(cfg, actors, traffic, logger)
        dispatch.serve_until_budget()
        final = ray.get(actors["learner"].stop.remote())
        dispatch.poll_learner()  # metrics of the last updates
        ray.get(actors["learner"].checkpoint.remote())
        ray.get(actors["learner"].export.remote(str(out / "draft")))
        dispatch.drain()
        summary = {
            "name": cfg.name, "algorithm": cfg.algorithm.name, "seed": cfg.seed,
            "requests_served": len(logger.requests), "final_policy_version": final["policy_version"],
            "learner_steps": final["step"], "start": logger.window("start"), "end": logger.window("end"),
            "counters": dispatch.counters(), "skipped_prompts": traffic.skipped,
            "eval": evaluate(cfg, actors["workers"][0], traffic) if cfg.eval.enabled else None,
            "output_dir": str(out),
        }
        for w in actors["workers"]:
            ray.get(w.shutdown.remote())
    finally:
        stop_actors(actors)
        if started:
            ray.shutdown()
    logger.write_summary(summary)
    logger.plot(out / "curves.png")
    logger.close()
    summary["table"] = format_table(summary)
    return summary


def serve(cfg: RunConfig, host: str = "127.0.0.1", port: int = 8000, learn: bool = True,
          api_key: str | None = None, duration_s: float | None = None) -> dict[str, Any]:
    """Serve the OpenAI-compatible API until SIGINT/SIGTERM (or ``duration_s``); see ``runtime.serve``."""
    validate(cfg)
    if cfg.engine.kind != "native":
        raise ValueError(f"serve needs engine.kind=native: with engine.kind={cfg.engine.kind}, the engine serves "
                         "its own OpenAI-compatible API (see docs/SGLANG.md), not ours")
    from aurora_rl.runtime.serve import run_server

    return run_server(cfg, host, port, learn, api_key, duration_s)
