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
        starts = self.cache.lengths[slots]
        if int((starts + torch.tensor(counts)).max()) > self.max_len:
            raise ValueError(f"extending slots {slots} by {counts} tokens exceeds max_len={self.max_len}")
        ids = torch.tensor([t + [t[-1]] * (T - len(t)) for t in tokens], dtype=torch.long)
        positions = starts.unsqueeze(1) + torch.arange(T).unsqueeze(0)
        # Padding may run past max_len for a row near the end of its context. Clamped, it lands past the
        # row's length (never attended) or on its own last position with the same token (same values).
        positions = positions.clamp(max=self.max_len - 1)
        logit_index = torch.tensor(counts) - 1 if last_only else None
        out = self.model(ids, positions, self.cache, torch.tensor(slots), logit_index=logit_index,
                         with_taps=with_taps)
        self.cache.lengths[slots] = starts + torch.tensor(counts)
        return out

    def truncate(self, slot: int, length: int) -> None:
        assert 0 <= length <= int(self.cache.lengths[slot])
        self.cache.lengths[slot] = length

    def release(self, slot: int) -> None:
        self.cache.lengths[slot] = 0
