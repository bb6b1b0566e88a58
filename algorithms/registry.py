"""Name → learning rule: `register` a loss under a name, `get_algorithm` it back by that name.

Each algorithm is a config dataclass plus a pure `loss(batch, cfg) -> LossOutput`. Unknown names are
errors that list the registered ones, so a typo in `algorithm=...` fails with the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from algorithms.batch import LossBatch, LossOutput

LossFn = Callable[[LossBatch, Any], LossOutput]


@dataclass(frozen=True)
class Algorithm:
    """A registered learning rule."""

    name: str
    """Registry key, e.g. "aurora"."""
    config_cls: type
    """Its config dataclass; `config_cls()` gives the documented defaults."""
    loss: LossFn
    """Pure `loss(batch, cfg) -> LossOutput`."""

    def make_config(self, **overrides: Any):
        """The config with `overrides` applied (validated by the dataclass's `__post_init__`)."""
        return self.config_cls(**overrides)


_ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, config: type) -> Callable[[LossFn], LossFn]:
    """Decorator registering `loss` under `name` with its config class; names are unique."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"algorithm name must be a non-empty string, got {name!r}")

    def wrap(loss: LossFn) -> LossFn:
        if name in _ALGORITHMS and _ALGORITHMS[name].loss is not loss:
            raise ValueError(f"algorithm {name!r} is already registered; registered: {list_algorithms()}")
        _ALGORITHMS[name] = Algorithm(name, config, loss)
        return loss

    return wrap


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as `name`; ValueError listing the valid names otherwise."""
    try:
        return _ALGORITHMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown algorithm {name!r}; valid: {list_algorithms()}") from None


def list_algorithms() -> list[str]:
    """Registered names, sorted."""
    return sorted(_ALGORITHMS)
