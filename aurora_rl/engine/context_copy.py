"""Context copy (prompt lookup): propose the tokens that followed the request's own last tokens before.

Answers repeat their context: code is edited and quoted back, names and phrases recur, and a small
target's greedy output loops. Where the last n tokens (n from ``max_match`` down to ``min_match``) occurred
earlier in the prompt or the output, the tokens that followed that occurrence (the most recent one) are
a proposal chain that costs no draft pass. Measured on 16 held-out ShareGPT code prompts with SmolLM2
(96 greedy tokens each, the day-0 draft after 120 requests): where a 4-token suffix matched (39% of
steps) the copied token was the target's 87% of the time, against the draft's 19% at those steps; over
all steps 50% against 22%.

``ContextIndex`` keeps, per request, a map from every n-gram of its committed tokens to the position
after its most recent occurrence, updated incrementally as tokens are committed (O(new tokens x
match lengths) a step), so a lookup is a few dict probes. The decoder owns one index per slot.
"""

from __future__ import annotations


class ContextIndex:
    """The n-grams of one request's committed tokens, for copy proposals."""

    __slots__ = ("min_match", "max_match", "tokens", "_after", "_indexed")

    def __init__(self, min_match: int, max_match: int) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got min_match={min_match}, max_match={max_match}")
        self.min_match, self.max_match = min_match, max_match
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}
        """n-gram -> index of the token that followed its most recent occurrence."""
        self._indexed = 0
        """n-grams ending before this index are in ``_after`` (those ending at the last token have no
        follower yet, and the suffix being looked up must not find itself)."""

    def sync(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Bring the index up to the request's committed tokens (prompt, then output)."""
        n, P = len(self.tokens), len(prompt_ids)
        if n < P:
            self.tokens += prompt_ids[n:]
        self.tokens += output_ids[max(0, len(self.tokens) - P):]
        t, after = self.tokens, self._after
        for end in range(self._indexed, len(t) - 1):
            for size in range(self.min_match, min(self.max_match, end + 1) + 1):
                after[tuple(t[end - size + 1:end + 1])] = end + 1
        self._indexed = max(self._indexed, len(t) - 1)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest matching suffix last time; [] if none matches."""
        t = self.tokens
        if k <= 0:
            return []
        for size in range(min(self.max_match, len(t)), self.min_match - 1, -1):
            start = self._after.get(tuple(t[len(t) - size:]))
            if start is not None:
                return t[start:start + k]
        return []
