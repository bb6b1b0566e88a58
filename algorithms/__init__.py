"""Learning rules for the draft: pure losses over a `LossBatch`, registered by name.

`get_algorithm(name)` returns the config class and `loss(batch, cfg) -> LossOutput` of one of
`list_algorithms()`: "aurora" (default), "eagle3_kl", "osd", "frozen". This package never imports
Ray at import time (only `offpolicy.chain_vtrace` does, lazily) and never imports the engine.
"""

from algorithms import aurora, eagle3_kl, frozen, osd  # noqa: F401  (import registers them)
from algorithms.aurora import AuroraConfig
from algorithms.base import AlgorithmConfig
from algorithms.batch import LossBatch, LossOutput
from algorithms.eagle3_kl import Eagle3KLConfig
from algorithms.frozen import FrozenConfig
from algorithms.osd import OSDConfig
from algorithms.registry import Algorithm, get_algorithm, list_algorithms, register

DEFAULT_ALGORITHM = "aurora"

__all__ = [
    "DEFAULT_ALGORITHM", "Algorithm", "AlgorithmConfig", "AuroraConfig", "Eagle3KLConfig",
    "FrozenConfig", "LossBatch", "LossOutput", "OSDConfig", "get_algorithm", "list_algorithms",
    "register",
]
