"""Native CPU kernels against PyTorch references, and the target model with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aurora_rl.models import cpu_kernels
from aurora_rl.models.layers import Linear, apply_rope
from aurora_rl.models.target import TargetModel
from tests.conftest import tiny_target

pytestmark = pytest.mark.skipif(not cpu_kernels.built(), reason="native kernels not built here")


@pytest.fixture(autouse=True)
def use_native_kernels(monkeypatch):
    """Check the kernels on every CPU they build on, including those where serving leaves them off."""
    monkeypatch.setenv("AURORA_RL_NATIVE_KERNELS", "1")
DTYPES = [torch.float32, torch.bfloat16]


def close(got, ref, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 8, 13, 40, 128])
@pytest.mark.parametrize("n,k", [(37, 70), (64, 64), (96, 33)])
def test_gemv_matches_matmul(dtype, m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(m, k, generator=g).to(dtype)
    close(cpu_kernels.matmul(x, cpu_kernels.pack(w), n), x.float() @ w.float().T, dtype)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_native_path_matches_f_linear_and_follows_weight_updates(dtype):
    lin = Linear(64, 48, bias=True).to(dtype)
    x = torch.randn(2, 3, 64).to(dtype)
    with torch.inference_mode():
        close(lin(x), F.linear(x, lin.weight, lin.bias), dtype)
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: the packed copy must be rebuilt
    with torch.inference_mode():
        close(lin(x), F.linear(x, lin.weight, lin.bias), dtype)
    assert lin(x).requires_grad  # grad enabled: plain F.linear, autograd works


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", [16, 64, 80, 96, 128])
def test_attention_over_slot_cache_is_causal_per_row(dtype, hd):
    g = torch.Generator().manual_seed(hd)
    B, T, nh, nkv, S = 3, 4, 6, 2, 40
    q = torch.randn(B, T, nh, hd, generator=g).to(dtype)
    kc, vc = (torch.randn(4, nkv, S, hd, generator=g).to(dtype) for _ in range(2))
    slots = torch.tensor([3, 0, 1])
    pos = torch.tensor([[10, 11, 12, 13], [0, 1, 2, 3], [30, 31, 32, 33]])
    got = cpu_kernels.attention(q, kc, vc, slots, pos, hd ** -0.5).view(B, T, nh, hd)
    for b in range(B):
        for t in range(T):
            n = int(pos[b, t]) + 1
            k, v = (c[slots[b], :, :n].float().repeat_interleave(nh // nkv, 0) for c in (kc, vc))
            ref = torch.softmax(q[b, t].float()[:, None] @ k.transpose(1, 2) * hd ** -0.5, -1) @ v
            close(got[b, t], ref[:, 0], dtype)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", [64, 96, 128])
def test_attention_of_a_query_is_bit_identical_alone_and_among_others(dtype, hd):
    """A verify pass must give each token what a one-token step gives it: the kernel takes up to four
    queries per pass over a KV head, and each query's result may not depend on its companions."""
    g = torch.Generator().manual_seed(hd + 1)
    T, nh, nkv, ctx = 13, 9, 3, 150
    q = torch.randn(1, T, nh, hd, generator=g).to(dtype)
    kc, vc = (torch.randn(1, nkv, 256, hd, generator=g).to(dtype) for _ in range(2))
    slots = torch.zeros(1, dtype=torch.long)
    pos = (ctx + torch.arange(T)).view(1, T)
    together = cpu_kernels.attention(q, kc, vc, slots, pos, hd ** -0.5).view(T, nh * hd)
    for t in range(T):
        alone = cpu_kernels.attention(q[:, t:t + 1], kc, vc, slots, pos[:, t:t + 1], hd ** -0.5).view(nh * hd)
        assert torch.equal(together[t], alone), t


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_silu_and_rope_round_like_pytorch(dtype):
    g = torch.Generator().manual_seed(0)
    x, a, w = (torch.randn(*s, generator=g).to(dtype) for s in ((5, 64), (5, 64), (64,)))
    resid, normed = cpu_kernels.add_rmsnorm(x, a, w, 1e-6)
    ref = x + a
    close(resid, ref, dtype)
    close(normed, w * F.rms_norm(ref.float(), (64,), eps=1e-6).to(dtype), dtype)
    gate_up = torch.randn(5, 2, 96, generator=g).to(dtype) * 4
    close(cpu_kernels.silu_mul(gate_up), F.silu(gate_up[..., :48]) * gate_up[..., 48:], dtype)
    nh, nkv, hd = 4, 2, 16
    qkv = torch.randn(2, 3, (nh + 2 * nkv) * hd, generator=g).to(dtype)
    cos, sin = (torch.randn(50, hd, generator=g).to(dtype) for _ in range(2))
    pos, slots = torch.tensor([[5, 6, 7], [40, 41, 42]]), torch.tensor([1, 0])
    kc, vc = torch.zeros(2, nkv, 50, hd, dtype=dtype), torch.zeros(2, nkv, 50, hd, dtype=dtype)
    q = cpu_kernels.rope_write(qkv, cos, sin, pos, slots, kc, vc, nh, nkv)
    heads = qkv.view(2, 3, nh + 2 * nkv, hd).transpose(1, 2)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    rotated = apply_rope(heads[:, :nh + nkv], c, s)
    close(q.transpose(1, 2), rotated[:, :nh], dtype)
    for b in range(2):
        close(kc[slots[b], :, pos[b]], rotated[b, nh:], dtype)
        close(vc[slots[b], :, pos[b]], heads[b, nh + nkv:], dtype)


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_target_decode_same_with_and_without_kernels(family, dtype, monkeypatch):
    """Fused layers, kernels one by one, and plain PyTorch ops agree (bf16: within bf16 rounding)."""
    model, _ = tiny_target(family, dtype=dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12).expand(2, 12)

    def decode():
        cache = model.new_cache(2, 32)
        outs = [model(ids[:, :8], pos[:, :8], cache, torch.tensor([0, 1])).logits]
        outs += [model(ids[:, i:i + 1], pos[:, i:i + 1], cache, torch.tensor([0, 1])).logits for i in range(8, 12)]
        return torch.cat(outs, 1)

    native = decode()
    with monkeypatch.context() as m:  # step by step through the same kernels: the same numbers
        m.setattr(TargetModel, "_fused_weights", lambda self, x: None)
        torch.testing.assert_close(native, decode(), atol=0, rtol=0)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "elementwise_supported", lambda x: False)
    monkeypatch.setattr(cpu_kernels, "attention_supported", lambda k: False)
    for lin in model.modules():
        if isinstance(lin, Linear):
            lin._native_key = None  # forget packed weights so the fallback is taken
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(native, decode(), **tol)


@pytest.mark.unit
def test_kernels_are_used_where_the_cpu_has_avx512_or_avx2_fma(monkeypatch):
    """AVX-512 or AVX2 + FMA: used; neither: off unless forced."""
    for (avx512, avx2), used in [((True, True), True), ((False, True), True), ((False, False), False)]:
        monkeypatch.setattr(cpu_kernels, "_has_avx512", lambda v=avx512: v)
        monkeypatch.setattr(cpu_kernels, "_has_avx2_fma", lambda v=avx2: v)
        monkeypatch.delenv("AURORA_RL_NATIVE_KERNELS")
        assert cpu_kernels.available() is used
        monkeypatch.setenv("AURORA_RL_NATIVE_KERNELS", "1")
        assert cpu_kernels.available()


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_different_lengths_run_packed_as_if_padded(dtype, monkeypatch):
    """A verify pass whose rows propose different numbers of tokens runs one token per row (no padding);
    outputs at real positions and the cache it leaves must match the padded pass."""
    from aurora_rl.engine.runner import ModelRunner

    model, _ = tiny_target("llama", dtype=dtype)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (9, 4, 13)]
    chunks = [[5, 6, 7, 8, 9], [10], [11, 12]]
    assert model.runs_ragged(model.new_cache(1, 8), 5) and not model.runs_ragged(model.new_cache(1, 8), 9)
    runs = {}
    for packed in (True, False):
        monkeypatch.setattr(model, "runs_ragged", lambda cache, t, packed=packed: packed)
        runner = ModelRunner(model, num_slots=4, max_len=64)
        for slot, p in zip((2, 0, 3), prompts):
            runner.extend([slot], [p])
        out = runner.extend([2, 0, 3], chunks, with_taps=True)
        last = runner.extend([3, 2], [[23, 24, 25], [26]], last_only=True)  # each row's last token
        assert last.logits.shape == (2, 128) and last.hidden.shape == (2, 3, 64)  # the padded pass's layout
        runs[packed] = (out, torch.cat([last.logits, runner.extend([2, 0, 3], [[20], [21], [22]], last_only=True).logits]),
                        runner.lengths.tolist())
    (ro, rnext, rlen), (po, pnext, plen) = runs[True], runs[False]
    assert ro.logits.shape == po.logits.shape and ro.taps.shape == po.taps.shape
    for b, c in enumerate(chunks):
        n = len(c)
        close(ro.logits[b, :n], po.logits[b, :n], dtype)
        close(ro.hidden[b, :n], po.hidden[b, :n], dtype)
        close(ro.taps[b, :n], po.taps[b, :n], dtype)
    close(rnext, pnext, dtype)  # the next step reads the caches each pass left
    assert rlen == plen == [len(prompts[1]) + 2, 0, len(prompts[0]) + 7, len(prompts[2]) + 6]


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_draft_step_in_one_native_call_matches_the_step_by_step_path(dtype, monkeypatch):
    """A proposal step (a few tokens per row) runs the draft's layer in one native call: logits, hidden
    states and the keys and values it leaves in the cache match the PyTorch path."""
    from aurora_rl.models.draft import DraftConfig, Eagle3Draft

    model, _ = tiny_target("llama", dtype=torch.float32)
    draft = Eagle3Draft(DraftConfig.for_target(model.config, draft_vocab_size=64)).init_from_target(model, 3)
    draft = draft.to_dtype(dtype).eval()
    calls, layer = [], cpu_kernels.draft_layer
    monkeypatch.setattr(cpu_kernels, "draft_layer", lambda *a: calls.append(1) or layer(*a))
    g = torch.Generator().manual_seed(0)
    H = draft.config.hidden_size
    slots = torch.tensor([2, 0, 1])
    for T in (1, 3):
        pos = torch.tensor([[5], [0], [17]]) + torch.arange(T)
        toks = torch.randint(0, draft.config.vocab_size, (3, T), generator=g)
        hidden = torch.randn(3, T, H, generator=g).to(dtype)
        outs, caches = [], []
        logit_index = torch.tensor([T - 1, 0, T // 2])  # feeding kept tokens: rows of different lengths
        for fused in (True, False):
            cache = draft.new_cache(4, 32)
            cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=torch.Generator().manual_seed(1)))
            cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=torch.Generator().manual_seed(2)))
            if not fused:
                draft._fused_weights = lambda: None  # the step-by-step path
            with torch.inference_mode():
                outs.append(draft(toks, hidden, pos, cache, slots))
                fed = draft(toks, hidden, pos, cache, slots, logit_index=logit_index)
                assert fed.logits.shape == (3, draft.config.draft_vocab_size) and fed.hidden.shape == (3, H)
                outs.append(fed)
            caches.append(cache)
            draft.__dict__.pop("_fused_weights", None)
            assert len(calls) == (2 if fused else 0)
            calls.clear()
        tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
        for i in (0, 1):  # the step, then feeding with logit_index
            torch.testing.assert_close(outs[i].logits.float(), outs[2 + i].logits.float(), **tol)
            torch.testing.assert_close(outs[i].hidden.float(), outs[2 + i].hidden.float(), **tol)
        torch.testing.assert_close(caches[0].k[0].float(), caches[1].k[0].float(), **tol)
        torch.testing.assert_close(caches[0].v[0].float(), caches[1].v[0].float(), **tol)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 49152), (13, 4096), (3, 17), (2, 16), (4, 1), (2, 3, 33)])
def test_argmax_picks_what_torch_picks_including_ties_nan_and_infinities(dtype, shape):
    assert cpu_kernels.available()  # the native kernel, not the torch fallback, is what runs here
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g).to(dtype)
    n = shape[-1]
    nan = x.clone()
    nan[..., n // 2] = float("nan")
    nan[..., -1] = float("nan")
    top = x.clone()
    top[..., -1] = float("inf")
    floor = torch.full(shape, float("-inf"), dtype=dtype)
    lifted = floor.clone()
    lifted[..., -1] = 0.0
    for case in (x, (2 * x).round().clamp(-1, 1), (0.3 * x).round(), nan, top, floor, lifted):
        got = cpu_kernels.argmax(case)
        assert got.dtype == torch.int64 and torch.equal(got, case.argmax(-1)), case


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 49152), (13, 4096), (3, 17), (2, 16), (4, 1), (2, 3, 33)])
def test_logsumexp_matches_torch_including_nan_infinities_and_temperature(dtype, shape):
    assert cpu_kernels.available()  # the native kernel, not the torch fallback, is what runs here
    g = torch.Generator().manual_seed(shape[-1] + 1)
    x = (4 * torch.randn(*shape, generator=g)).to(dtype)
    n = shape[-1]
    nan = x.clone()
    nan[..., n // 2] = float("nan")
    top = x.clone()
    top[..., -1] = float("inf")
    floor = torch.full(shape, float("-inf"), dtype=dtype)
    lifted = floor.clone()
    lifted[..., -1] = 3.0
    peaked = x.clone()
    peaked[..., 0] = 80.0  # one logit far above the rest: exp of the others underflows
    for case in (x, nan, top, floor, lifted, peaked, x - 200.0):
        for scale in (1.0, 1 / 0.7, 1 / 1.5):
            got = cpu_kernels.logsumexp(case, scale)
            want = torch.logsumexp(case.float() * scale, -1)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-5, equal_nan=True)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_logsumexp_in_one_call_equals_the_two_calls(dtype):
    assert cpu_kernels.available()
    g = torch.Generator().manual_seed(5)
    x = (4 * torch.randn(3, 4099, generator=g)).to(dtype)
    x[1, 7] = float("nan")
    x[2, -1] = float("inf")
    for scale in (1.0, 1 / 0.7):
        idx, lse = cpu_kernels.argmax_logsumexp(x, scale)
        assert torch.equal(idx, x.argmax(-1)) and torch.equal(idx, cpu_kernels.argmax(x))
        torch.testing.assert_close(lse, cpu_kernels.logsumexp(x, scale), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(lse, torch.logsumexp(x.float() * scale, -1), rtol=2e-6, atol=2e-5, equal_nan=True)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_logsumexp_of_a_batch_on_two_threads_equals_one_thread(dtype):
    """A batch's rows are split across threads (a served step's logits, 8 x 49152): each row is still one
    thread's, so the results are those of one thread bit for bit, and torch's."""
    g = torch.Generator().manual_seed(6)
    x = (4 * torch.randn(8, 49152, generator=g)).to(dtype)
    x[3, 11] = float("nan")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.argmax_logsumexp(x, 1 / 0.7)
        torch.set_num_threads(2)
        two = cpu_kernels.argmax_logsumexp(x, 1 / 0.7)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(two[0], x.argmax(-1))
    torch.testing.assert_close(two[1], one[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(two[1], torch.logsumexp(x.float() / 0.7, -1), rtol=2e-6, atol=2e-5, equal_nan=True)
