"""Model dtype names -> torch dtypes, with ``auto``: bfloat16 where this machine computes it natively.

On a CPU, bf16 weights halve the bytes a memory-bound decode step reads, but only pay where the CPU
has bf16 dot products (AVX512-BF16 or AMX on x86, the BF16 extension on Arm). Elsewhere torch emulates
bf16 matrix products and a prefill or verify pass runs 10-100x slower than in float32 (measured on an
AVX2-only machine: 0.95 GFLOPS bf16 against 89 GFLOPS fp32 for a 1024^3 product). ``auto`` picks
float32 there; an explicit ``bfloat16`` is honoured with a warning.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
MODEL_DTYPE_CHOICES = ("auto", "bfloat16", "float32")
"""What a run's ``model.dtype`` accepts."""
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags (x86 ``flags``, Arm ``Features``) that mean native bf16 dot products."""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags listed in a /proc/cpuinfo text."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (False where it cannot be told)."""
    info = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not info.is_file():
        return False
    return bool(cpu_flags(info.read_text(errors="replace")) & NATIVE_BF16_FLAGS)


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for ``name`` (``auto``, ``bfloat16``, ``float32``, ``float16``) on ``device``."""
    on_cpu = torch.device(device).type == "cpu"
    if name == "auto":
        return torch.bfloat16 if not on_cpu or cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {['auto', *DTYPES]}")
    if on_cpu and DTYPES[name] != torch.float32 and not cpu_has_native_bf16():
        log.warning("%s on a CPU without native bf16 dot products: matrix products are emulated and can be "
                    "10-100x slower than float32 (dtype=auto picks float32 here)", name)
    return DTYPES[name]
