"""Model configuration for the target families we serve (Llama, Qwen2, Qwen3), read from a HF config.

One slotted dataclass, validated in ``__post_init__``, with named presets (a tiny one for tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture or options this runtime does not implement."""


@dataclass(slots=True)
class ModelConfig:
    """Shape and numerics of a decoder-only target model."""

    family: str = "llama"
    """One of ``llama``, ``qwen2``, ``qwen3``: decides attention biases and q/k norms."""
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 0
    """0 means ``hidden_size // num_heads``."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    """Empty for default RoPE, else HF's ``rope_parameters`` (``rope_type`` linear or llama3)."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    """Bias on q/k/v projections (always on for Qwen2)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tap_layers: tuple[int, ...] = ()
    """Layers whose outputs feed the EAGLE3 draft; empty means EAGLE3's (1, L/2-1, L-4)."""

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_ARCHITECTURES.values():
            raise UnsupportedModelError(
                f"family={self.family!r} is not supported; choose one of {sorted(set(SUPPORTED_ARCHITECTURES.values()))}"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope_type={rope_type!r} is not supported; choose one of {SUPPORTED_ROPE_TYPES}")
        if not self.tap_layers:
            n = self.num_layers
            self.tap_layers = (min(1, n - 1), max(n // 2 - 1, 0), max(n - 4, 0))
        bad = [i for i in self.tap_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"tap_layers {bad} out of range for num_layers={self.num_layers}")
        if self.family == "qwen2":
            self.attention_bias = True

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict; refuses architectures we do not implement."""
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = hf.get("model_type")
            family = model_type if model_type in SUPPORTED_ARCHITECTURES.values() else None
            if family is None:
                raise UnsupportedModelError(
                    f"architecture {archs or model_type!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
                )
        else:
            family = SUPPORTED_ARCHITECTURES[arch]
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        kwargs = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        kwargs.update(overrides)
        return cls(**kwargs)


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(),
    "tiny-llama": ModelConfig(
        family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
        num_heads=4, num_kv_heads=2, max_position_embeddings=512, eos_token_ids=(0,),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
