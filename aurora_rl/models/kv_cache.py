"""Slot KV cache: a fixed number of request slots, each with its own length.

Layout per layer is ``[slots, kv_heads, max_len, head_dim]`` so that the keys of a contiguous run of
slots up to a length are a strided view (no copy) for attention. Rejecting speculated tokens is a
length reset, never a copy: entries past a row's length are simply overwritten later.

A forward pass touches every layer with the same slots and positions, so ``plan`` works out once how
to write and read them (a slice for one row, precomputed indices for several; a view for a contiguous
run of slots) and ``write_planned`` / ``view_planned`` reuse it per layer. ``write`` and ``view`` are
the same operations for one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class CachePlan:
    """Where one forward pass writes its keys/values and which rows it reads back."""

    kv_len: int
    """Keys visible to the pass: its largest position plus one."""
    slots: torch.Tensor
    slot_range: tuple[int, int] | None
    """(first, count) when the slots are consecutive: reads are views."""
    row_slice: tuple[int, int, int] | None
    """(slot, first position, count) when one row writes consecutive positions: writes are slices."""
    index: tuple[torch.Tensor, ...] | None
    """index_put_ indices over [slots, kv_heads, positions] otherwise."""


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

    def plan(self, slots: torch.Tensor, positions: torch.Tensor) -> CachePlan:
        """Plan a pass of rows ``slots`` [B] at ``positions`` [B, T] (one host sync, not one per layer)."""
        B, T = positions.shape
        s = slots.tolist()
        pos = positions.tolist()
        # Checked here because the native kernels write through raw pointers.
        if min(s) < 0 or max(s) >= self.num_slots:
            raise ValueError(f"slots {s} out of range for a cache of {self.num_slots} slots")
        if min(min(row) for row in pos) < 0:
            raise ValueError(f"negative position in {pos}")
        kv_len = max(max(row) for row in pos) + 1
        consecutive = s == list(range(s[0], s[0] + B))
        row_slice = None
        if B == 1 and pos[0] == list(range(pos[0][0], pos[0][0] + T)):
            row_slice = (s[0], pos[0][0], T)
        index = None
        if row_slice is None:
            heads = torch.arange(self.num_kv_heads, device=slots.device).view(1, -1, 1)
            index = (slots.view(-1, 1, 1), heads, positions.view(B, 1, T))
        return CachePlan(kv_len, slots, (s[0], B) if consecutive else None, row_slice, index)

    def write_planned(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` [B, kv_heads, T, D] as ``plan`` says."""
        if plan.row_slice is not None:
            s, p, t = plan.row_slice
            self.k[layer][s, :, p:p + t] = k[0]
            self.v[layer][s, :, p:p + t] = v[0]
        else:
            self.k[layer].index_put_(plan.index, k)
            self.v[layer].index_put_(plan.index, v)

    def view_planned(self, layer: int, plan: CachePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, kv_len, D] of the plan's rows; views when the slots are consecutive."""
        n = plan.kv_len
        if plan.slot_range is not None:
            first, count = plan.slot_range
            return self.k[layer][first:first + count, :, :n], self.v[layer][first:first + count, :, :n]
        return self.k[layer][plan.slots, :, :n], self.v[layer][plan.slots, :, :n]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store ``k, v`` of shape [B, kv_heads, T, D] at ``positions`` [B, T] of rows ``slots`` [B]."""
        self.write_planned(layer, self.plan(slots, positions), k, v)

    def view(self, layer: int, slots: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, kv_len, D] for rows ``slots``; a view when they are contiguous."""
        s = slots.tolist()
        plan = CachePlan(kv_len, slots, (s[0], len(s)) if s == list(range(s[0], s[0] + len(s))) else None,
                         None, None)
        return self.view_planned(layer, plan)
