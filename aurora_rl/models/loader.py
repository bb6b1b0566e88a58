"""Load a target model from a Hugging Face folder (safetensors), a hub id, or a GGUF file.

Weights are read with safetensors only (never unpickled). Names are mapped strictly: a missing or
unexpected tensor, or a shape mismatch, is an error naming it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from aurora_rl.models.config import ModelConfig
from aurora_rl.models.target import TargetModel

log = logging.getLogger(__name__)

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


class WeightLoadError(ValueError):
    """A checkpoint whose tensors do not match the model they are loaded into."""


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint folder."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder} (pickled .bin checkpoints are not loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def hf_to_native(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to our module names, fusing q/k/v and gate/up projections."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[int, str], torch.Tensor] = {}
    simple = {
        "input_layernorm.weight": "input_norm.weight",
        "post_attention_layernorm.weight": "post_norm.weight",
        "self_attn.o_proj.weight": "attn.o.weight",
        "self_attn.q_norm.weight": "attn.q_norm.weight",
        "self_attn.k_norm.weight": "attn.k_norm.weight",
        "mlp.down_proj.weight": "mlp.down.weight",
    }
    unexpected = []
    for name, t in state.items():
        if name == "model.embed_tokens.weight":
            out["embed.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out["lm_head.weight"] = t
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        elif (m := _LAYER.fullmatch(name)) and m.group(2) in simple:
            out[f"layers.{m.group(1)}.{simple[m.group(2)]}"] = t
        elif m := _LAYER.fullmatch(name):
            pending[(int(m.group(1)), m.group(2))] = t
        else:
            unexpected.append(name)
    missing = []
    for i in range(cfg.num_layers):
        groups = {f"layers.{i}.attn.qkv.weight": [f"self_attn.{p}_proj.weight" for p in "qkv"],
                  f"layers.{i}.mlp.gate_up.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"]}
        if cfg.attention_bias:
            groups[f"layers.{i}.attn.qkv.bias"] = [f"self_attn.{p}_proj.bias" for p in "qkv"]
        for fused, names in groups.items():
            parts = [pending.pop((i, n), None) for n in names]
            missing += [f"model.layers.{i}.{n}" for n, p in zip(names, parts) if p is None]
            if all(p is not None for p in parts):
                out[fused] = torch.cat(parts, dim=0)
    if missing:
        raise WeightLoadError(f"checkpoint is missing tensors: {missing[:8]}")
    unexpected += [f"model.layers.{i}.{n}" for i, n in pending]
    if unexpected:
        raise WeightLoadError(f"unexpected tensors in checkpoint: {sorted(unexpected)[:8]}")
    return out


def build_target(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> TargetModel:
    """A TargetModel with ``state`` (HF names) loaded strictly, cast to ``dtype``."""
    native = hf_to_native(state, cfg)
    with torch.device("meta"):
        model = TargetModel(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(native) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if missing:
        raise WeightLoadError(f"checkpoint is missing tensors: {missing[:8]}")
    for name, t in native.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise WeightLoadError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in native.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rope = type(model.rope)(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, dtype)
    return model.eval()


def load_target(source: str | Path, dtype: torch.dtype = torch.bfloat16, quant: str = "none",
                **overrides) -> TargetModel:
    """Load from a HF folder, a ``.gguf`` file, or a hub id (needs a network). ``quant``
    (``quant.QUANT_CHOICES``): a GGUF's q8_0 / q4_1 blocks are served as stored with ``auto``
    (``gguf_weights``); ``q8_0`` / ``q4_1`` quantize every projection (requantizing other formats);
    ``auto`` on a float checkpoint and ``none`` keep float weights."""
    from aurora_rl.models.quant import QUANT_CHOICES

    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant={quant!r} is not one of {list(QUANT_CHOICES)}")
    path = Path(source)
    if path.suffix == ".gguf":
        if quant != "none":
            from aurora_rl.models.gguf_weights import load_gguf_target

            return load_gguf_target(path, dtype, quant, **overrides)
        return _load_gguf(path, dtype, **overrides)
    model = _load_float(source, path, dtype, **overrides)
    if quant in ("q8_0", "q4_1"):
        quantize_target(model, quant)
    return model


def quantize_target(model: TargetModel, kind: str) -> TargetModel:
    """Quantize every projection whose K is whole blocks (and the lm_head) to ``kind`` from its float weight."""
    from aurora_rl.models.layers import Linear
    from aurora_rl.models.quant import quantize, supports

    blocks = {name: quantize(m.weight.detach(), kind) for name, m in model.named_modules()
              if isinstance(m, Linear) and supports(m.out_features, m.in_features)}
    model.attach_quant(blocks)
    log.info("target quantized to %s: %s", kind, model.quant_summary())
    return model


def _load_float(source: str | Path, path: Path, dtype: torch.dtype, **overrides) -> TargetModel:
    if not path.exists():
        if "/" not in str(source) or str(source).startswith((".", "/")):
            raise FileNotFoundError(f"model path {source} does not exist (and is not a hub id like org/name)")
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} is missing: not a Hugging Face model folder")
    cfg = ModelConfig.from_hf(json.loads(config_file.read_text()), **overrides)
    log.info("loading %s target from %s", cfg.family, path)
    return build_target(cfg, read_safetensors_folder(path), dtype)


def _load_gguf(path: Path, dtype: torch.dtype, **overrides) -> TargetModel:
    """Dequantise a GGUF file with transformers (needs the gguf package), then load it as ours."""
    from transformers import AutoModelForCausalLM

    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cfg = ModelConfig.from_hf(hf.config.to_dict(), **overrides)
    return build_target(cfg, dict(hf.state_dict()), dtype)
