"""Native CPU kernels for decoding: matrix-vector products, attention over the slot cache, and the
small elementwise steps of a decoder layer, each one call instead of several PyTorch ops.

Why: at decode time a linear layer reads its whole weight to multiply it by one to a few rows, so a
step is bound by memory bandwidth. PyTorch's CPU kernels reach only 6-14 GB/s on these shapes (bf16
``F.linear`` is the slowest), while a plain stream over a weight laid out in the order the kernel reads
it reaches 20-25 GB/s per core. ``pack`` keeps each group of 16 output rows contiguous with (k, k+1)
pairs interleaved (``[N/16][K/2][16][2]``, the operand layout of AVX512-BF16 dot products), so each
thread reads one sequential stream and needs no horizontal sums. PyTorch's bf16 SDPA is also slow for
one query (and ``enable_gqa`` slower still), and an RMSNorm is ten ops; per token that adds up.

Contract:
- ``available()`` says whether the kernels could be built: they are compiled once per machine with the
  system C compiler (``$CC`` or ``cc``; about two seconds) into ``$AURORA_RL_CACHE/kernels`` and loaded
  with ctypes, using the OpenMP runtime torch already loaded with ``torch.get_num_threads()`` threads.
  No compiler, a system other than x86-64 Linux, a failed build or a failed self-check leaves them
  off (logged once), and callers use PyTorch ops. ``AURORA_RL_NATIVE_KERNELS=0`` turns them off.
- They are used on CPUs with AVX-512 or with AVX2 + FMA. The float32 gemv has an AVX2 body (one
  accumulator per row, at most 6 rows per pass over a weight block): the 16-wide vector-extension code
  alone spilled registers there and lost to PyTorch everywhere. The gemv pays up to ``max_rows()``
  rows a pass; larger passes go to PyTorch. Measured on an AVX2 EPYC, SmolLM2 in float32,
  whole forward with taps at batch 1, context 300, 2 threads: 19.1 ms for 1 token, 26.8 ms for 5
  (``experiments/results/gemv_s7/forward.txt``; 22.3 and 34.9 ms before session 7).
  Attention takes the (up to 4) queries that share a KV head in one pass over its keys and values
  (the group's heads times the row's tokens: 15 queries per KV head in a 5-token verify of SmolLM2),
  so a verify reads the cache once per chunk instead of once per query: 2.1-2.4x PyTorch's grouped
  SDPA for 1 token, 1.1-1.6x for 5 (``experiments/results/attention_s6``).
  ``AURORA_RL_NATIVE_KERNELS=1`` uses them on any CPU (the kernel tests do, to check them everywhere).
- Every kernel takes and returns CPU tensors of one dtype, float32 or bfloat16, accumulates in float32
  and rounds where transformers rounds; results differ from PyTorch only in summation order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aurora_rl.models._cpu_kernels_src import SOURCE

log = logging.getLogger(__name__)

BLOCK = 16
"""Output rows per contiguous block of a packed weight."""
_FLOATS = (torch.bfloat16, torch.float32)

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_P, _I, _F, _T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {  # C function (one per dtype: _bf16, _f32) -> argument types; the last int is threads
    "aurora_gemv": [_P] * 3 + [_I] * 5 + [_T],
    "aurora_attn": [_P, _I, _I, _I, _P, _P, _I, _I, _P, _P, _P, _P] + [_I] * 6 + [_F, _T],
    "aurora_add_rmsnorm": [_P] * 5 + [_I, _I, _F, _T],
    "aurora_silu_mul": [_P, _P, _I, _I, _T],
    "aurora_rope_write": [_P] * 9 + [_I] * 7 + [_T],
    "aurora_layer": [_P] * 21 + [_I] * 11 + [_F, _T],
    "aurora_draft_layer": [_P] * 20 + [_I] * 10 + [_F, _T],
    "aurora_argmax_lse": [_P, _P, _P, _I, _I, _F, _T],
}


def _cpu_signature() -> str:
    """Model name and flags: a library built with -march=native must not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(dict.fromkeys(ln for ln in lines if ln.startswith(("model name", "flags"))))


def _build(compiler: str, source: str = SOURCE, name: str = "aurora_kernels", extra_flags: tuple = ()) -> Path:
    """The shared library of ``source`` (cached by source, flags, compiler and CPU); ``quant`` builds its
    own library this way."""
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = [*_FLAGS, *extra_flags]
    key = hashlib.sha256("\n".join([source, " ".join(flags), compiler, _cpu_signature(), str(torch_lib)])
                         .encode()).hexdigest()[:16]
    root = os.environ.get("AURORA_RL_CACHE")
    folder = (Path(root).expanduser() if root else Path.home() / ".cache" / "aurora_rl") / "kernels"
    target = folder / f"{name}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(source)
        # Linked against torch's own libgomp, so both share one OpenMP thread pool.
        cmd = [compiler, *flags, str(src), "-o", str(out), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent builder never sees half a file
    return target


def bind(lib: ctypes.CDLL, signatures: dict[str, list]) -> dict[tuple[str, torch.dtype], Any]:
    """Each ``name`` of ``signatures`` as its ``name_bf16`` / ``name_f32`` C functions, keyed by dtype."""
    fns = {}
    for name, args in signatures.items():
        for dtype, suffix in ((torch.bfloat16, "_bf16"), (torch.float32, "_f32")):
            fn = getattr(lib, name + suffix)
            fn.argtypes, fn.restype = args, None
            fns[name, dtype] = fn
    return fns


class _Kernels:
    """The loaded library: ``fn(name, dtype)`` is the C function for that dtype."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns = bind(lib, _SIGNATURES)
        self.attn_dp = lib.aurora_attn_bf16_dp
        self.attn_dp.argtypes, self.attn_dp.restype = _SIGNATURES["aurora_attn"], ctypes.c_int
        self.avx512bf16 = bool(lib.aurora_has_avx512bf16())

    def fn(self, name: str, dtype: torch.dtype):
        return self._fns[name, dtype]


@functools.cache
def _kernels() -> _Kernels | None:
    if os.environ.get("AURORA_RL_NATIVE_KERNELS", "1") == "0":
        log.info("native CPU kernels are off (AURORA_RL_NATIVE_KERNELS=0)")
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        log.info("native CPU kernels are only built on x86-64 Linux; using PyTorch ops")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler found ($CC or cc): decoding uses PyTorch ops, which are slower")
        return None
    try:
        kernels = _Kernels(ctypes.CDLL(str(_build(compiler))))
        _self_check(kernels)
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError, AssertionError) as err:
        log.warning("native CPU kernels unavailable, decoding uses PyTorch ops: %s", err)
        return None
    log.info("native CPU kernels ready (AVX512-BF16 dot products: %s)", kernels.avx512bf16)
    return kernels


def _check(name: str, dtype: torch.dtype, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= tol * max(ref.float().abs().max().item(), 1.0), f"{name} self-check failed ({dtype}): {err}"


def _self_check(kernels: _Kernels) -> None:
    """Every kernel against a PyTorch reference on small odd shapes, both dtypes, before first use."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
        w, x = r(37, 70), r(11, 70)
        _check("gemv", dtype, _gemv(kernels, x, pack(w), 37), x.float() @ w.float().T, tol)
        for hd in (16, 32):  # both attention code paths for bf16
            q, kc, vc = r(2, 3, 4, hd), r(3, 2, 16, hd), r(3, 2, 16, hd)
            slots, pos = torch.tensor([2, 0]), torch.tensor([[4, 5, 6], [0, 1, 9]])
            got = _attention(kernels, q, kc, vc, slots, pos, hd ** -0.5, 10).view(2, 3, 4, hd)
            for b in range(2):
                for t in range(3):
                    n = int(pos[b, t]) + 1
                    k, v = (c[slots[b], :, :n].float().repeat_interleave(2, 0) for c in (kc, vc))
                    ref = torch.softmax(q[b, t].float()[:, None] @ k.transpose(1, 2) * hd ** -0.5, -1) @ v
                    _check("attention", dtype, got[b, t], ref[:, 0], tol)
        a, b, nw = r(3, 32), r(3, 32), r(32)
        resid, normed = add_rmsnorm(a, b, nw, 1e-5, kernels)
        ref = (a.float() + b.float()).to(dtype)
        _check("add_rmsnorm", dtype, resid, ref, tol)
        _check("add_rmsnorm", dtype, normed, nw * F.rms_norm(ref.float(), (32,), eps=1e-5).to(dtype), tol)
        gu = r(3, 64) * 4
        _check("silu_mul", dtype, silu_mul(gu, kernels), F.silu(gu[:, :32]) * gu[:, 32:], tol)
        qkv, cos, sin = r(2, 3, 8 * 16), r(20, 16), r(20, 16)
        slots, pos = torch.tensor([1, 0]), torch.tensor([[1, 2, 3], [7, 8, 9]])
        kc, vc = torch.zeros(2, 2, 20, 16, dtype=dtype), torch.zeros(2, 2, 20, 16, dtype=dtype)
        q = rope_write(qkv, cos, sin, pos, slots, kc, vc, 4, 2, kernels)
        x = qkv.view(2, 3, 8, 16)
        c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)
        ref = x * c + torch.cat([-x[..., 8:], x[..., :8]], -1) * s
        _check("rope_write", dtype, q, ref[:, :, :4], tol)
        for b in range(2):
            _check("rope_write", dtype, kc[slots[b], :, pos[b]].transpose(0, 1), ref[b, :, 4:6], tol)
            _check("rope_write", dtype, vc[slots[b], :, pos[b]].transpose(0, 1), x[b, :, 6:], tol)


def built() -> bool:
    """Whether the native kernels are built, loaded and self-checked (builds them on the first call)."""
    return _kernels() is not None


@functools.cache
def _has_avx512() -> bool:
    try:
        from aurora_rl.models.dtypes import cpu_flags

        return "avx512f" in cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False


@functools.cache
def _has_avx2_fma() -> bool:
    try:
        from aurora_rl.models.dtypes import cpu_flags

        flags = cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


MAX_ROWS = 128
"""Rows (tokens) up to which the gemv beats ``F.linear`` on SmolLM2's shapes, 2 cores. AVX-512, bf16:
2.3x at 8 rows, 1.4x at 64, 1.2x at 128. AVX2 only, float32 (``experiments/results/gemv_s7``): the
576 x 49152 lm_head 3.7 vs 20.8 ms at 6 rows, 8.4 vs 25.5 at 20, 41.7 vs 60.2 at 128; the 576 x 3072
layer 0.17 vs 0.54 ms at 6 rows, 2.46 vs 3.02 at 128. (Until session 7 the AVX2 body stored its
accumulators to the stack on every step of k and lost to PyTorch past 8 rows.)"""


def available() -> bool:
    """Whether decoding should use the native kernels: built, on a CPU with AVX-512 or AVX2 + FMA (the
    vector code they are written for), or ``AURORA_RL_NATIVE_KERNELS=1``."""
    if not built():
        return False
    if os.environ.get("AURORA_RL_NATIVE_KERNELS") == "1" or _has_avx512() or _has_avx2_fma():
        return True
    _log_not_used()
    return False


def max_rows() -> int:
    """Most rows (tokens) a pass may have for the native gemv to pay; larger passes go to PyTorch."""
    return MAX_ROWS


@functools.cache
def _log_not_used() -> None:
    log.info("native CPU kernels built but not used: this CPU has neither AVX-512 nor AVX2 with FMA "
             "(AURORA_RL_NATIVE_KERNELS=1 forces them)")


def _threads() -> int:
    return torch.get_num_threads()


# ---- matrix-vector products -------------------------------------------------------------------------

def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight -> the kernel layout: [N/16, K/2, 16, 2] for bf16, [N/16, K, 16] for float32."""
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"pack supports bfloat16 and float32 weights, got {weight.dtype}")
    n, k = weight.shape
    w = weight.detach()
    if weight.dtype == torch.bfloat16:
        w = F.pad(w, (0, k % 2, 0, -n % BLOCK))
        return w.view(-1, BLOCK, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
    w = F.pad(w, (0, 0, 0, -n % BLOCK))
    return w.view(-1, BLOCK, k).transpose(1, 2).contiguous()


def _gemv(kernels: _Kernels, x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    m, k = x.shape
    if x.dtype == torch.bfloat16 and k % 2:
        x, k = F.pad(x, (0, 1)), k + 1
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype)
    kernels.fn("aurora_gemv", x.dtype)(packed.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, x.stride(0), n,
                                       _threads())
    return y


def gemv_caller(packed: torch.Tensor, n: int, k: int):
    """``call(x_ptr, y_ptr, m)``: y [m, n] = x [m, k] @ W.T for contiguous x and y, with ``packed = pack(W)``
    kept alive by the closure. The per-call cost is one ctypes call: this is what ``Linear`` uses."""
    kernels = _kernels()
    assert kernels is not None, "check available() first"
    assert packed.dtype == torch.float32 or k % 2 == 0, "bf16 rows of odd length need matmul (it pads)"
    fn, w_ptr, get_threads = kernels.fn("aurora_gemv", packed.dtype), packed.data_ptr(), torch.get_num_threads

    def call(x_ptr: int, y_ptr: int, m: int, _keep=packed) -> None:
        fn(w_ptr, x_ptr, y_ptr, m, n, k, k, n, get_threads())

    return call


def matmul(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """``x @ W.T`` for x [M, K] (CPU, the packed weight's dtype) and ``packed = pack(W)`` of W [n, K]."""
    kernels = _kernels()
    assert kernels is not None, "check available() first"
    assert x.dim() == 2 and x.device.type == "cpu" and x.dtype == packed.dtype
    return _gemv(kernels, x, packed, n)


# ---- attention over the slot cache ------------------------------------------------------------------

def _attention(kernels: _Kernels, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slots: torch.Tensor, positions: torch.Tensor, scale: float, max_keys: int,
               tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    B, T, nh, hd = q.shape
    nkv = k_cache.shape[1]
    out = torch.empty(B, T, nh * hd, dtype=q.dtype)
    if q.dtype == torch.bfloat16 and kernels.avx512bf16 and hd % 32 == 0:
        fn = kernels.attn_dp
    else:
        fn = kernels.fn("aurora_attn", q.dtype)
    fn(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k_cache.data_ptr(), v_cache.data_ptr(),
       k_cache.stride(0), k_cache.stride(1), slots.data_ptr(), positions.data_ptr(), _ptr(tree_mask),
       out.data_ptr(), B, T, nh, nkv, hd, max_keys, scale, _threads())
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def attention_supported(k_cache: torch.Tensor) -> bool:
    """Whether ``attention`` and ``rope_write`` handle this cache layer (CPU, float32 or bfloat16,
    contiguous, head_dim a multiple of 16 up to 256) and the kernels are available."""
    hd = k_cache.shape[-1]
    return (hd % 16 == 0 and hd <= 256 and k_cache.dtype in (torch.bfloat16, torch.float32)
            and k_cache.device.type == "cpu" and k_cache.is_contiguous() and available())


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
              positions: torch.Tensor, scale: float, kv_len: int | None = None,
              tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, T, H, D] over one layer's slot cache k/v [slots, Hkv, max_len, D] -> [B, T, H*D].

    Query (b, t) sees keys 0..positions[b, t] of cache row slots[b] (causal, so right padding is
    harmless); query head h reads KV head h // (H / Hkv). Softmax in float32. Meant for a few queries
    per row (decode, verify): one pass over each row's keys per group of up to four queries.
    ``kv_len`` (max position + 1) saves a reduction when the caller knows it. ``tree_mask`` [B, T] int64
    (tree verification; ``positions`` are then the queries' cache indices): bit i of a query's mask at
    cache index c says whether key c - i is visible, for i < 64; keys before c - 63 are always visible.
    """
    kernels = _kernels()
    assert kernels is not None and v_cache.stride() == k_cache.stride() and q.dtype == k_cache.dtype
    assert q.stride(-1) == 1 and slots.dtype == positions.dtype == torch.int64
    kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
    if tree_mask is not None:
        assert tree_mask.dtype == torch.int64 and tree_mask.shape == positions.shape
        tree_mask = tree_mask.contiguous()
    return _attention(kernels, q, k_cache, v_cache, slots.contiguous(), positions.contiguous(), scale, kv_len,
                      tree_mask)


def _native_row_op(x: torch.Tensor, scale: float = 1.0) -> bool:
    return (available() and x.dtype in _FLOATS and x.device.type == "cpu" and x.numel() > 0 and x.dim() > 0
            and scale > 0)


def _argmax_lse(x: torch.Tensor, want_idx: bool, want_lse: bool, scale: float) -> tuple:
    x = x.contiguous()
    idx = torch.empty(x.shape[:-1], dtype=torch.int64) if want_idx else None
    lse = torch.empty(x.shape[:-1], dtype=torch.float32) if want_lse else None
    _kernels().fn("aurora_argmax_lse", x.dtype)(x.data_ptr(), 0 if idx is None else idx.data_ptr(),
                                                0 if lse is None else lse.data_ptr(), x.numel() // x.shape[-1],
                                                x.shape[-1], float(scale), _threads())
    return idx, lse


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (int64; the first maximum, a NaN counting as the largest) for a CPU float32 or
    bfloat16 ``x``; torch's own where the kernels cannot take it or decoding leaves them off."""
    if not _native_row_op(x):
        return x.argmax(-1)
    return _argmax_lse(x, True, False, 1.0)[0]


def logsumexp(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``torch.logsumexp(scale * x.float(), -1)`` (float32) for a CPU float32 or bfloat16 ``x`` and
    ``scale`` > 0: one native pass for the maximum, one for the sum; torch's where the kernels cannot
    take it or decoding leaves them off."""
    if not _native_row_op(x, scale):
        return torch.logsumexp(x.float() * scale, -1)
    return _argmax_lse(x, False, True, scale)[1]


def argmax_logsumexp(x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(``argmax(x)``, ``logsumexp(x, scale)``) in one native call: the row is read from memory once (a
    served step needs both, the greedy token and its trace's normaliser); torch's where the kernels
    cannot take it."""
    if not _native_row_op(x, scale):
        return x.argmax(-1), torch.logsumexp(x.float() * scale, -1)
    return _argmax_lse(x, True, True, scale)


# ---- elementwise steps ------------------------------------------------------------------------------

def elementwise_supported(x: torch.Tensor) -> bool:
    """Whether ``add_rmsnorm`` / ``silu_mul`` take ``x`` (contiguous CPU float, last dim % 16 == 0)."""
    return (x.shape[-1] % 16 == 0 and x.dtype in _FLOATS and x.is_contiguous() and x.device.type == "cpu"
            and available())


def add_rmsnorm(x: torch.Tensor, a: torch.Tensor | None, weight: torch.Tensor, eps: float,
                kernels: _Kernels | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, weight * rmsnorm(x + a)); with ``a=None``, (x, weight * rmsnorm(x)). Rounds as
    transformers: the sum to the dtype, the normalised value to the dtype, then the product."""
    kernels = kernels or _kernels()
    dim = x.shape[-1]
    resid = torch.empty_like(x) if a is not None else x
    out = torch.empty_like(x)
    kernels.fn("aurora_add_rmsnorm", x.dtype)(
        x.data_ptr(), a.data_ptr() if a is not None else None, resid.data_ptr(), out.data_ptr(),
        weight.data_ptr(), x.numel() // dim, dim, eps, _threads())
    return resid, out


def silu_mul(gate_up: torch.Tensor, kernels: _Kernels | None = None) -> torch.Tensor:
    """silu(gate) * up for ``gate_up`` [..., 2I] = [gate | up]: [..., I]."""
    kernels = kernels or _kernels()
    inter = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
    kernels.fn("aurora_silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter),
                                                 inter, _threads())
    return out


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
               num_kv_heads: int, kernels: _Kernels | None = None,
               cache_index: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on the q and k heads of ``qkv`` [B, T, (H + 2 Hkv) * D]; k (rotated) and v go into the slot
    cache at (slots[b], head, positions[b, t]); returns the rotated q [B, T, H, D]. ``cos``/``sin`` are
    the full [max_pos, D] tables (``RotaryTable.cos``/``.sin``); the caller keeps positions inside them
    and inside the cache (they are not checked here). ``cache_index`` [B, T] (a tree's nodes: RoPE at
    their depth, cache entries of their own) says where k and v go instead of ``positions``."""
    kernels = kernels or _kernels()
    B, T, width = qkv.shape
    hd = k_cache.shape[-1]
    assert width == (num_heads + 2 * num_kv_heads) * hd and qkv.is_contiguous() and cos.is_contiguous()
    assert slots.dtype == positions.dtype == torch.int64
    positions, slots = positions.contiguous(), slots.contiguous()  # named: their pointers must stay valid
    q = torch.empty(B, T, num_heads, hd, dtype=qkv.dtype)
    kernels.fn("aurora_rope_write", qkv.dtype)(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), _ptr(cache_index), slots.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), B * T, T, num_heads,
        num_kv_heads, hd, _threads())
    return q


# ---- a whole decoder layer ----------------------------------------------------------------------------

def layer_workspace(rows: int, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, qkv_in: int | None = None) -> torch.Tensor:
    """Scratch for ``decoder_layer`` (or ``draft_layer``, whose qkv reads ``qkv_in`` = 2 * hidden) over
    ``rows`` tokens (reusable across the layers of one pass)."""
    attn = num_heads * head_dim
    per_row = (qkv_in or hidden) + hidden + (num_heads + 2 * num_kv_heads) * head_dim + 2 * attn + 3 * intermediate
    return torch.empty(rows * per_row, dtype=dtype)


def decoder_layer(x: torch.Tensor, pending: torch.Tensor | None, resid: torch.Tensor, mlp_out: torch.Tensor,
                  weights: tuple, rope_cos: torch.Tensor, rope_sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int,
                  work: torch.Tensor, shape: tuple[int, int, int, int, int], eps: float,
                  tree: tuple[torch.Tensor, torch.Tensor] | None = None, sum_out: torch.Tensor | None = None) -> None:
    """One Llama/Qwen2 decoder layer for x [B, T, H] (few tokens per row): writes the residual stream
    ``resid`` = x + pending + attention and ``mlp_out`` (its MLP output, added by the caller or fused
    into the next layer's norm), and this layer's keys/values into the cache. ``weights`` = (input norm,
    post norm, packed qkv, qkv bias or None, packed o, packed gate_up, packed down); ``shape`` =
    (num_heads, num_kv_heads, head_dim, hidden, intermediate). The same kernels, in the same order and
    with the same rounding, as the step-by-step path. ``tree`` = (cache index, tree mask), both [B, T]
    int64 contiguous, as ``rope_write`` and ``attention`` take them. ``sum_out`` [B, T, H] (its rows may be
    spaced, e.g. a slice of the taps tensor) receives the layer's input x + pending as rounded for the
    residual stream: the previous layer's output, with no add of its own."""
    in_w, post_w, w_qkv, b_qkv, w_o, w_gu, w_down = weights
    nh, nkv, hd, hidden, inter = shape
    B, T, _ = x.shape
    _kernels().fn("aurora_layer", x.dtype)(
        x.data_ptr(), None if pending is None else pending.data_ptr(), resid.data_ptr(), mlp_out.data_ptr(),
        in_w.data_ptr(), post_w.data_ptr(), w_qkv.data_ptr(), None if b_qkv is None else b_qkv.data_ptr(),
        w_o.data_ptr(), w_gu.data_ptr(), w_down.data_ptr(), rope_cos.data_ptr(), rope_sin.data_ptr(),
        positions.data_ptr(), *tree_pointers(tree), slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        work.data_ptr(), sum_pointer(sum_out, x), k_cache.stride(0), k_cache.stride(1), B, T, nh, nkv, hd, hidden,
        inter, kv_len, 0 if sum_out is None else sum_out.stride(1), eps, _threads())


def sum_pointer(sum_out: torch.Tensor | None, x: torch.Tensor) -> int | None:
    """The layer kernels' ``sum_out`` pointer (its row stride, ``sum_out.stride(1)``, goes after ``kv_len``):
    [B, T, H] like ``x``, unit stride along H, rows evenly spaced."""
    if sum_out is None:
        return None
    assert sum_out.shape == x.shape and sum_out.dtype == x.dtype and sum_out.stride(2) == 1, sum_out.shape
    assert sum_out.stride(0) == x.shape[1] * sum_out.stride(1), sum_out.stride()
    return sum_out.data_ptr()


def tree_pointers(tree: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[int | None, int | None]:
    if tree is None:
        return None, None
    assert all(t.dtype == torch.int64 and t.is_contiguous() for t in tree)
    return tree[0].data_ptr(), tree[1].data_ptr()


def draft_layer(emb: torch.Tensor, hid: torch.Tensor, resid: torch.Tensor, mlp_out: torch.Tensor, weights: tuple,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int, work: torch.Tensor,
                shape: tuple[int, int, int, int, int], eps: float,
                tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The EAGLE3 draft's decoder layer for emb, hid [B, T, H] (contiguous): qkv reads
    [emb_norm(emb) | hidden_norm(hid)], the residual stream ``resid`` starts from hid; writes ``resid``
    (hid + attention) and ``mlp_out`` as ``decoder_layer`` does. ``weights`` = (emb norm, hidden norm,
    post norm, packed qkv, packed o, packed gate_up, packed down); ``work`` from ``layer_workspace`` with
    ``qkv_in=2 * hidden``."""
    emb_w, hid_w, post_w, w_qkv, w_o, w_gu, w_down = weights
    nh, nkv, hd, hidden, inter = shape
    B, T, _ = emb.shape
    _kernels().fn("aurora_draft_layer", emb.dtype)(
        emb.data_ptr(), hid.data_ptr(), resid.data_ptr(), mlp_out.data_ptr(), emb_w.data_ptr(), hid_w.data_ptr(),
        post_w.data_ptr(), w_qkv.data_ptr(), w_o.data_ptr(), w_gu.data_ptr(), w_down.data_ptr(), rope_cos.data_ptr(),
        rope_sin.data_ptr(), positions.data_ptr(), *tree_pointers(tree), slots.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(),
        work.data_ptr(), k_cache.stride(0), k_cache.stride(1), B, T, nh, nkv, hd, hidden, inter, kv_len, eps,
        _threads())
