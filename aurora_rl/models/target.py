"""The target model's forward pass for serving: Llama / Qwen2 / Qwen3 over a slot KV cache, with taps.

``forward`` takes per-row token ids and positions, writes their keys/values into the given cache
slots and returns logits (for all positions or one chosen position per row), the final-norm hidden
state, and the outputs of the tap layers concatenated (the EAGLE3 draft's input features).
The cache's lengths are the caller's to manage: the model only reads and writes entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aurora_rl.models.config import ModelConfig
from aurora_rl.models.kv_cache import SlotKVCache
from aurora_rl.models.layers import GatedMLP, RMSNorm, RotaryTable, apply_rope, attend, causal_mask


@dataclass
class TargetOutput:
    logits: torch.Tensor
    """[B, T, V] for all positions, or [B, V] when ``logit_index`` was given."""
    hidden: torch.Tensor
    """Final-norm hidden state [B, T, H] (the learner applies the lm_head to it)."""
    taps: torch.Tensor | None
    """Outputs of ``config.tap_layers`` concatenated: [B, T, len(tap_layers) * H]."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.attention_bias)
        self.o = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, cache: SlotKVCache, layer: int, slots, positions, kv_len, mask):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, self.hd).split([self.nh, self.nkv, self.nkv], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        cache.write(layer, slots, positions, k, v.transpose(1, 2))
        keys, values = cache.view(layer, slots, kv_len)
        return self.o(attend(q, keys, values, mask))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache, layer, slots, positions, kv_len, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, cache, layer, slots, positions, kv_len, mask)
        return x + self.mlp(self.post_norm(x))


class TargetModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                torch.float32)
        self._tap_layers = tuple(cfg.tap_layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> "TargetModel":
        self.to(dtype)
        self.rope.to(dtype)
        return self

    def new_cache(self, num_slots: int, max_len: int | None = None) -> SlotKVCache:
        c = self.config
        return SlotKVCache(c.num_layers, num_slots, c.num_kv_heads, c.head_dim,
                           max_len or c.max_position_embeddings, dtype=self.dtype,
                           device=self.embed.weight.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: SlotKVCache,
                slots: torch.Tensor, logit_index: torch.Tensor | None = None,
                with_taps: bool = True) -> TargetOutput:
        """Run ``input_ids`` [B, T] at ``positions`` [B, T] for cache rows ``slots`` [B].

        Each row's positions must be contiguous and start at that row's cache length; right padding
        is allowed (padded entries land past the row's length and are never attended by real tokens).
        """
        B, T = input_ids.shape
        kv_len = int(positions.max()) + 1
        if kv_len > cache.max_len:
            raise ValueError(f"position {kv_len - 1} exceeds the cache's max_len={cache.max_len}")
        uniform = T == 1 and bool((positions == kv_len - 1).all())
        mask = None if uniform else causal_mask(positions, kv_len)
        cos, sin = self.rope.gather(positions)
        x = self.embed(input_ids)
        layer_out: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, slots, positions, kv_len, mask)
            if with_taps and i in self._tap_layers:
                layer_out[i] = x
        hidden = self.norm(x)
        if logit_index is not None:
            logits = self.lm_head(hidden[torch.arange(B), logit_index])
        else:
            logits = self.lm_head(hidden)
        return TargetOutput(logits=logits, hidden=hidden, taps=torch.cat([layer_out[i] for i in self._tap_layers], dim=-1) if with_taps else None)
