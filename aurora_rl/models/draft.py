"""EAGLE3 draft: fc fusion of the target's tapped layers, one decoder layer, a pruned-vocabulary head.

One draft step at position i takes the embedding of token x_{i+1} and a hidden state h_i, and returns
logits over the draft vocabulary for x_{i+2} plus its own pre-norm hidden state. At depth 1, h_i is
``fuse(taps_i)`` (the target's low/middle/high features); at deeper depths it is the draft's own
output from the previous depth. The embedding is copied from the target and frozen. Draft ids map to
target ids by ``target = draft + d2t[draft]``; ``t2d`` marks target ids that have a draft id (the
layout SGLang and vLLM load for EAGLE3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from aurora_rl.models.config import ModelConfig
from aurora_rl.models.kv_cache import SlotKVCache
from aurora_rl.models import cpu_kernels
from aurora_rl.models.layers import (GatedMLP, Linear, RMSNorm, RotaryTable, TreeAttention, apply_rope, attend,
                                     causal_mask, tree_mask)


@dataclass(slots=True)
class DraftConfig:
    """Shape of an EAGLE3 draft for a given target."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    """The target's vocabulary (t2d has this length)."""
    draft_vocab_size: int
    """Rows of the draft's lm_head; equal to vocab_size for a full vocabulary."""
    target_hidden_size: int
    num_taps: int = 3
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} must be in [1, vocab_size={self.vocab_size}]")

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab_size: int | None = None) -> "DraftConfig":
        return cls(
            hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
            num_heads=target.num_heads, num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
            vocab_size=target.vocab_size, draft_vocab_size=draft_vocab_size or target.vocab_size,
            target_hidden_size=target.hidden_size, num_taps=len(target.tap_layers),
            rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
            rope_scaling=dict(target.rope_scaling), max_position_embeddings=target.max_position_embeddings,
        )

    def replace(self, **changes) -> "DraftConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class DraftOutput:
    logits: torch.Tensor
    """[B, T, Vd] over the draft vocabulary ([B, Vd] when ``logit_index`` was given)."""
    hidden: torch.Tensor
    """Pre-norm hidden state [B, T, H]: the next depth's input ([B, H] when ``logit_index`` was given)."""


NATIVE_ATTENTION_MAX_TOKENS = 8
"""Most queries per row that take the native attention kernel (it makes one pass per group of four)."""
NATIVE_TREE_MAX_TOKENS = 64
"""The same for a token tree's nodes (the width of its mask)."""


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        self.config = cfg
        H, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
        self.embed = nn.Embedding(cfg.vocab_size, H)
        self.embed.weight.requires_grad_(False)
        self.fc = Linear(cfg.num_taps * cfg.target_hidden_size, H, bias=False)
        self.input_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.qkv = Linear(2 * H, (self.nh + 2 * self.nkv) * hd, bias=False)
        self.o = Linear(self.nh * hd, H, bias=False)
        self.post_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = GatedMLP(H, cfg.intermediate_size)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = Linear(H, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        self.rope = RotaryTable(hd, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, torch.float32)
        self.set_vocab(torch.arange(cfg.draft_vocab_size))

    # ---- vocabulary -----------------------------------------------------------------------------
    def set_vocab(self, target_ids: torch.Tensor) -> None:
        """Use ``target_ids`` (sorted, unique, one per lm_head row) as the draft vocabulary."""
        ids = torch.as_tensor(target_ids, dtype=torch.long)
        if ids.numel() != self.config.draft_vocab_size:
            raise ValueError(f"{ids.numel()} vocabulary ids for draft_vocab_size={self.config.draft_vocab_size}")
        if ids.unique().numel() != ids.numel() or int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError("draft vocabulary ids must be unique and inside the target vocabulary")
        ids = ids.sort().values
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.zero_()
        self.t2d[ids] = True

    def remap_vocab(self, target_ids: torch.Tensor, seed: int = 0, head_rows: torch.Tensor | None = None) -> int:
        """Refresh the draft vocabulary: rows of tokens kept move along; new tokens start from
        ``head_rows`` (a [vocab_size, H] table indexed by target id, e.g. the target's lm_head) or, without
        it, small random rows.

        Returns how many tokens are new. The caller moves the optimizer state for lm_head along
        (``aurora_rl.training.vocab.remap_moments``) or resets it.
        """
        ids = torch.as_tensor(target_ids, dtype=torch.long).sort().values
        old = self.target_to_draft(ids)
        kept = old >= 0
        if head_rows is None:
            head = torch.randn(self.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.02
        else:
            if tuple(head_rows.shape) != (self.config.vocab_size, self.config.hidden_size):
                raise ValueError(f"head_rows must be [{self.config.vocab_size}, {self.config.hidden_size}], "
                                 f"got {list(head_rows.shape)}")
            head = head_rows[ids].clone()
        head = head.to(self.lm_head.weight.dtype)
        head[kept] = self.lm_head.weight.data[old[kept]]
        with torch.no_grad():
            self.lm_head.weight.copy_(head)
        self.set_vocab(ids)
        return int((~kept).sum())

    @property
    def draft_to_target(self) -> torch.Tensor:
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids of ``target_ids``; -1 where a token is outside the draft vocabulary."""
        lookup = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        lookup[self.draft_to_target] = torch.arange(self.d2t.numel(), device=self.d2t.device)
        return lookup[target_ids]

    def init_from_target(self, target: nn.Module, seed: int = 0) -> "Eagle3Draft":
        """Day 0: random weights, the target's (frozen) embedding, the target's lm_head rows as head."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 2 and name != "embed.weight":
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
        with torch.no_grad():
            self.embed.weight.copy_(target.embed.weight.float())
        return self

    # ---- forward --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> "Eagle3Draft":
        self.to(dtype)
        self.rope.to(dtype)
        return self

    def new_cache(self, num_slots: int, max_len: int) -> SlotKVCache:
        return SlotKVCache(1, num_slots, self.nkv, self.hd, max_len, dtype=self.dtype, device=self.fc.weight.device)

    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        return self.fc(taps.to(self.dtype))

    def project_qkv(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """q [B, nh, T, hd], k and v [B, nkv, T, hd] (rope applied) for inputs (token, hidden) at positions."""
        B, T, _ = hidden.shape
        x = torch.cat([self.input_norm(self.embed(token_ids).to(hidden.dtype)), self.hidden_norm(hidden)], -1)
        q, k, v = self.qkv(x).view(B, T, -1, self.hd).split([self.nh, self.nkv, self.nkv], dim=2)
        cos, sin = self.rope.gather(positions)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def post_attention(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual over ``hidden`` with the attention output [B, T, nh*hd], then the MLP block."""
        h = hidden + self.o(attn)
        return h + self.mlp(self.post_norm(h))

    def _fused_weights(self) -> tuple | None:
        """Weights for ``cpu_kernels.draft_layer``; None where it does not apply."""
        packed = [lin.packed_weight() for lin in (self.qkv, self.o, self.mlp.gate_up, self.mlp.down)]
        if any(p is None for p in packed) or self.config.hidden_size % 16 or self.config.intermediate_size % 16:
            return None
        return (self.input_norm.weight, self.hidden_norm.weight, self.post_norm.weight, *packed)

    def _fused_step(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    cache: SlotKVCache, slots: torch.Tensor, logit_index: torch.Tensor | None,
                    tree: TreeAttention | None = None) -> DraftOutput | None:
        """A few tokens per row in one native call for the layer (a proposal step, or feeding the tokens
        a verify kept); None where the kernels do not apply (training, long extends, other dtypes). With
        ``logit_index`` every position goes through the layer (a few rows cost little more than one)
        and the head runs on the indexed one."""
        B, T, H = hidden.shape
        limit = NATIVE_ATTENTION_MAX_TOKENS if tree is None else NATIVE_TREE_MAX_TOKENS
        if T > limit or torch.is_grad_enabled() or hidden.dtype != self.dtype:
            return None
        kv_len = int((positions if tree is None else tree.cache_index).max()) + 1
        hidden = hidden.contiguous()
        if (kv_len > self.rope.cos.shape[0] or cache.k[0].dtype != self.dtype
                or not cpu_kernels.attention_supported(cache.k[0]) or not cpu_kernels.elementwise_supported(hidden)):
            return None
        weights = self._fused_weights()
        if weights is None:
            return None
        c = self.config
        emb = self.embed(token_ids).to(self.dtype).contiguous()
        resid, mlp_out = torch.empty(2, B, T, H, dtype=self.dtype)
        work = cpu_kernels.layer_workspace(B * T, H, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                           self.dtype, qkv_in=2 * H)
        cpu_kernels.draft_layer(emb, hidden, resid, mlp_out, weights, self.rope.cos, self.rope.sin,
                                positions.long().contiguous(), slots.long().contiguous(), cache.k[0], cache.v[0],
                                kv_len, work, (c.num_heads, c.num_kv_heads, c.head_dim, H, c.intermediate_size),
                                c.rms_norm_eps, **({} if tree is None else {"tree": (tree.cache_index, tree.mask)}))
        h, normed = cpu_kernels.add_rmsnorm(resid, mlp_out, self.norm.weight, c.rms_norm_eps)
        if logit_index is not None:
            rows = torch.arange(B)
            h, normed = h[rows, logit_index], normed[rows, logit_index]
        return DraftOutput(logits=self.lm_head(normed), hidden=h)

    def forward(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                cache: SlotKVCache, slots: torch.Tensor, logit_index: torch.Tensor | None = None,
                tree: TreeAttention | None = None) -> DraftOutput:
        """Serving step over the draft's slot cache (``hidden`` already fused or the draft's own).

        With ``logit_index`` [B] (feeding a run of kept positions), every position writes its key and
        value to the cache but only the indexed one per row goes on through attention, the MLP and the
        head: the others are only ever read as keys, so a long catch-up costs two projections per position.
        With ``tree`` (a token tree's nodes, no ``logit_index``) ``positions`` are RoPE's and ``tree`` places
        each node's cache entry and masks its non-ancestors (``aurora_rl.engine.token_tree``).
        """
        if tree is not None:
            assert logit_index is None
            tree = TreeAttention(tree.cache_index.long().contiguous(), tree.mask.long().contiguous())
        fused = self._fused_step(token_ids, hidden, positions, cache, slots, logit_index, tree)
        if fused is not None:
            return fused
        q, k, v = self.project_qkv(token_ids, hidden, positions)
        if tree is not None:
            return self._tree_attention(q, k, v, hidden, cache, slots, tree)
        cache.write(0, slots, positions, k, v)
        if logit_index is not None:
            rows = torch.arange(q.shape[0])
            q, hidden = q[rows, :, logit_index].unsqueeze(2), hidden[rows, logit_index].unsqueeze(1)
            positions = positions[rows, logit_index].unsqueeze(1)
        kv_len = int(positions.max()) + 1
        if (positions.shape[1] <= NATIVE_ATTENTION_MAX_TOKENS and not torch.is_grad_enabled()
                and q.dtype == cache.k[0].dtype and cpu_kernels.attention_supported(cache.k[0])):
            # Few queries per row (a chain step, a short extend): the fused single-pass CPU kernel.
            attn = cpu_kernels.attention(q.transpose(1, 2), cache.k[0], cache.v[0], slots.long(), positions.long(),
                                         self.hd ** -0.5, kv_len)
        else:
            keys, values = cache.view(0, slots, kv_len)
            uniform = positions.shape[1] == 1 and bool((positions == kv_len - 1).all())
            attn = attend(q, keys, values, None if uniform else causal_mask(positions, kv_len))
        h = self.post_attention(hidden, attn)
        if logit_index is not None:
            h = h[:, 0]
        return DraftOutput(logits=self.lm_head(self.norm(h)), hidden=h)

    def _tree_attention(self, q, k, v, hidden, cache: SlotKVCache, slots: torch.Tensor,
                        tree: TreeAttention) -> DraftOutput:
        """The PyTorch path of a tree pass: write at the nodes' cache entries, attend under the tree mask."""
        cache.write(0, slots, tree.cache_index, k, v)
        kv_len = int(tree.cache_index.max()) + 1
        if (tree.cache_index.shape[1] <= NATIVE_TREE_MAX_TOKENS and not torch.is_grad_enabled()
                and q.dtype == cache.k[0].dtype and cpu_kernels.attention_supported(cache.k[0])):
            attn = cpu_kernels.attention(q.transpose(1, 2), cache.k[0], cache.v[0], slots.long(), tree.cache_index,
                                         self.hd ** -0.5, kv_len, tree_mask=tree.mask)
        else:
            keys, values = cache.view(0, slots, kv_len)
            attn = attend(q, keys, values, tree_mask(tree.cache_index, tree.mask, kv_len))
        h = self.post_attention(hidden, attn)
        return DraftOutput(logits=self.lm_head(self.norm(h)), hidden=h)


def token_frequencies(token_lists, vocab_size: int) -> torch.Tensor:
    """Counts [vocab_size] of token ids over a traffic sample (lists or tensors of ids)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_lists:
        counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    return counts


def select_draft_vocab(counts: torch.Tensor, size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The ``size`` most frequent target ids (ties broken by lower id), plus ``always`` (e.g. EOS), sorted."""
    if not 1 <= size <= counts.numel():
        raise ValueError(f"draft vocabulary size {size} must be in [1, {counts.numel()}]")
    score = counts.double() - torch.arange(counts.numel(), dtype=torch.double) / (2 * counts.numel())
    score[list(always)] = float("inf")
    return score.topk(size).indices.sort().values
