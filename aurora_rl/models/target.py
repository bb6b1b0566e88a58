"""The target model's forward pass for serving: Llama / Qwen2 / Qwen3 over a slot KV cache, with taps.

``forward`` takes per-row token ids and positions, writes their keys/values into the given cache
slots and returns logits (for all positions or one chosen position per row), the final-norm hidden
state, and the outputs of the tap layers concatenated (the EAGLE3 draft's input features).
The cache's lengths are the caller's to manage: the model only reads and writes entries.

Speed on CPU: passes of a few tokens per row (decode, verify: at most ``NATIVE_ATTENTION_MAX_TOKENS``)
run each Llama/Qwen2 layer as one call into ``cpu_kernels`` (packed-weight GEMVs, RoPE and cache write,
attention straight from the slot cache, fused residual-add + RMSNorm), since at 135M parameters
PyTorch's per-op overhead alone (~130 us a layer) would be a third of a decode step. Longer passes
(prefill) and Qwen3 (q/k norms) take the step-by-step path; both paths round as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aurora_rl.models import cpu_kernels, quant
from aurora_rl.models.config import ModelConfig
from aurora_rl.models.kv_cache import CachePlan, SlotKVCache
from aurora_rl.models.layers import (GatedMLP, Linear, RMSNorm, RotaryTable, TreeAttention, attend_grouped,
                                     causal_mask, group_mask, rotate, tree_mask)


@dataclass
class TargetOutput:
    logits: torch.Tensor
    """[B, T, V] for all positions, or [B, V] when ``logit_index`` was given."""
    hidden: torch.Tensor
    """Final-norm hidden state [B, T, H] (the learner applies the lm_head to it)."""
    taps: torch.Tensor | None
    """Outputs of ``config.tap_layers`` concatenated: [B, T, len(tap_layers) * H]."""


NATIVE_ATTENTION_MAX_TOKENS = 64
"""Passes with at most this many tokens per row (decode, verify, short prefills) run natively (fused
layer, native attention); longer ones (prefill) take the step-by-step path with SDPA. Every verify pass
up to this length computes each row as the one-token decode step does, so on the quantized target a
verify pass equals the decode steps it replaces bit for bit. On an AMD EPYC with AVX512-BF16
(``experiments/chain_pass_native_vs_stepwise.py``) native beat the step-by-step path 1.2-1.8x at
9-16 tokens and 1.2-1.3x at 64; until session 14 the limit was 8, so chains of 9 or more tokens ran
slower and not bit-identical to decoding."""

RAGGED_MAX_TOKENS = 8
"""Rows of at most this many tokens may be packed one token per row (``runs_ragged``)."""

NATIVE_TREE_MAX_TOKENS = 64
"""Token-tree verify passes take the native kernel up to this many nodes per row (the tree mask's
width): one pass over the keys per group of four queries still beats SDPA with a mask there."""


@dataclass(slots=True)
class PassContext:
    """What every layer of one forward pass shares, computed once per pass."""

    cache: SlotKVCache
    plan: CachePlan
    cos: torch.Tensor | None
    """[B, T, 1, D] rope cosines."""
    sin: torch.Tensor | None
    """[B, T, 1, D] rope sines, signed for ``rotate``."""
    mask: torch.Tensor | None
    """Grouped causal mask [B, 1, group*T, kv_len], None when every query sees all keys."""
    causal: bool
    """One row at positions 0..T-1 (a fresh prefill): SDPA's causal path instead of a mask."""
    native: bool
    """RoPE, cache writes and attention by ``cpu_kernels`` (few tokens per row, CPU)."""
    positions: torch.Tensor
    rope: RotaryTable
    tree: TreeAttention | None = None
    """Token-tree pass: cache entries and ancestor masks of its tokens (``positions`` stay RoPE's)."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.attention_bias)
        self.o = Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: PassContext, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv = self.nh, self.nkv
        kc, vc = ctx.cache.k[layer], ctx.cache.v[layer]
        qkv = self.qkv(x)
        tree = ctx.tree
        if ctx.native and self.q_norm is None:
            q = cpu_kernels.rope_write(qkv, ctx.rope.cos, ctx.rope.sin, ctx.positions, ctx.plan.slots, kc, vc, nh, nkv,
                                       cache_index=None if tree is None else tree.cache_index)
        else:
            qkv = qkv.view(B, T, nh + 2 * nkv, self.hd)
            qk = qkv[:, :, :nh + nkv]
            if self.q_norm is not None:
                qk = torch.cat([self.q_norm(qkv[:, :, :nh]), self.k_norm(qkv[:, :, nh:nh + nkv])], dim=2)
            qk = rotate(qk, ctx.cos, ctx.sin)  # q and k heads in one pass: [B, T, nh + nkv, D]
            k, v = qk[:, :, nh:].transpose(1, 2), qkv[:, :, nh + nkv:].transpose(1, 2)
            ctx.cache.write_planned(layer, ctx.plan, k, v)
            q = qk[:, :, :nh]
        if ctx.native:
            where = ctx.positions if tree is None else tree.cache_index
            return self.o(cpu_kernels.attention(q, kc, vc, ctx.plan.slots, where, self.hd ** -0.5, ctx.plan.kv_len,
                                                tree_mask=None if tree is None else tree.mask))
        keys, values = ctx.cache.view_planned(layer, ctx.plan)
        return self.o(attend_grouped(q, keys, values, ctx.mask, ctx.causal))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def fused_weights(self) -> tuple | None:
        """This layer's weights for ``cpu_kernels.decoder_layer``, or None when it cannot run fused
        (q/k norms, weights the kernels cannot pack)."""
        a, m = self.attn, self.mlp
        linears = (a.qkv, a.o, m.gate_up, m.down)
        if a.q_norm is not None:
            return None
        if any(lin.quant is not None for lin in linears):  # quantized: all four, or the step-by-step path
            if any(lin.quant is None for lin in linears) or not quant.available():
                return None
            return (self.input_norm.weight, self.post_norm.weight, a.qkv.quant, a.qkv.bias, a.o.quant,
                    m.gate_up.quant, m.down.quant)
        packed = [lin.packed_weight() for lin in linears]
        if any(p is None for p in packed):
            return None
        return (self.input_norm.weight, self.post_norm.weight, packed[0], a.qkv.bias, *packed[1:])

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None, ctx: PassContext,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, MLP output): the caller adds the two, which lets the sum fuse with the next norm.
        ``pending`` is the previous layer's MLP output still to be added to ``x`` (None for the first)."""
        x, h = self.input_norm.add_forward(x, pending) if pending is not None else (x, self.input_norm(x))
        x, h = self.post_norm.add_forward(x, self.attn(h, ctx, layer))
        return x, self.mlp(h)


class TargetModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                                torch.float32)
        self._tap_layers = tuple(cfg.tap_layers)
        self._fused_key: tuple | None = None
        self._fused: list | None = None
        self._param_slots: list | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> "TargetModel":
        self.to(dtype)
        self.rope.to(dtype)
        return self

    def attach_quant(self, blocks: dict[str, "quant.QuantBlocks"]) -> None:
        """Run the Linear modules named in ``blocks`` (``layers.3.attn.qkv``, ``lm_head``, ...) on those
        quantized blocks; their float weights take the blocks' dequantized values (a tied lm_head's
        embedding too), so that every path computes the same model."""
        modules = dict(self.named_modules())
        for name, b in blocks.items():
            lin = modules.get(name)
            if not isinstance(lin, Linear):
                raise ValueError(f"{name!r} is not a Linear of this model; quantizable: "
                                 f"{[n for n, m in modules.items() if isinstance(m, Linear)][:4]}...")
            with torch.no_grad():
                lin.weight.copy_(b.dequantize().to(lin.weight.dtype))
            lin.set_quant(quant.QuantWeight.of(b))
        self._fused_key = self._fused = None

    def quant_summary(self) -> dict[str, int]:
        """How many Linear modules run in each weight format ("none": float)."""
        out: dict[str, int] = {}
        for m in self.modules():
            if isinstance(m, Linear):
                kind = m.quant.kind if m.quant is not None else "none"
                out[kind] = out.get(kind, 0) + 1
        return out

    def new_cache(self, num_slots: int, max_len: int | None = None) -> SlotKVCache:
        c = self.config
        return SlotKVCache(c.num_layers, num_slots, c.num_kv_heads, c.head_dim,
                           max_len or c.max_position_embeddings, dtype=self.dtype,
                           device=self.embed.weight.device)

    def _fused_weights(self, x: torch.Tensor) -> list | None:
        """Per-layer weights for the one-call layer kernel, with the pass's buffers; None if any layer
        or the shapes cannot use it. The weights are looked up again only when a parameter changed."""
        c = self.config
        if c.hidden_size % 16 or c.intermediate_size % 16 or not cpu_kernels.elementwise_supported(x):
            return None
        if self._param_slots is None:  # (module, name) of every layer parameter: cheap to re-read per pass
            self._param_slots = [(m, n) for layer in self.layers for m in layer.modules() for n in m._parameters]
        params = [m._parameters[n] for m, n in self._param_slots]
        key = tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in params if p is not None)
        if key != self._fused_key:
            weights = [layer.fused_weights() for layer in self.layers]
            self._fused, self._fused_key = (None if any(w is None for w in weights) else weights), key
        if self._fused is None:
            return None
        B, T, H = x.shape
        streams = torch.empty(2, len(self.layers), B, T, H, dtype=x.dtype)  # residual stream, MLP output
        work = cpu_kernels.layer_workspace(B * T, H, c.intermediate_size, c.num_heads, c.num_kv_heads,
                                           c.head_dim, x.dtype)
        return [self._fused, streams, work]

    def _fused_layer(self, i: int, x: torch.Tensor, pending: torch.Tensor | None, fused: list,
                     ctx: PassContext, sum_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        weights, streams, work = fused
        c = self.config
        resid, mlp_out = streams[0, i], streams[1, i]
        layer_fn = quant.decoder_layer if isinstance(weights[i][2], quant.QuantWeight) else cpu_kernels.decoder_layer
        layer_fn(
            x, pending, resid, mlp_out, weights[i], self.rope.cos, self.rope.sin, ctx.positions, ctx.plan.slots,
            ctx.cache.k[i], ctx.cache.v[i], ctx.plan.kv_len, work,
            (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size), c.rms_norm_eps,
            **({} if ctx.tree is None else {"tree": (ctx.tree.cache_index, ctx.tree.mask)}), sum_out=sum_out)
        return resid, mlp_out

    def _tap_plan(self, fused: bool) -> tuple[dict[int, int], dict[int, list[int]]]:
        """Where each tap (index j of ``tap_layers``) comes from: {layer i + 1: j} for taps whose sum the next
        fused layer writes straight into the taps tensor (``sum_out``), {layer i: [j, ...]} for the others
        (added after layer i: the last layer, a repeated tap, the step-by-step path)."""
        by_kernel: dict[int, int] = {}
        by_add: dict[int, list[int]] = {}
        for j, i in enumerate(self._tap_layers):
            if fused and i + 1 < len(self.layers) and i + 1 not in by_kernel:
                by_kernel[i + 1] = j
            else:
                by_add.setdefault(i, []).append(j)
        return by_kernel, by_add

    batch_invariant = False
    """See ``set_batch_invariant``."""

    def set_batch_invariant(self, on: bool = True) -> "TargetModel":
        """Deterministic mode: every projection through ``Linear``'s batch-invariant path, no fused layer
        kernel (its own blocking), so a token's logits do not depend on the other rows of its pass.
        With one token per row (``ModelRunner(deterministic=True)``) and the native attention (a fixed
        key order per query) a greedy answer is the same alone, batched, speculated or not."""
        self.batch_invariant = on
        for m in self.modules():
            if isinstance(m, Linear):
                m.batch_invariant = on
        return self

    def runs_ragged(self, cache: SlotKVCache, tokens_per_row: int) -> bool:
        """Whether rows of up to ``tokens_per_row`` tokens may run as one token per row, a slot repeated
        over its rows (``ModelRunner`` packs rows of different lengths that way): the native path writes
        every row's key and value before any row attends, so a row sees its own request's earlier tokens
        of the same pass. Only for short rows (decode, verify): a prefill keeps SDPA's causal path."""
        k = cache.k[0]
        return (tokens_per_row <= RAGGED_MAX_TOKENS and k.dtype == self.dtype
                and cpu_kernels.attention_supported(k))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: SlotKVCache,
                slots: torch.Tensor, logit_index: torch.Tensor | None = None,
                with_taps: bool = True, tree: TreeAttention | None = None) -> TargetOutput:
        """Run ``input_ids`` [B, T] at ``positions`` [B, T] for cache rows ``slots`` [B].

        Each row's positions must be contiguous and start at that row's cache length; right padding
        is allowed (padded entries land past the row's length and are never attended by real tokens).
        With ``tree`` the tokens are token-tree nodes: ``positions`` are their RoPE positions, ``tree``
        says which cache entry each writes and which keys it sees (``aurora_rl.engine.token_tree``).
        """
        B, T = input_ids.shape
        slots, positions = slots.long().contiguous(), positions.long().contiguous()  # the kernels read int64
        if tree is not None:
            tree = TreeAttention(tree.cache_index.long().contiguous(), tree.mask.long().contiguous())
        plan = cache.plan(slots, positions if tree is None else tree.cache_index)
        kv_len = plan.kv_len
        if kv_len > cache.max_len:
            raise ValueError(f"position {kv_len - 1} exceeds the cache's max_len={cache.max_len}")
        c = self.config
        max_tokens = NATIVE_ATTENTION_MAX_TOKENS if tree is None else NATIVE_TREE_MAX_TOKENS
        native = (T <= max_tokens and kv_len <= self.rope.cos.shape[0]
                  and cache.k[0].dtype == self.dtype and cpu_kernels.attention_supported(cache.k[0]))
        mask = cos = sin = None
        causal = (tree is None and not native and plan.row_slice is not None
                  and plan.row_slice[1] == 0)  # fresh prefill
        if tree is not None and not native:
            mask = group_mask(tree_mask(tree.cache_index, tree.mask, kv_len), c.num_heads // c.num_kv_heads)
        elif not (native or causal) and not (T == 1 and bool((positions == kv_len - 1).all())):
            mask = group_mask(causal_mask(positions, kv_len), c.num_heads // c.num_kv_heads)
        if not native or c.qk_norm:
            cos, sin = self.rope.gather_rows(positions)
        ctx = PassContext(cache, plan, cos, sin, mask, causal, native, positions, self.rope, tree)
        x, pending = self.embed(input_ids), None
        # the fused layer runs every projection in the gemv: only where it beats PyTorch at B * T rows
        fused = (self._fused_weights(x) if native and B * T <= cpu_kernels.max_rows() and not self.batch_invariant
                 else None)
        H = c.hidden_size
        taps = torch.empty(B, T, len(self._tap_layers) * H, dtype=x.dtype) if with_taps else None
        by_kernel, by_add = self._tap_plan(fused is not None) if with_taps else ({}, {})
        for i, layer in enumerate(self.layers):
            if fused is not None:
                j = by_kernel.get(i)
                x, pending = self._fused_layer(i, x, pending, fused, ctx,
                                               None if j is None else taps[..., j * H:(j + 1) * H])
            else:
                x, pending = layer(x, pending, ctx, i)
            for j in by_add.get(i, ()):  # the same sum, rounded as the next layer's input is
                torch.add(x, pending, out=taps[..., j * H:(j + 1) * H])
        _, hidden = self.norm.add_forward(x, pending)
        if logit_index is not None:
            rows = hidden[:, 0] if T == 1 else hidden[torch.arange(B), logit_index]
            logits = self.lm_head(rows)
        else:
            logits = self.lm_head(hidden)
        return TargetOutput(logits=logits, hidden=hidden, taps=taps)
