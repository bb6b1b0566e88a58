"""``model.dtype=auto``: bfloat16 only where the CPU computes it natively, and clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.models import dtypes

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.unit
def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert "avx2" in dtypes.cpu_flags(X86_AVX2) and "avx512_bf16" not in dtypes.cpu_flags(X86_AVX2)
    assert dtypes.cpu_flags(X86_BF16) & dtypes.NATIVE_BF16_FLAGS == {"avx512_bf16"}
    assert dtypes.cpu_flags(ARM_BF16) & dtypes.NATIVE_BF16_FLAGS == {"bf16"}


@pytest.mark.unit
@pytest.mark.parametrize("native,want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_follows_native_bf16_on_cpu(monkeypatch, native, want):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: native)
    assert dtypes.resolve_dtype("auto") == want
    assert dtypes.resolve_dtype("float32") == torch.float32
    assert dtypes.resolve_dtype("auto", device="cuda") == torch.bfloat16


@pytest.mark.unit
def test_explicit_bf16_without_native_support_warns_but_is_honoured(monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    assert dtypes.resolve_dtype("bfloat16") == torch.bfloat16
    assert "without native bf16" in caplog.text


@pytest.mark.unit
def test_unknown_dtype_lists_the_choices():
    with pytest.raises(ValueError, match=r"'fp8'.*auto.*bfloat16.*float32"):
        dtypes.resolve_dtype("fp8")
