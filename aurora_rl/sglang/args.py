"""SGLang server arguments: a validated config and the ``sglang.launch_server`` command line it becomes.

Flag names are those of the pinned release (``SGLANG_VERSION``): in 0.5.22 every CLI flag is the
field name of a ``sglang/srt/arg_groups/fields/*.py`` dataclass with ``_`` turned into ``-``
(``arg_utils._field_to_cli_name``). Validation happens here, before anything is launched, so a bad
value fails in the driver with the field's name instead of minutes later inside a GPU job.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from typing import Any

SGLANG_VERSION = "0.5.22"
"""The release whose HTTP API and flags this package was written against (the ``sglang`` extra's pin)."""

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""``--dtype`` choices in sglang 0.5.22 (``fields/model.py``)."""

_OWNED_FLAGS = ("--model-path", "--speculative-algorithm", "--speculative-draft-model-path",
                "--speculative-draft-model", "--speculative-num-steps", "--speculative-eagle-topk",
                "--speculative-num-draft-tokens", "--tp-size", "--tensor-parallel-size", "--mem-fraction-static",
                "--dtype", "--host", "--port", "--max-running-requests", "--context-length")


@dataclass
class SGLangServerConfig:
    """One SGLang replica serving the target with our EAGLE3 draft."""

    model_path: str
    """Target model: a Hugging Face folder or hub id (what ``--model-path`` takes)."""
    draft_path: str
    """EAGLE3 draft folder in the layout ``aurora_rl.models.eagle3_io.save_eagle3`` writes."""
    host: str = "127.0.0.1"
    """Interface the HTTP server binds to."""
    port: int = 30000
    """HTTP port."""
    tp_size: int = 1
    """Tensor-parallel size (GPUs per replica)."""
    speculative_num_steps: int = 4
    """Draft forward passes per verify step (our lookahead for a chain)."""
    speculative_eagle_topk: int = 1
    """Branching per draft step: 1 is a chain (what our traces and lookahead mean); >1 a tree."""
    speculative_num_draft_tokens: int = 5
    """Tokens the target verifies per step; a chain needs exactly ``speculative_num_steps + 1``."""
    mem_fraction_static: float | None = 0.8
    """Share of GPU memory for weights plus KV cache (None = SGLang's own choice)."""
    dtype: str = "auto"
    """Weights/activations dtype, one of ``DTYPES``."""
    max_running_requests: int | None = None
    """Concurrent requests (None = SGLang's default); our ``engine.num_slots``."""
    context_length: int | None = None
    """Context limit (None = the model's); our ``engine.max_len``."""
    python: str = sys.executable
    """Interpreter that has ``sglang[srt]`` installed."""
    extra_args: list[str] = field(default_factory=list)
    """Further ``launch_server`` flags, passed as given (they may not repeat a flag set above)."""

    def __post_init__(self) -> None:
        for name in ("model_path", "draft_path", "host", "python"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"SGLangServerConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"SGLangServerConfig.port must be in 1..65535, got {self.port}")
        for name in ("tp_size", "speculative_num_steps", "speculative_eagle_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"SGLangServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        steps, topk, tokens = self.speculative_num_steps, self.speculative_eagle_topk, self.speculative_num_draft_tokens
        if topk == 1 and tokens != steps + 1:
            # sglang silently rewrites it (speculative_hook.py); we refuse so the config says what runs.
            raise ValueError(f"SGLangServerConfig.speculative_num_draft_tokens must be speculative_num_steps + 1 = "
                             f"{steps + 1} for a chain (speculative_eagle_topk=1), got {tokens}")
        if topk > 1 and not 2 <= tokens <= steps * topk + 1:
            raise ValueError(f"SGLangServerConfig.speculative_num_draft_tokens must be in 2..{steps * topk + 1} "
                             f"(steps * topk + 1) for a tree, got {tokens}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"SGLangServerConfig.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.dtype not in DTYPES:
            raise ValueError(f"SGLangServerConfig.dtype={self.dtype!r} is not one of {list(DTYPES)}")
        for name in ("max_running_requests", "context_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"SGLangServerConfig.{name} must be >= 1 or None, got {getattr(self, name)}")
        self.extra_args = [str(a) for a in self.extra_args]
        clash = sorted({a.split("=", 1)[0] for a in self.extra_args} & set(_OWNED_FLAGS))
        if clash:
            raise ValueError(f"SGLangServerConfig.extra_args repeats {clash}: set the matching field instead")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def lookahead(self) -> int:
        return self.speculative_num_steps

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SGLangServerConfig":
        """Build from a plain mapping (e.g. the ``engine.sglang`` block); unknown keys are errors."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown SGLang server argument(s) {unknown}; valid: {valid}")
        return cls(**values)

    @classmethod
    def from_engine(cls, engine: Any, model_path: str, draft_path: str, **overrides: Any) -> "SGLangServerConfig":
        """Map our engine section onto a chain: lookahead -> steps, num_slots -> max_running_requests,
        max_len -> context_length; an ``engine.sglang`` mapping (if the schema has one) and ``overrides``
        set the rest. With token trees (``engine.tree_topk`` > 0) the tree settings our engine uses set the
        server's: tree_depth -> steps, tree_topk -> ``--speculative-eagle-topk``, tree_budget + 1 ->
        ``--speculative-num-draft-tokens`` (the root counts there)."""
        values: dict[str, Any] = {
            "model_path": model_path, "draft_path": draft_path,
            "speculative_num_steps": engine.lookahead, "speculative_eagle_topk": 1,
            "speculative_num_draft_tokens": engine.lookahead + 1,
            "max_running_requests": engine.num_slots, "context_length": engine.max_len,
        }
        server = split_engine_options(dict(getattr(engine, "sglang", None) or {})).server
        values.update(server)
        if getattr(engine, "tree_topk", 0) > 0:  # token trees: the same settings as our engine's trees
            tree = {"speculative_num_steps": engine.tree_depth, "speculative_eagle_topk": engine.tree_topk,
                    "speculative_num_draft_tokens": engine.tree_budget + 1}
            for key, value in tree.items():
                if key in server and server[key] != value:
                    raise ValueError(f"SGLangServerConfig.{key}={server[key]} contradicts engine.tree_topk/"
                                     f"tree_budget/tree_depth, which set it to {value}; set those instead")
            values.update(tree)
        values.update(overrides)
        if values.get("speculative_eagle_topk", 1) == 1 and "speculative_num_draft_tokens" not in overrides:
            values["speculative_num_draft_tokens"] = values["speculative_num_steps"] + 1
        return cls.from_dict(values)


@dataclass
class SGLangWorkerOptions:
    """The ``engine.sglang`` keys that configure the rollout worker rather than the server."""

    url: str | None = None
    """Attach to this running server (on the worker's host) instead of launching one per worker."""
    api_key: str | None = None
    """Bearer token of an attached server started with ``--api-key``."""
    startup_timeout_s: float = 1800.0
    """How long a launched server may take to become healthy (weights load, CUDA graphs)."""
    weight_poll_s: float = 1.0
    """Seconds between checks for newer draft weights in the WeightStore (there are no engine steps
    to count here, so ``engine.weight_poll_steps`` does not apply)."""
    export_dir: str | None = None
    """Folder for the exported EAGLE3 drafts, one per version (None: ``sglang/`` in the run directory)."""

    def __post_init__(self) -> None:
        if self.url is not None and not str(self.url).startswith(("http://", "https://")):
            raise ValueError(f"engine.sglang.url must start with http:// or https://, got {self.url!r}")
        for name in ("startup_timeout_s", "weight_poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"engine.sglang.{name} must be > 0, got {getattr(self, name)}")


ENGINE_OWNED = {"model_path": "model.target", "draft_path": "model.draft",
                "speculative_num_steps": "engine.lookahead", "max_running_requests": "engine.num_slots",
                "context_length": "engine.max_len"}
"""Server arguments that follow from other config keys; ``engine.sglang`` may not set them."""


@dataclass
class SGLangEngineOptions:
    worker: SGLangWorkerOptions
    server: dict[str, Any]
    """The remaining keys: ``SGLangServerConfig`` fields."""


def split_engine_options(values: dict[str, Any]) -> SGLangEngineOptions:
    """Split an ``engine.sglang`` mapping into worker options and server arguments.

    Unknown keys and keys owned by another config section are errors naming ``engine.sglang.<key>``.
    """
    worker_keys = [f.name for f in fields(SGLangWorkerOptions)]
    server_keys = [f.name for f in fields(SGLangServerConfig) if f.name not in ENGINE_OWNED]
    for key in sorted(values):
        if key in ENGINE_OWNED:
            raise ValueError(f"engine.sglang.{key} is set from {ENGINE_OWNED[key]}; set that instead")
        if key not in worker_keys and key not in server_keys:
            raise ValueError(f"engine.sglang.{key} is not a valid key; valid: {sorted(worker_keys + server_keys)}")
    worker = SGLangWorkerOptions(**{k: v for k, v in values.items() if k in worker_keys})
    return SGLangEngineOptions(worker, {k: v for k, v in values.items() if k in server_keys})


def check_engine_section(engine: Any) -> SGLangEngineOptions:
    """Validate ``engine`` (an ``EngineSection`` with ``kind=sglang``) as the server will see it,
    before anything starts; every error names the config key (``engine.sglang.tp_size``, ...)."""
    options = split_engine_options(dict(engine.sglang or {}))
    try:
        SGLangServerConfig.from_engine(engine, model_path="<model.target>", draft_path="<exported draft>")
    except (ValueError, TypeError) as err:
        raise ValueError(str(err).replace("SGLangServerConfig.", "engine.sglang.")) from None
    return options


def build_launch_command(cfg: SGLangServerConfig) -> list[str]:
    """``python -m sglang.launch_server ...`` for ``cfg`` (EAGLE3 speculation with our draft)."""
    cmd = [cfg.python, "-m", "sglang.launch_server",
           "--model-path", cfg.model_path,
           "--speculative-algorithm", "EAGLE3",
           "--speculative-draft-model-path", cfg.draft_path,
           "--speculative-num-steps", str(cfg.speculative_num_steps),
           "--speculative-eagle-topk", str(cfg.speculative_eagle_topk),
           "--speculative-num-draft-tokens", str(cfg.speculative_num_draft_tokens),
           "--tp-size", str(cfg.tp_size),
           "--dtype", cfg.dtype,
           "--host", cfg.host, "--port", str(cfg.port)]
    if cfg.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.max_running_requests is not None:
        cmd += ["--max-running-requests", str(cfg.max_running_requests)]
    if cfg.context_length is not None:
        cmd += ["--context-length", str(cfg.context_length)]
    return cmd + cfg.extra_args


def check_installed_version(python: str = sys.executable) -> str | None:
    """The sglang version installed for ``python`` (None if absent), read from package metadata
    in a subprocess so this process never imports sglang; logs nothing, the caller decides."""
    import subprocess

    probe = "import importlib.metadata as m\ntry: print(m.version('sglang'))\nexcept m.PackageNotFoundError: pass"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip() or None
