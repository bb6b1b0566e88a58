"""Save and load the draft in the EAGLE3 Hugging Face layout that SGLang and vLLM load.

Layout (as SGLang's ``LlamaForCausalLMEagle3`` loader reads it): ``config.json`` with
``architectures: ["LlamaForCausalLMEagle3"]``, ``num_hidden_layers: 1``, ``vocab_size`` (target),
``draft_vocab_size``, ``target_hidden_size``; ``model.safetensors`` with ``fc.weight`` [H, 3H],
``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight``,
``midlayer.self_attn.{q,k,v,o}_proj.weight`` (q/k/v take 2H inputs), ``midlayer.mlp.{gate,up,down}_proj
.weight``, ``norm.weight``, ``lm_head.weight`` [draft_vocab, H], ``d2t`` (int64 offsets: target id =
draft id + d2t[draft id]), ``t2d`` (bool over the target vocab), optionally ``embed_tokens.weight``.
Writes are atomic: a folder is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aurora_rl.models.draft import DraftConfig, Eagle3Draft

ARCHITECTURE = "LlamaForCausalLMEagle3"
_SIMPLE = {
    "fc.weight": "fc.weight",
    "input_norm.weight": "midlayer.input_layernorm.weight",
    "hidden_norm.weight": "midlayer.hidden_norm.weight",
    "post_norm.weight": "midlayer.post_attention_layernorm.weight",
    "o.weight": "midlayer.self_attn.o_proj.weight",
    "mlp.down.weight": "midlayer.mlp.down_proj.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def eagle3_config(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    rope = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_hidden_layers": 1, "vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def to_eagle3_tensors(draft: Eagle3Draft, include_embedding: bool = True) -> dict[str, torch.Tensor]:
    sd = draft.state_dict()
    out = {hf: sd[ours].contiguous() for ours, hf in _SIMPLE.items()}
    nh, nkv, hd = draft.nh, draft.nkv, draft.hd
    q, k, v = sd["qkv.weight"].split([nh * hd, nkv * hd, nkv * hd])
    out.update({"midlayer.self_attn.q_proj.weight": q.contiguous(), "midlayer.self_attn.k_proj.weight": k.contiguous(),
                "midlayer.self_attn.v_proj.weight": v.contiguous()})
    gate, up = sd["mlp.gate_up.weight"].split(draft.config.intermediate_size)
    out.update({"midlayer.mlp.gate_proj.weight": gate.contiguous(), "midlayer.mlp.up_proj.weight": up.contiguous()})
    out["d2t"], out["t2d"] = sd["d2t"].clone(), sd["t2d"].clone()
    if include_embedding:
        out["embed_tokens.weight"] = sd["embed.weight"].to(draft.dtype).contiguous()
    return out


def save_eagle3(draft: Eagle3Draft, folder: str | Path, include_embedding: bool = True, extra: dict | None = None) -> Path:
    """Write ``folder`` atomically (temp folder beside it, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        cfg = eagle3_config(draft.config, draft.dtype)
        if extra:
            cfg["aurora_rl"] = extra
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(to_eagle3_tensors(draft, include_embedding), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        # mkdtemp and safetensors create owner-only files; an exported draft is meant to be shared
        # (e.g. read by SGLang on a shared filesystem).
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def load_eagle3(folder: str | Path, target_embedding: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> Eagle3Draft:
    """Load an EAGLE3 draft folder; the embedding comes from the file or ``target_embedding``."""
    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    for f in (config_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: not an EAGLE3 draft folder")
    hf = json.loads(config_file.read_text())
    if ARCHITECTURE not in (hf.get("architectures") or []):
        raise ValueError(f"{config_file}: architectures={hf.get('architectures')}, expected [{ARCHITECTURE!r}]")
    if hf.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"{config_file}: num_hidden_layers={hf['num_hidden_layers']}; only 1-layer drafts are supported")
    cfg = DraftConfig(
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"], vocab_size=hf["vocab_size"],
        draft_vocab_size=hf.get("draft_vocab_size") or hf["vocab_size"],
        target_hidden_size=hf.get("target_hidden_size") or hf["hidden_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=hf.get("rope_theta", 10000.0), rope_scaling=hf.get("rope_scaling") or {},
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
    )
    tensors = load_file(str(weights))
    draft = Eagle3Draft(cfg)
    sd = {ours: tensors.pop(hf_name) for ours, hf_name in _SIMPLE.items() if hf_name in tensors}
    missing = [hf_name for ours, hf_name in _SIMPLE.items() if ours not in sd]
    names = [f"midlayer.self_attn.{p}_proj.weight" for p in "qkv"] + [f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up")]
    missing += [n for n in names + ["d2t", "t2d"] if n not in tensors]
    embed = tensors.pop("embed_tokens.weight", target_embedding)
    if embed is None:
        missing.append("embed_tokens.weight (or pass the target's embedding)")
    if missing:
        raise ValueError(f"{weights}: missing tensors {missing}")
    sd["qkv.weight"] = torch.cat([tensors.pop(n) for n in names[:3]])
    sd["mlp.gate_up.weight"] = torch.cat([tensors.pop(n) for n in names[3:]])
    sd["d2t"], sd["t2d"], sd["embed.weight"] = tensors.pop("d2t").long(), tensors.pop("t2d").bool(), embed
    expected = draft.state_dict()
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{weights}: {name} has shape {tuple(t.shape)}, config implies {tuple(expected[name].shape)}")
    draft.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return draft.to_dtype(dtype)
