"""WeightStore: versioned draft weights, one copy in the object store however many workers pull.

The learner ``ray.put``s a state dict once and publishes the reference with its version; workers ask
``get_if_newer(version)`` at a step boundary and fetch the object only when there is a newer one.
Only the latest version is kept referenced, so older copies are freed. Weights containing NaN or Inf
are refused by ``check_finite`` before they are ever published (counted, never served).
"""

from __future__ import annotations

import time
from typing import Any

import torch


def check_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of tensors holding NaN or Inf (empty when the state is safe to publish)."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class WeightStore:
    def __init__(self) -> None:
        self.version = -1
        self._ref: list[Any] | None = None
        self.published = 0
        self.refused = 0
        self.published_at = 0.0

    def publish(self, version: int, wrapped_ref: list[Any]) -> bool:
        """Make ``wrapped_ref[0]`` the current weights; versions must increase."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the current {self.version}")
        self.version, self._ref = version, wrapped_ref
        self.published += 1
        self.published_at = time.time()
        return True

    def refuse(self, version: int, bad: list[str]) -> None:
        """Record a refused publication (non-finite weights)."""
        self.refused += 1

    def get_if_newer(self, version: int) -> tuple[int, list[Any]] | None:
        if self._ref is None or self.version <= version:
            return None
        return self.version, self._ref

    def stats(self) -> dict[str, float]:
        return {"weights/version": float(self.version), "weights/published": float(self.published),
                "weights/refused_nonfinite": float(self.refused), "weights/published_at": self.published_at}
