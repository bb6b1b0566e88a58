"""The ``aurora-rl`` command line: compose the Hydra config, check it, then hand it to the runtime.

    aurora-rl [--multirun] [overrides]     online serve+learn run            -> driver.run
    aurora-rl serve [overrides]            OpenAI-compatible HTTP server     -> driver.serve
    aurora-rl offline --traces ... [...]   train a draft on recorded traces  -> aurora_rl.training.offline
    aurora-rl bench [...]                  benchmarks                        -> aurora_rl.bench

The config tree is ``conf/`` (``config.yaml`` for runs, ``serve.yaml`` for the server). A bad
config (bad choice, bad value, bad algorithm argument, inconsistent sections) exits with status 2
and one line naming the key, before Ray, models or data are touched; Hydra itself rejects unknown
keys, values of the wrong type and unknown group options (status 1, naming the key). Only this
module prints; the library logs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aurora_rl.config import RunConfig, register_configs, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The Hydra config tree (the repository's ``conf/``; the package is installed editable)."""
CONFIG_ERROR_EXIT = 2


@dataclass
class ServeSection:
    """The HTTP front of ``aurora-rl serve``."""

    host: str = "127.0.0.1"
    """Interface to bind (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port of the OpenAI-compatible API (``/v1``)."""
    learn: bool = True
    """Train the draft on the served traffic (false = serve with the fixed draft)."""
    api_key: Optional[str] = None
    """Bearer token clients must send (None = no authentication); conf reads ``AURORA_RL_API_KEY``.
    It is never written to disk: serve writes no ``.hydra/`` folder, only a ``config.yaml`` with the key
    redacted."""
    api_key_file: Optional[str] = None
    """A file whose first line is the bearer token (instead of ``api_key``)."""
    duration_s: Optional[float] = None
    """Stop after this many seconds (None = until Ctrl-C, SIGINT or SIGTERM)."""
    state_dir: Optional[str] = None
    """Where serve keeps what it learned: ``checkpoints/`` and the exported EAGLE3 ``draft/``
    (None = ``~/.cache/aurora_rl/serve/<target>``, one folder per target)."""
    resume: bool = True
    """Start from the latest checkpoint in ``state_dir`` (false: move the old state aside and start fresh)."""
    stall_after_s: float = 120.0
    """``/health`` says degraded when traces wait for the learner and no new draft came for this long."""


@dataclass
class ServeConfig(RunConfig):
    """A run config plus the ``serve`` section (``aurora-rl serve``)."""

    serve: ServeSection = field(default_factory=ServeSection)


def register_schemas() -> None:
    """Register the schemas ``conf/`` composes from: group ``schema`` with options ``run`` and ``serve``.

    A group (rather than a single schema) lets ``serve.yaml`` reuse ``config.yaml`` and swap in the
    larger ``ServeConfig`` with ``override schema: serve``.
    """
    from hydra.core.config_store import ConfigStore

    register_configs()
    cs = ConfigStore.instance()
    cs.store(group="schema", name="run", node=RunConfig, package="_global_")
    cs.store(group="schema", name="serve", node=ServeConfig, package="_global_")


class ConfigError(ValueError):
    """A composed config that does not make a valid run; the message names the key."""


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed, validated config (``RunConfig`` or ``ServeConfig``); ConfigError otherwise."""
    try:
        run_cfg = OmegaConf.to_object(cfg)
        assert isinstance(run_cfg, RunConfig), type(run_cfg)
        validate(run_cfg)
    except OmegaConfBaseException as err:
        first = str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{key}: {first}" if key and key not in first else first) from err
    except (ValueError, TypeError) as err:
        # TypeError: an algorithm.args key the algorithm's config dataclass does not have.
        raise ConfigError(str(err)) from err
    return run_cfg


def compose(overrides: list[str], output_dir: str | Path) -> RunConfig:
    """The validated RunConfig for ``overrides``, exactly as ``aurora-rl <overrides>`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*overrides, f"output_dir={output_dir}"])
    return to_run_config(cfg)


def _checked(cfg: DictConfig) -> RunConfig:
    try:
        return to_run_config(cfg)
    except ConfigError as err:
        print(f"aurora-rl: config error: {err}", file=sys.stderr)
        raise SystemExit(CONFIG_ERROR_EXIT) from None


def _run(cfg: DictConfig) -> None:
    run_cfg = _checked(cfg)
    from aurora_rl.runtime import driver

    summary = driver.run(run_cfg)
    print(summary.get("table") or json.dumps(summary, indent=2, default=str))
    print(f"run directory: {run_cfg.output_dir}")


def read_api_key(section: ServeSection) -> str | None:
    """The bearer token from ``serve.api_key`` or the first line of ``serve.api_key_file``."""
    if section.api_key_file is None:
        return section.api_key
    if section.api_key is not None:
        raise ConfigError("serve.api_key and serve.api_key_file are both set: give one")
    path = Path(section.api_key_file).expanduser()
    try:
        key = path.read_text().splitlines()[0].strip() if path.stat().st_size else ""
    except OSError as err:
        raise ConfigError(f"serve.api_key_file={section.api_key_file!r}: cannot read it ({err.strerror})") from err
    if not key:
        raise ConfigError(f"serve.api_key_file={section.api_key_file!r} is empty")
    return key


def write_redacted_config(cfg: ServeConfig) -> Path:
    """The run's config as YAML in its output folder, with the API key replaced by ``<redacted>``."""
    tree = OmegaConf.structured(cfg)
    if tree.serve.api_key is not None:
        tree.serve.api_key = "<redacted>"
    path = Path(cfg.output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(tree))
    return path


def _serve(cfg: DictConfig) -> None:
    serve_cfg = _checked(cfg)
    assert isinstance(serve_cfg, ServeConfig), type(serve_cfg)
    from aurora_rl.runtime import driver

    s = serve_cfg.serve
    try:
        api_key = read_api_key(s)
    except ConfigError as err:
        print(f"aurora-rl: config error: {err}", file=sys.stderr)
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    write_redacted_config(serve_cfg)
    driver.serve(serve_cfg, host=s.host, port=s.port, learn=s.learn, api_key=api_key, duration_s=s.duration_s)


def _hydra_main(config_name: str, task, argv: list[str]) -> None:
    import hydra

    register_schemas()
    # Hydra parses sys.argv itself; hand it only the overrides and Hydra flags.
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``aurora-rl`` console script; subcommands are picked before Hydra runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command == "offline":
        from aurora_rl.training.offline import main as offline_main

        offline_main(argv[1:])
    elif command == "bench":
        from aurora_rl.bench import main as bench_main

        bench_main(argv[1:])
    elif command == "serve":
        _hydra_main("serve", _serve, argv[1:])
    else:
        _hydra_main("config", _run, argv)


if __name__ == "__main__":
    main()
