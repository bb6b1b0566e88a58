"""ModelRunner: token lists in, target outputs out. Owns the target model and its slot KV cache.

``extend(slots, tokens)`` appends each row's tokens after that slot's current cache length in one
batched forward (prefill, decode and speculative verify are all this call with different token
counts); ``truncate(slot, length)`` rolls a slot back, which is how rejected draft tokens vanish.
"""

from __future__ import annotations

import torch

from aurora_rl.models.target import TargetModel, TargetOutput


class ModelRunner:
    def __init__(self, model: TargetModel, num_slots: int, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(num_slots, max_len)
        self.max_len = max_len

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths

    def extend(self, slots: list[int], tokens: list[list[int]], last_only: bool = False,
               with_taps: bool = False) -> TargetOutput:
        """Append ``tokens[b]`` to slot ``slots[b]``; rows may differ in length (right padded).

        With ``last_only`` the logits are those of each row's last real token, shape [B, V].
        """
        counts = [len(t) for t in tokens]
        T = max(counts)
        lengths = self.cache.lengths.tolist()
        starts = [lengths[s] for s in slots]
        if max(s + c for s, c in zip(starts, counts)) > self.max_len:
            raise ValueError(f"extending slots {slots} by {counts} tokens exceeds max_len={self.max_len}")
        ids = torch.tensor([t + [t[-1]] * (T - len(t)) for t in tokens], dtype=torch.long)
        # Padding may run past max_len for a row near the end of its context. Clamped, it lands past the
        # row's length (never attended) or on its own last position with the same token (same values).
        last = self.max_len - 1
        positions = torch.tensor([[min(s + i, last) for i in range(T)] for s in starts], dtype=torch.long)
        logit_index = torch.tensor([c - 1 for c in counts]) if last_only else None
        slot_ids = torch.tensor(slots, dtype=torch.long)
        out = self.model(ids, positions, self.cache, slot_ids, logit_index=logit_index, with_taps=with_taps)
        self.cache.lengths[slot_ids] = torch.tensor([s + c for s, c in zip(starts, counts)])
        return out

    def truncate(self, slot: int, length: int) -> None:
        assert 0 <= length <= int(self.cache.lengths[slot])
        self.cache.lengths[slot] = length

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
