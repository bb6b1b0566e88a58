"""ModelRunner: token lists in, target outputs out. Owns the target model and its slot KV cache.

``extend(slots, tokens)`` appends each row's tokens after that slot's current cache length in one
batched forward (prefill, decode and speculative verify are all this call with different token
counts); ``truncate(slot, length)`` rolls a slot back, which is how rejected draft tokens vanish.
"""

from __future__ import annotations

import torch

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

    def truncate(self, slot: int, length: int) -> None:
        assert 0 <= length <= int(self.cache.lengths[slot])
        self.cache.lengths[slot] = length

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
