"""``aurora-rl serve`` end to end: state folder, actors, the routed HTTP front, the supervisor, a clean stop.

- State: one folder per target (``serve.state_dir``, default ``~/.cache/aurora_rl/serve/<target>``)
  holding ``checkpoints/`` (the learner's, resumed on start unless ``serve.resume=false``, which
  moves the old state aside into ``previous-<time>/``) and ``draft/`` (the EAGLE3 export of the last
  stop). A resumed start serves the checkpoint's draft at its policy version, so versions continue.
- The HTTP front runs in this process over a ``WorkerRouter``: it outlives any rollout worker.
- SIGINT and SIGTERM stop it: the front stops accepting, the learner checkpoints and exports the
  draft, the actors and Ray stop, and ``serve`` returns (the command exits 0).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray
from omegaconf import OmegaConf

from aurora_rl.config import RunConfig
from aurora_rl.runtime.metrics import RunLogger

log = logging.getLogger(__name__)
DEFAULT_STATE_ROOT = Path("~/.cache/aurora_rl/serve")


def state_dir(target: str, configured: str | None) -> Path:
    """The serve state folder: ``configured``, or one per target under ``DEFAULT_STATE_ROOT``."""
    if configured:
        return Path(configured).expanduser()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", target).strip("_.")[-100:] or "target"
    return DEFAULT_STATE_ROOT.expanduser() / slug


def prepare_state(folder: Path, resume: bool) -> Path:
    """The checkpoint folder in ``folder``; without ``resume``, earlier state moves to ``previous-<time>/``."""
    folder.mkdir(parents=True, exist_ok=True)
    old = [p for p in (folder / "checkpoints", folder / "draft") if p.exists()]
    if old and not resume:
        aside = folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for p in old:
            p.rename(aside / p.name)
        log.info("serve.resume=false: earlier state moved to %s", aside)
    return folder / "checkpoints"


def resumed_draft(checkpoints: Path):
    """``(draft, policy_version, path)`` of the latest checkpoint, or None."""
    from aurora_rl.training.checkpoint import latest_checkpoint, load_checkpoint

    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return None
    ckpt = load_checkpoint(latest)
    return ckpt.draft, int(ckpt.meta["policy_version"]), latest


class _StopOnSignal:
    """SIGINT and SIGTERM set an event (the main thread then stops cleanly) instead of raising."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _config_text(cfg: RunConfig) -> str:
    tree = OmegaConf.structured(cfg)
    if "serve" in tree and tree.serve.api_key is not None:
        tree.serve.api_key = "<redacted>"
    return OmegaConf.to_yaml(tree)


def run_server(cfg: RunConfig, host: str, port: int, learn: bool, api_key: str | None,
               duration_s: float | None) -> dict[str, Any]:
    from aurora_rl.runtime.driver import init_ray, prepare, start_actors, stop_actors
    from aurora_rl.runtime.router import WorkerRouter
    from aurora_rl.runtime.serve_supervisor import ServeSupervisor
    from aurora_rl.serving.http import create_app, serve as http_serve

    section = getattr(cfg, "serve", None)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = state_dir(cfg.model.target, getattr(section, "state_dir", None))
    checkpoints = prepare_state(state, getattr(section, "resume", True))
    _, draft, head, tokenizer = prepare(cfg)
    version, resumed = 0, resumed_draft(checkpoints)
    if resumed is not None:
        draft, version, path = resumed
        print(f"resuming from {path} (policy version {version})", flush=True)
    logger = RunLogger(out, _config_text(cfg))
    started = init_ray(cfg)
    actors: dict[str, Any] = {}
    handle = router = supervisor = None
    result: dict[str, Any] = {"state_dir": str(state), "resumed_version": version if resumed else None}
    with _StopOnSignal() as stop:
        try:
            actors = start_actors(cfg, draft, head, out, checkpoint_dir=checkpoints, version=version)
            if learn:
                ray.get(actors["learner"].start.remote())
            supervisor = ServeSupervisor(actors, learn, cfg.learner.batch_traces,
                                         getattr(section, "stall_after_s", 120.0), logger)
            router = WorkerRouter(actors["workers"], cfg.engine.max_len, tokenizer is not None,
                                  extra_health=supervisor.health)
            supervisor.router = router
            supervisor.start()
            name = cfg.model.target if cfg.model.target != "smollm2" else "SmolLM2-135M-Instruct"
            app = create_app(router, tokenizer, name, api_key=api_key)
            supervisor.request_counts = app.state.front.counts  # answered, rejected, retryable errors, aborts
            handle = http_serve(app, host=host, port=port)
            print(f"serving {name} at {handle.url}/v1 (learning {'on' if learn else 'off'}, state {state}); "
                  "Ctrl-C or SIGTERM to stop", flush=True)
            stop.event.wait(duration_s)
            print(f"stopping ({signal.Signals(stop.signum).name if stop.signum else 'duration reached'})",
                  flush=True)
        finally:
            if handle is not None:
                handle.stop()
            if supervisor is not None:
                supervisor.stop()
                if learn:
                    try:
                        result.update(supervisor.save(state))
                        print(f"saved policy version {result['policy_version']} to {state}", flush=True)
                    except Exception as exc:  # noqa: BLE001 - reported; the actors and Ray must still stop
                        log.exception("saving the learner's state on stop failed")
                        result["save_error"] = f"{type(exc).__name__}: {exc}"
            if router is not None:
                router.stop()
            stop_actors(actors)
            if started:
                ray.shutdown()
            logger.close()
    return result
