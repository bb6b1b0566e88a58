"""Quantized target weights (GGUF q8_0 and q4_1 blocks): quantize, dequantize, pack, and the native
kernels that multiply by them without going through float.

Why: at batch 1 a decode step reads every weight once, so its time is bytes over memory bandwidth.
q4_1 stores 20 bytes per 32 weights (5 bits a weight), q8_0 34 (8.5 bits), against 64 in bf16.

Contract:
- ``QuantBlocks`` holds one [N, K] weight unpacked (``q`` integers, fp16 ``d`` and, for q4_1, ``m`` per
  block of 32 along K); ``dequantize()`` gives the float weight (the "dequantized float path"), and
  ``from_gguf`` reads GGUF's raw block bytes as they are, ``quantize`` makes blocks from a float weight
  as llama.cpp's reference quantizers do.
- ``QuantWeight.of(blocks)`` packs them for the kernels (``_quant_kernels_src`` documents the layout);
  ``matmul(x, qw)`` is ``x @ W.T`` for float32 or bfloat16 rows, with the rows quantized to int8 blocks
  inside the kernel (as llama.cpp does). Each row's result does not depend on how many rows come with
  it, so verify passes equal decode steps bit for bit.
- ``available()`` says whether the library is built and self-checked; it needs the float kernels
  (``cpu_kernels.available()``) and K a multiple of 32 (``supports``). Otherwise callers use the float
  weights.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

import torch

from aurora_rl.models import cpu_kernels
from aurora_rl.models._cpu_kernels_src import SOURCE
from aurora_rl.models._quant_kernels_src import QUANT_SOURCE

log = logging.getLogger(__name__)

QK = 32
"""Weights per block along K."""
KINDS = {"q8_0": 0, "q4_1": 1}
"""Kernel ids of the block formats."""
QUANT_CHOICES = ("auto", "none", *KINDS)
"""What ``model.quant`` accepts: auto (the GGUF's own format where supported), none (float weights)."""
_GROUP_BYTES = {"q8_0": 544, "q4_1": 320}
"""Packed bytes per 16 output rows x one block."""

_P, _I, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "aurora_qgemv": [_P, _T, _P, _P] + [_I] * 5 + [_T],
    "aurora_qlayer": [_P] * 22 + [_I] * 11 + [_F, _T],
}


@dataclass
class QuantBlocks:
    """One [N, K] weight in blocks of 32 along K: value = d * q (q8_0) or d * q + m (q4_1)."""

    kind: str
    q: torch.Tensor
    """[N, K]: int8 in -127..127 (q8_0) or uint8 in 0..15 (q4_1)."""
    d: torch.Tensor
    """[N, K / 32] float16 scales."""
    m: torch.Tensor | None = None
    """[N, K / 32] float16 minimums (q4_1 only)."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight these blocks stand for."""
        n, k = self.q.shape
        val = self.q.float().view(n, k // QK, QK) * self.d.float().unsqueeze(-1)
        if self.m is not None:
            val = val + self.m.float().unsqueeze(-1)
        return val.view(n, k)

    def rows(self, index: torch.Tensor) -> "QuantBlocks":
        """The blocks of the output rows ``index`` (a permutation or a slice of rows)."""
        return QuantBlocks(self.kind, self.q[index], self.d[index], None if self.m is None else self.m[index])

    @staticmethod
    def cat(parts: list["QuantBlocks"]) -> "QuantBlocks":
        """Row-wise concatenation (fused q/k/v, gate/up) of blocks of one kind."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse weights of different block formats {sorted(kinds)}")
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return QuantBlocks(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), m)


def from_gguf(kind: str, raw: torch.Tensor, n: int, k: int) -> QuantBlocks:
    """Blocks from a GGUF tensor's raw bytes (uint8, N rows of K / 32 blocks): q8_0 = fp16 d + 32 int8;
    q4_1 = fp16 d, fp16 m + 16 bytes (low nibbles weights 0-15, high nibbles 16-31)."""
    if kind not in KINDS:
        raise ValueError(f"GGUF block format {kind!r} is not one of {list(KINDS)}")
    if k % QK:
        raise ValueError(f"K={k} is not a multiple of the block size {QK}")
    nb = k // QK
    blocks = raw.reshape(n, nb, -1)
    d = blocks[..., 0:2].contiguous().view(torch.float16).view(n, nb)
    if kind == "q8_0":
        if blocks.shape[-1] != 34:
            raise ValueError(f"q8_0 blocks are 34 bytes, got {blocks.shape[-1]}")
        return QuantBlocks(kind, blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), d)
    if blocks.shape[-1] != 20:
        raise ValueError(f"q4_1 blocks are 20 bytes, got {blocks.shape[-1]}")
    m = blocks[..., 2:4].contiguous().view(torch.float16).view(n, nb)
    qs = blocks[..., 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)
    return QuantBlocks(kind, q, d, m)


def quantize(weight: torch.Tensor, kind: str) -> QuantBlocks:
    """Blocks of a float [N, K] weight, as llama.cpp's reference ``quantize_row_q8_0`` / ``_q4_1``."""
    if kind not in KINDS:
        raise ValueError(f"quant kind {kind!r} is not one of {list(KINDS)}")
    n, k = weight.shape
    if k % QK:
        raise ValueError(f"K={k} is not a multiple of the block size {QK}")
    w = weight.detach().float().view(n, k // QK, QK)
    if kind == "q8_0":
        d = w.abs().amax(-1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.round(w * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return QuantBlocks(kind, q.view(n, k), d.half())
    lo, hi = w.amin(-1), w.amax(-1)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round((w - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return QuantBlocks(kind, q.view(n, k), d.half(), lo.half())


def pack(blocks: QuantBlocks) -> torch.Tensor:
    """The kernel layout: per group of 16 output rows (zero-padded), per block, the weights as
    [vector j][row][4] bytes then the fp16 scales (and q4_1 minimums) of the 16 rows."""
    n, k = blocks.shape
    pad = -n % 16
    g, nb = (n + pad) // 16, k // QK

    def rows16(t: torch.Tensor) -> torch.Tensor:  # [N, nb] fp16 -> [g, nb, 32] bytes
        t = torch.cat([t, t.new_zeros(pad, nb)]) if pad else t
        return t.view(g, 16, nb).transpose(1, 2).contiguous().view(torch.uint8).view(g, nb, 32)

    q = blocks.q
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
    if blocks.kind == "q8_0":
        u = (q.to(torch.int16) + 128).to(torch.uint8).view(g, 16, nb, 8, 4).permute(0, 2, 3, 1, 4)
        parts = [u.reshape(g, nb, 512), rows16(blocks.d)]
    else:
        u = q.view(g, 16, nb, 4, 8)
        nib = (u[..., :4] | (u[..., 4:] << 4)).permute(0, 2, 3, 1, 4)
        parts = [nib.reshape(g, nb, 256), rows16(blocks.d), rows16(blocks.m)]
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


@dataclass(eq=False)
class QuantWeight:
    """A packed quantized [n, k] weight for the kernels."""

    kind: str
    n: int
    k: int
    packed: torch.Tensor
    """uint8, ``pack`` layout."""

    @staticmethod
    def of(blocks: QuantBlocks) -> "QuantWeight":
        n, k = blocks.shape
        return QuantWeight(blocks.kind, n, k, pack(blocks))

    @property
    def kind_id(self) -> int:
        return KINDS[self.kind]

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


# ---- the library --------------------------------------------------------------------------------------

class _QuantLib:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns = cpu_kernels.bind(lib, _SIGNATURES)
        lib.aurora_quant_body.restype = ctypes.c_char_p
        self.body = lib.aurora_quant_body().decode()

    def fn(self, name: str, dtype: torch.dtype):
        return self._fns[name, dtype]


def load_library(extra_flags: tuple[str, ...] = ()) -> _QuantLib:
    """Build (once, cached by source and flags) and load the quantized kernels; ``extra_flags`` builds a
    variant (the tests build an AVX2-only one with ``-mno-avx512f``). Raises on failure."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC or cc)")
    # -Bsymbolic: the base kernels compiled into this library call their own copies, not the float library's.
    path = cpu_kernels._build(compiler, SOURCE + QUANT_SOURCE, "aurora_quant", ("-Wl,-Bsymbolic", *extra_flags))
    return _QuantLib(ctypes.CDLL(str(path)))


@functools.cache
def _lib() -> _QuantLib | None:
    if not cpu_kernels.available():
        return None
    try:
        lib = load_library()
        _self_check(lib)
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError, AssertionError) as err:
        log.warning("quantized kernels unavailable, quantized weights run dequantized: %s", err)
        return None
    log.info("quantized kernels ready (%s body)", lib.body)
    return lib


def available() -> bool:
    """Whether the quantized kernels are built, loaded and self-checked (builds them on first call)."""
    return _lib() is not None


def supports(n: int, k: int) -> bool:
    """Whether a [n, k] weight can run quantized (K in whole blocks)."""
    return k % QK == 0 and n > 0


def body() -> str | None:
    """Which kernel body this machine runs (avx512vnni, avx2, c), None when unavailable."""
    lib = _lib()
    return None if lib is None else lib.body


def reference_matmul(x: torch.Tensor, blocks: QuantBlocks) -> torch.Tensor:
    """What the kernel computes, in float64 PyTorch: rows quantized to int8 blocks as the kernel does,
    times the dequantized weight. For tests and the self-check."""
    m, k = x.shape
    xb = x.float().view(m, k // QK, QK)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv.unsqueeze(-1)) * d.unsqueeze(-1)
    return xq.view(m, k).double() @ blocks.dequantize().double().T


def _self_check(lib: _QuantLib) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 96, generator=g)
    for kind in KINDS:
        blocks = quantize(w, kind)
        qw = QuantWeight.of(blocks)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(11, 96, generator=g).to(dtype)
            got = _matmul(lib, x, qw).double()
            ref = reference_matmul(x, blocks)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            err = (got - ref).abs().max().item()
            assert err <= tol * max(ref.abs().max().item(), 1.0), f"qgemv self-check failed ({kind}, {dtype}): {err}"


def _matmul(lib: _QuantLib, x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    m, k = x.shape
    assert k == qw.k and x.dtype in (torch.float32, torch.bfloat16), (x.shape, x.dtype, qw.k)
    x = x.contiguous()
    y = torch.empty(m, qw.n, dtype=x.dtype)
    lib.fn("aurora_qgemv", x.dtype)(qw.packed.data_ptr(), qw.kind_id, x.data_ptr(), y.data_ptr(), m, qw.n, k, k,
                                    qw.n, torch.get_num_threads())
    return y


def matmul(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """``x @ W.T`` for x [..., K] (CPU, float32 or bfloat16) on the quantized weight: [..., N]."""
    lib = _lib()
    assert lib is not None, "check available() first"
    return _matmul(lib, x.reshape(-1, qw.k), qw).view(*x.shape[:-1], qw.n)


def gemv_caller(qw: QuantWeight, dtype: torch.dtype):
    """``call(x_ptr, y_ptr, m)`` for contiguous x [m, k], y [m, n] of ``dtype``: one ctypes call
    (what ``Linear`` uses on its hot path)."""
    lib = _lib()
    assert lib is not None, "check available() first"
    fn, w_ptr, kind, n, k, threads = lib.fn("aurora_qgemv", dtype), qw.packed.data_ptr(), qw.kind_id, qw.n, qw.k, \
        torch.get_num_threads

    def call(x_ptr: int, y_ptr: int, m: int, _keep=qw) -> None:
        fn(w_ptr, kind, x_ptr, y_ptr, m, n, k, k, n, threads())

    return call


def decoder_layer(x: torch.Tensor, pending: torch.Tensor | None, resid: torch.Tensor, mlp_out: torch.Tensor,
                  weights: tuple, rope_cos: torch.Tensor, rope_sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int,
                  work: torch.Tensor, shape: tuple[int, int, int, int, int], eps: float,
                  tree: tuple[torch.Tensor, torch.Tensor] | None = None, sum_out: torch.Tensor | None = None) -> None:
    """``cpu_kernels.decoder_layer`` with the four projections in ``weights`` as ``QuantWeight``s
    (input norm, post norm, qkv, qkv bias or None, o, gate_up, down); same arguments (token trees and
    ``sum_out`` included) and outputs."""
    in_w, post_w, w_qkv, b_qkv, w_o, w_gu, w_down = weights
    nh, nkv, hd, hidden, inter = shape
    B, T, _ = x.shape
    kinds = _kinds(w_qkv, w_o, w_gu, w_down)
    _lib().fn("aurora_qlayer", x.dtype)(
        x.data_ptr(), None if pending is None else pending.data_ptr(), resid.data_ptr(), mlp_out.data_ptr(),
        in_w.data_ptr(), post_w.data_ptr(), w_qkv.packed.data_ptr(), None if b_qkv is None else b_qkv.data_ptr(),
        w_o.packed.data_ptr(), w_gu.packed.data_ptr(), w_down.packed.data_ptr(), kinds.data_ptr(),
        rope_cos.data_ptr(), rope_sin.data_ptr(), positions.data_ptr(), *cpu_kernels.tree_pointers(tree),
        slots.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), work.data_ptr(), cpu_kernels.sum_pointer(sum_out, x), k_cache.stride(0), k_cache.stride(1),
        B, T, nh, nkv, hd, hidden, inter, kv_len, 0 if sum_out is None else sum_out.stride(1), eps,
        torch.get_num_threads())


@functools.lru_cache(maxsize=4096)
def _kinds(*weights: QuantWeight) -> torch.Tensor:
    """The kind ids of a layer's four projections as the int64 array the layer kernel reads (cached:
    the same weights come back every pass)."""
    return torch.tensor([w.kind_id for w in weights], dtype=torch.int64)
