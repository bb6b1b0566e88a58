"""Load a Llama GGUF file as shipped: its q8_0 / q4_1 blocks go to the quantized kernels as they are.

``load_gguf_target(path, dtype, quant)`` reads the file with ``gguf.GGUFReader`` (memory-mapped raw
tensor bytes and their types), builds the config from the GGUF metadata, and:
- ``quant="auto"``: every projection (and the tied lm_head) stored as q8_0 or q4_1 runs on those blocks;
  other types (F32, F16, k-quants) run in float. ``"q8_0"`` / ``"q4_1"``: every projection in that format
  (blocks of the same format taken as stored, others requantized from their values). ``"none"``: float.
- The model's float parameters hold the blocks' dequantized values (our own dequantizer, not
  transformers'): the PyTorch path (training, shapes the kernels do not take) and the parity tests use
  them. Passes without gradients read only the blocks.
- llama.cpp's converter permutes the q and k rows (its RoPE pairs adjacent dimensions); those rows are
  put back in Hugging Face order, which permutes whole rows of blocks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from aurora_rl.models.config import ModelConfig
from aurora_rl.models.quant import QUANT_CHOICES, QuantBlocks, from_gguf, quantize, supports

log = logging.getLogger(__name__)

_BLOCK_TYPES = {"Q8_0": "q8_0", "Q4_1": "q4_1"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_config(reader) -> dict:
    """A Hugging Face style config dict from a Llama GGUF's metadata."""
    def field(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise ValueError(f"GGUF metadata has no {key!r}")
            return default
        value = f.parts[f.data[0]]
        return value.tobytes().decode() if value.dtype == np.uint8 else value.item()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported by the block loader; supported: ['llama']")
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    heads = int(field("llama.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"], "vocab_size": int(embd.shape[1]),
        "hidden_size": int(field("llama.embedding_length")), "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(field("llama.attention.head_count_kv", heads)),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id", -1)),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id", -1)),
    }


def _unpermute(t, heads: int):
    """llama.cpp's q/k row order -> Hugging Face's (rows [heads, 2, hd/2] from [heads, hd/2, 2])."""
    n = t.shape[0]
    index = torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(-1)
    return t.rows(index) if isinstance(t, QuantBlocks) else t[index]


def read_tensors(path: Path, hf: dict) -> dict[str, QuantBlocks | torch.Tensor]:
    """The file's tensors under Hugging Face names: ``QuantBlocks`` for q8_0 / q4_1, float32 otherwise."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    out: dict[str, QuantBlocks | torch.Tensor] = {}
    for t in reader.tensors:
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            hf_name = "model.embed_tokens.weight"
        elif name == "output":
            hf_name = "lm_head.weight"
        elif name == "output_norm":
            hf_name = "model.norm.weight"
        elif name.startswith("blk.") and name.split(".", 2)[2] in _LAYER_NAMES:
            _, layer, part = name.split(".", 2)
            hf_name = f"model.layers.{layer}.{_LAYER_NAMES[part]}.weight"
        elif name == "rope_freqs":
            continue
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        shape = [int(s) for s in reversed(t.shape)]  # GGUF lists dimensions innermost first
        kind = _BLOCK_TYPES.get(t.tensor_type.name)
        if kind is not None:
            value = from_gguf(kind, torch.from_numpy(np.array(t.data)).view(torch.uint8), *shape)  # a copy: the map is read-only
        else:
            value = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).view(shape)
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            value = _unpermute(value, hf["num_attention_heads"] if "q_proj" in hf_name else hf["num_key_value_heads"])
        out[hf_name] = value
    return out


def _as(blocks: QuantBlocks | torch.Tensor, quant: str) -> QuantBlocks | None:
    """The blocks a projection runs on under ``quant``, None for float."""
    if quant == "none":
        return None
    if isinstance(blocks, QuantBlocks):
        if quant in ("auto", blocks.kind):
            return blocks
        return quantize(blocks.dequantize(), quant)
    if quant == "auto" or not supports(*blocks.shape):
        return None
    return quantize(blocks, quant)


def load_gguf_target(path: Path, dtype: torch.dtype, quant: str = "auto", **overrides):
    """A TargetModel from a Llama GGUF file, its projections on quantized blocks per ``quant``."""
    from gguf import GGUFReader

    from aurora_rl.models.loader import build_target

    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant={quant!r} is not one of {list(QUANT_CHOICES)}")
    if not Path(path).exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    hf = hf_config(GGUFReader(str(path)))
    cfg = ModelConfig.from_hf(hf, **overrides)
    tensors = read_tensors(Path(path), hf)
    state = {n: t.dequantize() if isinstance(t, QuantBlocks) else t for n, t in tensors.items()}
    model = build_target(cfg, state, dtype)
    fused = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        groups = {f"layers.{i}.attn.qkv": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                  f"layers.{i}.attn.o": [p + "self_attn.o_proj.weight"],
                  f"layers.{i}.mlp.gate_up": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                  f"layers.{i}.mlp.down": [p + "mlp.down_proj.weight"]}
        for module, names in groups.items():
            parts = [_as(tensors[n], quant) for n in names]
            if all(b is not None for b in parts):
                kinds = {b.kind for b in parts}  # a fused weight needs one format: requantize to the first's
                parts = parts if len(kinds) == 1 else [b if b.kind == parts[0].kind else
                                                       quantize(b.dequantize(), parts[0].kind) for b in parts]
                fused[module] = QuantBlocks.cat(parts)
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    if (blocks := _as(head, quant)) is not None:
        fused["lm_head"] = blocks
    model.attach_quant(fused)
    log.info("GGUF target %s: quant=%s, %s", Path(path).name, quant, model.quant_summary())
    return model
