"""Training-time test (TTT): the draft unrolled to depth K over a trace, exactly as it runs at serving.

At base position i, depth 1 takes token x_{i+1} and the fused target features g_i (rope position i);
depth j takes token x_{i+j} and the draft's own depth j-1 hidden state (rope position i+j-1) and
predicts x_{i+j+1}. Attention follows serving: a depth-j query at base i sees the depth-1 keys of
positions 0..i (what the draft cache holds from target features) plus the keys of its own chain at
depths 2..j (what the draft wrote while proposing). Keys and values are computed at every position;
queries, attention, the MLP and the head only at the bases the loss uses, at every depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aurora_rl.models.draft import Eagle3Draft


@dataclass
class TTTInputs:
    tokens: torch.Tensor
    """[B, T+1] long: x_0..x_T per row (right padded)."""
    features: torch.Tensor
    """[B, T, num_taps*H]: target tapped features g_0..g_{T-1} (right padded)."""
    lengths: torch.Tensor
    """[B] long: L, the number of positions with features (tokens has L+1 real entries)."""
    bases: torch.Tensor
    """[B, S] long: base positions whose chains are unrolled (padded with 0)."""
    base_valid: torch.Tensor
    """[B, S] bool."""


def _qkv(draft: Eagle3Draft, token_ids, hidden, positions):
    """The draft's q/k/v with k/v expanded to all query heads (explicit attention below needs it)."""
    q, k, v = draft.project_qkv(token_ids, hidden, positions)
    rep = draft.nh // draft.nkv
    return q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)


def _finish(draft: Eagle3Draft, hidden, attn_out):
    B, nh, T, D = attn_out.shape
    return draft.post_attention(hidden, attn_out.transpose(1, 2).reshape(B, T, nh * D))


def unroll(draft: Eagle3Draft, inp: TTTInputs, depth: int) -> torch.Tensor:
    """Draft logits [B, S, depth, Vd] at every base and depth (differentiable)."""
    B, T = inp.features.shape[:2]
    pos = torch.arange(T).expand(B, T)
    hidden = draft.fuse(inp.features)
    # Every position's key and value is context, but only the bases' queries go on: attention, the
    # MLP and the head run at S rows, not T (a prompt of hundreds of tokens feeds a few dozen bases).
    q1, k1, v1 = _qkv(draft, inp.tokens[:, 1:T + 1], hidden, pos)
    bases = inp.bases
    S = bases.shape[1]
    # Depth-1 keys a base may see: positions 0..i.
    prefix = torch.arange(T).view(1, 1, 1, T) <= bases.view(B, 1, S, 1)
    q = q1.gather(2, bases.view(B, 1, S, 1).expand(B, q1.shape[1], S, q1.shape[-1]))
    h = hidden.gather(1, bases.unsqueeze(-1).expand(B, S, hidden.shape[-1]))
    h = _finish(draft, h, F.scaled_dot_product_attention(q, k1, v1, attn_mask=prefix))
    logits = [draft.lm_head(draft.norm(h))]
    scale = draft.hd ** -0.5
    chain_k, chain_v = [], []
    for j in range(2, depth + 1):
        tok_idx = (bases + j).clamp(max=inp.tokens.shape[1] - 1)
        q, k, v = _qkv(draft, inp.tokens.gather(1, tok_idx), h, bases + j - 1)
        chain_k.append(k)
        chain_v.append(v)
        s_prefix = (q @ k1.transpose(-1, -2)) * scale
        s_prefix = s_prefix.masked_fill(~prefix, float("-inf"))
        s_chain = torch.stack([(q * kc).sum(-1) * scale for kc in chain_k], dim=-1)  # [B, nh, S, j-1]
        probs = torch.softmax(torch.cat([s_prefix, s_chain], dim=-1), dim=-1)
        out = probs[..., :T] @ v1 + (probs[..., T:].unsqueeze(-1) * torch.stack(chain_v, dim=-2)).sum(-2)
        h = _finish(draft, h, out)
        logits.append(draft.lm_head(draft.norm(h)))
    return torch.stack(logits, dim=2)
