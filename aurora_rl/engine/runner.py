"""ModelRunner: token lists in, target outputs out. Owns the target model and its slot KV cache.

``extend(slots, tokens)`` appends each row's tokens after that slot's current cache length in one
batched forward (prefill, decode and speculative verify are all this call with different token
counts); ``truncate(slot, length)`` rolls a slot back, which is how rejected draft tokens vanish.
"""

from __future__ import annotations

import torch

from aurora_rl.engine.token_tree import TokenTree
from aurora_rl.models.layers import TreeAttention
from aurora_rl.models.target import TargetModel, TargetOutput


class ModelRunner:
    def __init__(self, model: TargetModel, num_slots: int, max_len: int, deterministic: bool = False) -> None:
        self.model = model
        self.deterministic = deterministic
        """Run every pass the model can run ragged as one token per row, even when all rows have as many
        tokens (a verify of k+1 tokens then computes each like a decode of one)."""
        self.cache = model.new_cache(num_slots, max_len)
        self.max_len = max_len
        self.last_rows = 0
        """Token rows the last ``extend`` computed (its real tokens when packed, rows x longest when padded)."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths

    def extend(self, slots: list[int], tokens: list[list[int]], last_only: bool = False,
               with_taps: bool = False) -> TargetOutput:
        """Append ``tokens[b]`` to slot ``slots[b]``; rows may differ in length (packed without padding
        where the model can, else right padded).

        With ``last_only`` the logits are those of each row's last real token, shape [B, V].
        """
        counts = [len(t) for t in tokens]
        T = max(counts)
        lengths = self.cache.lengths.tolist()
        starts = [lengths[s] for s in slots]
        if max(s + c for s, c in zip(starts, counts)) > self.max_len:
            raise ValueError(f"extending slots {slots} by {counts} tokens exceeds max_len={self.max_len}")
        if (min(counts) < T or (self.deterministic and T > 1)) and self.model.runs_ragged(self.cache, T):
            out = self._extend_ragged(slots, tokens, starts, last_only, with_taps)
            self.last_rows = sum(counts)
        else:
            out = self._extend_padded(slots, tokens, starts, last_only, with_taps)
            self.last_rows = len(tokens) * T
        self.cache.lengths[torch.tensor(slots, dtype=torch.long)] = torch.tensor(
            [s + c for s, c in zip(starts, counts)])
        return out

    def _extend_padded(self, slots: list[int], tokens: list[list[int]], starts: list[int], last_only: bool,
                       with_taps: bool) -> TargetOutput:
        """Rows right padded to the longest: every row costs as much as the longest one."""
        counts = [len(t) for t in tokens]
        T = max(counts)
        ids = torch.tensor([t + [t[-1]] * (T - len(t)) for t in tokens], dtype=torch.long)
        # Padding may run past max_len for a row near the end of its context. Clamped, it lands past the
        # row's length (never attended) or on its own last position with the same token (same values).
        last = self.max_len - 1
        positions = torch.tensor([[min(s + i, last) for i in range(T)] for s in starts], dtype=torch.long)
        logit_index = torch.tensor([c - 1 for c in counts]) if last_only else None
        slot_ids = torch.tensor(slots, dtype=torch.long)
        return self.model(ids, positions, self.cache, slot_ids, logit_index=logit_index, with_taps=with_taps)

    def _extend_ragged(self, slots: list[int], tokens: list[list[int]], starts: list[int], last_only: bool,
                       with_taps: bool) -> TargetOutput:
        """Rows of different lengths without padding: each token is a row of its own (its slot, its
        position), so a verify pass where one request proposes 4 tokens and three propose none runs 8
        tokens, not 20. Outputs come back in the padded [B, T] layout (a padded position repeats its
        row's last real token, as ``_extend_padded`` computes it)."""
        counts = [len(t) for t in tokens]
        T = max(counts)
        flat = torch.tensor([tok for t in tokens for tok in t], dtype=torch.long).view(-1, 1)
        positions = torch.tensor([s + i for s, c in zip(starts, counts) for i in range(c)], dtype=torch.long)
        token_slots = torch.tensor([s for s, c in zip(slots, counts) for _ in range(c)], dtype=torch.long)
        out = self.model(flat, positions.view(-1, 1), self.cache, token_slots, with_taps=with_taps)
        offsets = [0]
        for c in counts[:-1]:
            offsets.append(offsets[-1] + c)
        index = torch.tensor([[o + min(i, c - 1) for i in range(T)] for o, c in zip(offsets, counts)])
        logits = out.logits[index[:, -1], 0] if last_only else out.logits[index, 0]  # last column: last real token
        return TargetOutput(logits, out.hidden[index, 0], out.taps[index, 0] if with_taps else None)

    def extend_tree(self, slots: list[int], trees: list[TokenTree], with_taps: bool = True) -> TargetOutput:
        """Verify token trees in one pass: row b's node i runs at RoPE position ``length + depth(i)`` and
        cache entry ``length + i`` under its ancestor mask (``aurora_rl.engine.token_tree``). Outputs
        [B, T, ...] in node order (T the largest tree; a smaller tree's extra columns repeat its root).
        Rows of one size, or one row, run as [B, T]; rows of different sizes are packed one token per
        row. Lengths are not moved: ``keep_path`` does that once the accepted path is known."""
        counts = [len(t) for t in trees]
        T = max(counts)
        starts = self.cache.lengths[torch.tensor(slots, dtype=torch.long)].tolist()
        if max(s + c for s, c in zip(starts, counts)) > self.max_len:
            raise ValueError(f"trees of {counts} nodes on slots {slots} exceed max_len={self.max_len}")
        bits = [t.mask_bits() for t in trees]
        if min(counts) == T or len(trees) == 1:
            ids = torch.tensor([t.tokens for t in trees], dtype=torch.long)
            pos = torch.tensor([[s + d for d in t.depths] for s, t in zip(starts, trees)], dtype=torch.long)
            index = torch.tensor([[s + i for i in range(c)] for s, c in zip(starts, counts)], dtype=torch.long)
            tree = TreeAttention(index, torch.tensor(bits, dtype=torch.long))
            self.last_rows = len(trees) * T
            return self.model(ids, pos, self.cache, torch.tensor(slots, dtype=torch.long), with_taps=with_taps,
                              tree=tree)
        flat = torch.tensor([tok for t in trees for tok in t.tokens], dtype=torch.long).view(-1, 1)
        pos = torch.tensor([s + d for s, t in zip(starts, trees) for d in t.depths], dtype=torch.long).view(-1, 1)
        index = torch.tensor([s + i for s, c in zip(starts, counts) for i in range(c)], dtype=torch.long).view(-1, 1)
        token_slots = torch.tensor([s for s, c in zip(slots, counts) for _ in range(c)], dtype=torch.long)
        tree = TreeAttention(index, torch.tensor([m for row in bits for m in row], dtype=torch.long).view(-1, 1))
        out = self.model(flat, pos, self.cache, token_slots, with_taps=with_taps, tree=tree)
        self.last_rows = sum(counts)
        offsets = [0]
        for c in counts[:-1]:
            offsets.append(offsets[-1] + c)
        gather = torch.tensor([[o + (i if i < c else 0) for i in range(T)] for o, c in zip(offsets, counts)])
        return TargetOutput(out.logits[gather, 0], out.hidden[gather, 0],
                            out.taps[gather, 0] if with_taps else None)

    def keep_path(self, slot: int, path: list[int]) -> None:
        """After ``extend_tree``: keep the root and the accepted nodes ``path`` (node indices, root's child
        first), moving their cache entries to consecutive positions after the root's; the rest of the
        cache is neither read nor copied."""
        base = int(self.cache.lengths[slot])
        src = [base + n for n in path]
        dst = [base + 1 + j for j in range(len(path))]
        moved = [(s, d) for s, d in zip(src, dst) if s != d]
        if moved:
            s_idx = torch.tensor([s for s, _ in moved])
            d_idx = torch.tensor([d for _, d in moved])
            for layer in range(len(self.cache.k)):  # sources lie past every destination: gather, then write
                for c in (self.cache.k[layer], self.cache.v[layer]):
                    c[slot, :, d_idx] = c[slot, :, s_idx]
        self.cache.lengths[slot] = base + 1 + len(path)

    def truncate(self, slot: int, length: int) -> None:
        assert 0 <= length <= int(self.cache.lengths[slot])
        self.cache.lengths[slot] = length

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
