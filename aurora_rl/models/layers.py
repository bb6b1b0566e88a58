"""Building blocks shared by the target and the draft: linear, RMSNorm, RoPE tables, gated MLP, attention.

Numerics follow the reference implementations (norms computed in fp32, then cast back; attention
softmax in fp32) so that parity tests against transformers hold in fp32 and stay close in bf16.

Decoding is memory bound on CPU: each step reads every weight for a handful of rows. ``Linear`` sends
up to ``cpu_kernels.max_rows()`` rows to the native kernel of ``cpu_kernels`` (over a copy of the weight packed in
the order the kernel streams it) and larger inputs (prefill) to ``F.linear``. Attention groups the
query heads that share a KV head into one batch of queries, because PyTorch's bf16 SDPA with
``enable_gqa`` is 5-10x slower than the grouped call on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aurora_rl.models import cpu_kernels, quant



INVARIANT_MIN_ROWS = 4
"""Fewest rows per kernel call in batch-invariant mode: from 4 rows on, the gemv computes every row alike."""


class Linear(nn.Linear):
    """``nn.Linear`` with a fast path for a few rows at inference time (same parameters, same results
    up to float summation order). Training (grad enabled) and large inputs use ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._native_key: tuple | None = None
        self._native_call = None
        self._packed: torch.Tensor | None = None
        self.quant: quant.QuantWeight | None = None
        """Quantized weight that inference passes (no grad) run on, whatever their row count; the float
        weight holds its dequantized values for training. Set with ``set_quant``."""
        self._quant_calls: dict = {}

    def set_quant(self, qw: "quant.QuantWeight | None") -> None:
        """Run inference on ``qw`` (the caller keeps the float weight equal to its dequantized values)."""
        if qw is not None and (qw.n, qw.k) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight [{qw.n}, {qw.k}] does not fit Linear({self.in_features}, {self.out_features})")
        self.quant, self._quant_calls = qw, {}

    batch_invariant = False
    """Compute every row the same way whatever the other rows (``TargetModel.set_batch_invariant``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hot path of decoding (~120 calls a token): parameters are read from _parameters directly,
        # nn.Module.__getattr__ costs more than the checks.
        params = self._parameters
        w, bias = params["weight"], params["bias"]
        rows = x.numel() // self.in_features
        # Quantized weights first: their kernel computes every row alone, so it is batch invariant too.
        if self.quant is not None and rows > 0 and x.dtype == w.dtype and not torch.is_grad_enabled():
            call = self._quant_call(x.dtype)
            if call is not None:
                x = x.contiguous()
                y = torch.empty(x.shape[:-1] + (self.out_features,), dtype=x.dtype)
                call(x.data_ptr(), y.data_ptr(), rows)
                if bias is not None:
                    y += bias
                return y
        if self.batch_invariant and not torch.is_grad_enabled():
            return self._invariant_forward(x, w, bias)
        if 0 < rows <= cpu_kernels.max_rows() and x.dtype == w.dtype and not torch.is_grad_enabled():
            call = self._native(w)
            if call is not None:
                x = x.contiguous()
                y = torch.empty(x.shape[:-1] + (self.out_features,), dtype=x.dtype)
                call(x.data_ptr(), y.data_ptr(), rows)
                if bias is not None:
                    y += bias
                return y
        return F.linear(x, w, bias)

    def _quant_call(self, dtype: torch.dtype):
        call = self._quant_calls.get(dtype, False)
        if call is False:
            ok = dtype in (torch.float32, torch.bfloat16) and quant.available()
            call = self._quant_calls[dtype] = quant.gemv_caller(self.quant, dtype) if ok else None
        return call

    def _invariant_forward(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The native kernel in chunks of at most ``max_rows`` rows, each of at least ``INVARIANT_MIN_ROWS``
        (zero rows pad a short chunk): a row's reduction order then never depends on how many rows share
        the call (the bf16 kernel splits one lone row's sum over two accumulators, and PyTorch's GEMM
        picks its blocking by shape)."""
        call = self._native(w) if x.dtype == w.dtype else None
        if call is None:
            raise RuntimeError(f"batch-invariant Linear needs the native kernels for {w.dtype} weights "
                               f"(cpu_kernels.available()={cpu_kernels.available()}, input {x.dtype})")
        flat = x.reshape(-1, self.in_features).contiguous()
        rows, step = flat.shape[0], cpu_kernels.max_rows()
        y = torch.empty(rows, self.out_features, dtype=x.dtype)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            if n < INVARIANT_MIN_ROWS:
                xp = torch.zeros(INVARIANT_MIN_ROWS, self.in_features, dtype=x.dtype)
                xp[:n] = flat[start:start + n]
                yp = torch.empty(INVARIANT_MIN_ROWS, self.out_features, dtype=x.dtype)
                call(xp.data_ptr(), yp.data_ptr(), INVARIANT_MIN_ROWS)
                y[start:start + n] = yp[:n]
            else:
                call(flat[start].data_ptr(), y[start].data_ptr(), n)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], self.out_features)

    def _native(self, w: torch.Tensor):
        """The kernel call over a packed copy of the weight ``w``, rebuilt when the weight is replaced or
        changed in place; None when the kernels do not apply."""
        key = (w.data_ptr(), w.dtype, None if w.is_inference() else w._version)
        if key != self._native_key:
            self._native_call = self._packed = None
            if (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available()
                    and (w.dtype == torch.float32 or self.in_features % 2 == 0)):
                self._packed = cpu_kernels.pack(w)
                self._native_call = cpu_kernels.gemv_caller(self._packed, self.out_features, self.in_features)
            self._native_key = key
        return self._native_call

    def packed_weight(self) -> torch.Tensor | None:
        """The weight in ``cpu_kernels.pack`` layout, current with the weight; None if it does not apply."""
        self._native(self._parameters["weight"])
        return self._packed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):
            return cpu_kernels.add_rmsnorm(x, None, self.weight, self.eps)[1]
        # As transformers: normalise in fp32, round to the input dtype, then scale by the weight.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)) in one pass when the native kernel applies."""
        if self._native(x) and residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous():
            return cpu_kernels.add_rmsnorm(x, residual, self.weight, self.eps)
        x = x + residual
        return x, self(x)

    def _native(self, x: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled() and x.dtype == self.weight.dtype
                and cpu_kernels.elementwise_supported(x))


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
        self._signed_sin()

    def _signed_sin(self) -> None:
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]: one roll instead of neg + cat.
        half = self.sin.shape[-1] // 2
        self.sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)

    def to(self, dtype: torch.dtype) -> "RotaryTable":
        self.cos, self.sin = self.cos.to(dtype), self.sin.to(dtype)
        self._signed_sin()
        return self

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, T, D] for positions [B, T]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def gather_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [B, T, 1, D] for ``rotate`` over a [B, T, heads, D] tensor."""
        return self.cos[positions].unsqueeze(2), self.sin_signed[positions].unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE with the tables from ``RotaryTable.gather_rows``: ``apply_rope`` value for value (same
    products and sum, so the same bf16 rounding), with one roll instead of slicing, negation and cat."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class GatedMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = Linear(hidden, 2 * intermediate, bias=False)
        self.down = Linear(intermediate, hidden, bias=False)
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if (self.intermediate % 16 == 0 and not torch.is_grad_enabled()
                and cpu_kernels.elementwise_supported(gate_up)):
            return self.down(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)


def causal_mask(q_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, kv_len]: query at position p sees keys 0..p of its own row."""
    keys = torch.arange(kv_len, device=q_positions.device)
    return (keys.view(1, 1, 1, -1) <= q_positions.unsqueeze(1).unsqueeze(-1))


@dataclass(slots=True)
class TreeAttention:
    """Where a pass of token-tree nodes lives: RoPE runs at each node's position (its depth past the row's
    length), but each node has a cache entry of its own and sees only its ancestors among the tree."""

    cache_index: torch.Tensor
    """[B, T] int64: the cache entry each token writes (and its causal limit)."""
    mask: torch.Tensor
    """[B, T] int64 bits: bit i set = the key at cache_index - i is visible (i < 64; bit 0, the token
    itself, always set); keys before cache_index - 63 are all visible. The native kernels' layout."""


def tree_mask(cache_index: torch.Tensor, bits: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, kv_len] from a ``TreeAttention``'s cache indices and mask bits."""
    keys = torch.arange(kv_len, device=cache_index.device).view(1, 1, -1)
    back = cache_index.unsqueeze(-1) - keys  # [B, T, kv_len]: how far behind the query each key is
    in_window = (back >= 0) & (back < 64)
    bit = (bits.unsqueeze(-1) >> back.clamp(0, 63)) & 1
    visible = (back >= 64) | (in_window & (bit == 1))
    return visible.unsqueeze(1)


def group_mask(mask: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """A [B, 1, T, S] mask repeated for the ``group`` query heads that share a KV head: [B, 1, group*T, S]."""
    return None if mask is None or group == 1 else mask.repeat(1, 1, group, 1)


def attend_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   causal: bool = False) -> torch.Tensor:
    """Grouped-query attention: q [B, T, H, D] (any strides), k/v [B, Hkv, S, D], ``mask`` from
    ``group_mask`` -> [B, T, H*D]. The H/Hkv query heads of one KV head form one batch of queries.
    ``causal`` (instead of a mask) is for queries at positions 0..T-1 over exactly those keys: a fresh
    prefill, where SDPA's own causal path is ~25% faster than a mask."""
    B, T, H, D = q.shape
    if causal:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=k.shape[1] != H)
        return out.transpose(1, 2).reshape(B, T, H * D)
    hkv = k.shape[1]
    g = H // hkv
    if T == 1:
        qg = q.reshape(B, hkv, g, D)
    else:
        qg = q.reshape(B, T, hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, g * T, D)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    if T == 1:
        return out.reshape(B, 1, H * D)
    return out.view(B, hkv, g, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention: q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, T, H*D]."""
    return attend_grouped(q.transpose(1, 2), k, v, group_mask(mask, q.shape[1] // k.shape[1]))
