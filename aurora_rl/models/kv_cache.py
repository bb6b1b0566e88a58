"""Slot KV cache: a fixed number of request slots, each with its own length.

Layout per layer is ``[slots, kv_heads, max_len, head_dim]`` so that the keys of a contiguous run of
slots up to a length are a strided view (no copy) for attention. Rejecting speculated tokens is a
length reset, never a copy: entries past a row's length are simply overwritten later.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys and values for ``num_layers`` layers and ``num_slots`` concurrent requests."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.num_slots = num_slots
        self.max_len = max_len
        self.num_kv_heads = num_kv_heads

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store ``k, v`` of shape [B, kv_heads, T, D] at ``positions`` [B, T] of rows ``slots`` [B]."""
        B, _, T, _ = k.shape
        if B == 1:
            # One row (prefill): a slice copy, no index arithmetic.
            s, p = int(slots[0]), int(positions[0, 0])
            if bool((positions[0] == torch.arange(p, p + T)).all()):
                self.k[layer][s, :, p:p + T] = k[0]
                self.v[layer][s, :, p:p + T] = v[0]
                return
        heads = torch.arange(self.num_kv_heads).view(1, -1, 1)
        idx = (slots.view(-1, 1, 1), heads, positions.view(B, 1, T))
        self.k[layer].index_put_(idx, k)
        self.v[layer].index_put_(idx, v)

    def view(self, layer: int, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, kv_len, D] for rows ``slots``; a view when they are contiguous."""
        s = slots.tolist()
        if s == list(range(s[0], s[0] + len(s))):
            return self.k[layer][s[0]:s[0] + len(s), :, :kv_len], self.v[layer][s[0]:s[0] + len(s), :, :kv_len]
        return self.k[layer][slots, :, :kv_len], self.v[layer][slots, :, :kv_len]
