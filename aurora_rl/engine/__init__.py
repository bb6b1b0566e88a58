"""The native serving engine: slot KV cache, continuous batching, sampling, speculative steps."""

from aurora_rl.engine.engine import EngineConfig, LLMEngine, PromptTooLongError
from aurora_rl.engine.sampling import SamplingParams
from aurora_rl.engine.sequence import RequestOutput, Sequence, Status

__all__ = ["EngineConfig", "LLMEngine", "PromptTooLongError", "SamplingParams", "RequestOutput", "Sequence", "Status"]
