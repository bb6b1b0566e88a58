"""Building blocks shared by the target and the draft: RMSNorm, RoPE tables, gated MLP, attention.

Numerics follow the reference implementations (norms computed in fp32, then cast back) so that
parity tests against transformers hold in fp32 and stay close in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Inverse frequencies for default, linear and Llama-3 scaled RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, the band between
        # interpolated smoothly: this is what lets Llama 3.1 extend its context.
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = torch.where(in_band, mid, scaled)
    return inv.float()


class RotaryTable:
    """Precomputed cos/sin for every position up to ``max_len``; gathered per token position."""

    def __init__(self, head_dim: int, theta: float, scaling: dict, max_len: int, dtype: torch.dtype) -> None:
        inv = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def to(self, dtype: torch.dtype) -> "RotaryTable":
        self.cos, self.sin = self.cos.to(dtype), self.sin.to(dtype)
        return self

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, T, D] for positions [B, T]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class GatedMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)


def causal_mask(q_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, kv_len]: query at position p sees keys 0..p of its own row."""
    keys = torch.arange(kv_len, device=q_positions.device)
    return (keys.view(1, 1, 1, -1) <= q_positions.unsqueeze(1).unsqueeze(-1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention: q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, T, H*D]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    B, H, T, D = out.shape
    return out.transpose(1, 2).reshape(B, T, H * D)
