"""Target and draft models over slot KV caches, and their loaders."""

from aurora_rl.models.config import ModelConfig, UnsupportedModelError, preset
from aurora_rl.models.kv_cache import SlotKVCache
from aurora_rl.models.target import TargetModel, TargetOutput

__all__ = ["ModelConfig", "UnsupportedModelError", "preset", "SlotKVCache", "TargetModel", "TargetOutput"]
