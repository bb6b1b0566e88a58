"""Tree proposer: per row, a token tree from the draft's top-k expansion and the context's copy chain.

The draft side follows EAGLE-2's dynamic tree: from the row's depth-1 draft output take the top-k
tokens; at each further depth feed the k best frontier nodes of every row to the draft in one batched
pass (packed, one token per row, each node attending to the row's draft cache and its own fed
ancestors through a tree mask) and score their top-k children by cumulative draft log-probability;
the frontier is the k best new children. At the end the ``budget`` best nodes by cumulative
log-probability (closed under ancestors) form the tree, after the copy chain, which goes in first as
one more branch (``aurora_rl.engine.context_copy``) so that a step tries both.

Draft cache entries written while expanding lie past the slot's draft length and are overwritten when
the decoder feeds the kept positions; the slot's length never moves here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from aurora_rl.engine.sequence import Sequence
from aurora_rl.engine.token_tree import COPY, DRAFT, MAX_TREE_NODES, TokenTree, ancestor_bits, select_nodes
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.kv_cache import SlotKVCache
from aurora_rl.models.layers import TreeAttention


@dataclass
class _Pool:
    """One row's scored draft candidates: parents index the pool (-1: the root)."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    logp: list[float]
    fed: list[int]
    """Pool indices fed to the draft so far, in cache order."""


class TreeProposer:
    """Builds the token trees of one step (see the module docstring)."""

    def __init__(self, draft: Eagle3Draft, cache: SlotKVCache, topk: int, max_depth: int) -> None:
        if topk < 1 or max_depth < 1:
            raise ValueError(f"tree proposals need topk >= 1 and max_depth >= 1, got topk={topk}, "
                             f"max_depth={max_depth}")
        self.draft, self.cache, self.topk, self.max_depth = draft, cache, topk, max_depth
        self.draft_calls = 0

    def propose(self, seqs: list[Sequence], budgets: list[int], copies: list[list[int]],
                states: dict[int, tuple[torch.Tensor, torch.Tensor]],
                probs_fn: Callable[[torch.Tensor, Sequence], torch.Tensor],
                max_depths: list[int] | None = None) -> list[TokenTree]:
        """Trees for ``seqs``: ``budgets[b]`` proposals at most (0: the root alone), ``copies[b]`` the copy
        chain to put in first, ``states[b]`` = (depth-1 draft logits, hidden) for rows that draft, no
        node deeper than ``max_depths[b]`` (the tokens a step could still keep)."""
        max_depths = max_depths or [MAX_TREE_NODES] * len(seqs)
        pools: dict[int, _Pool] = {}
        hidden: dict[tuple[int, int], torch.Tensor] = {}
        for b, (logits, h) in states.items():
            pools[b] = _Pool([], [], [], [], [])
            self._expand(pools[b], -1, 0.0, probs_fn(logits, seqs[b]))
            hidden[b, -1] = h
        depth_cap = {b: min(self.max_depth, budgets[b], max_depths[b], (MAX_TREE_NODES - 1) // self.topk + 1,
                            # every fed node takes a draft cache entry past the slot's length
                            (self.cache.max_len - int(self.cache.lengths[seqs[b].slot])) // self.topk + 1)
                     for b in pools}
        frontier = {b: list(range(len(pools[b].tokens))) for b in pools}
        for depth in range(2, max(depth_cap.values(), default=0) + 1):
            rows = [b for b in pools if depth <= depth_cap[b] and frontier[b]]
            if not rows:
                break
            outs = self._feed(seqs, pools, frontier, hidden, rows, depth)
            for b in rows:
                pool, new = pools[b], []
                for node, (logits, h) in zip(frontier[b], outs[b]):
                    hidden[b, node] = h
                    new += self._expand(pool, node, pool.scores[node], probs_fn(logits, seqs[b]))
                new.sort(key=lambda i: (-pool.scores[i], i))
                frontier[b] = new[: self.topk]
        return [self._tree(seq, budgets[b], copies[b][: max_depths[b]], pools.get(b)) for b, seq in enumerate(seqs)]

    def _expand(self, pool: _Pool, parent: int, score: float, probs: torch.Tensor) -> list[int]:
        """Add the top-k children of ``parent`` (draft-vocab ``probs``) to the pool; their indices."""
        k = min(self.topk, int((probs > 0).sum()))
        top = probs.topk(k)
        ids = self.draft.draft_to_target[top.indices].tolist()
        logps = top.values.clamp_min(1e-30).log().tolist()
        first = len(pool.tokens)
        for tok, lp in zip(ids, logps):
            pool.tokens.append(tok)
            pool.parents.append(parent)
            pool.scores.append(score + lp)
            pool.logp.append(lp)
        return list(range(first, first + k))

    def _feed(self, seqs, pools, frontier, hidden, rows: list[int], depth: int) -> dict[int, list]:
        """One draft pass over every row's frontier (nodes at depth - 1), packed one token per row."""
        slots, toks, pos, index, masks, hs, owner = [], [], [], [], [], [], []
        for b in rows:
            pool, slot = pools[b], seqs[b].slot
            length = int(self.cache.lengths[slot])
            for node in frontier[b]:
                pool.fed.append(node)
            fed_at = {node: j for j, node in enumerate(pool.fed)}
            bits = ancestor_bits([fed_at.get(pool.parents[n], -1) for n in pool.fed])
            for node in frontier[b]:
                j = fed_at[node]
                slots.append(slot)
                toks.append(pool.tokens[node])
                pos.append(length + depth - 2)
                index.append(length + j)
                masks.append(bits[j])
                hs.append(hidden[b, pool.parents[node]])
                owner.append((b, node))
        tree = TreeAttention(torch.tensor(index).view(-1, 1), torch.tensor(masks, dtype=torch.long).view(-1, 1))
        with torch.inference_mode():
            out = self.draft(torch.tensor(toks).view(-1, 1), torch.stack(hs).unsqueeze(1),
                             torch.tensor(pos).view(-1, 1), self.cache, torch.tensor(slots), tree=tree)
        self.draft_calls += 1
        result: dict[int, list] = {b: [] for b in rows}
        for i, (b, _node) in enumerate(owner):
            result[b].append((out.logits[i, 0], out.hidden[i, 0]))
        return result

    def _tree(self, seq: Sequence, budget: int, copy: list[int], pool: _Pool | None) -> TokenTree:
        tree = TokenTree.rooted(seq.last_token)
        node = 0
        for tok in copy[:budget]:
            node = tree.add(node, tok, 0.0, COPY)
        if pool is None:
            return tree
        placed: dict[int, int] = {-1: 0}
        for i in sorted(select_nodes(pool.scores, pool.parents, budget)):
            parent = placed.get(pool.parents[i])
            if parent is None:
                continue
            if tree.child(parent, pool.tokens[i]) is None and tree.num_proposals >= budget:
                continue
            placed[i] = tree.add(parent, pool.tokens[i], pool.logp[i], DRAFT)
        return tree
