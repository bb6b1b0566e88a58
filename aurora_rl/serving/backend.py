"""What the HTTP front needs from whatever generates tokens: submit, abort, health, and its limits.

``create_app`` serves any ``Backend``: ``LocalBackend`` (one EngineLoop in this process, the tests and
a single-process server) or ``aurora_rl.runtime.router.WorkerRouter`` (the rollout workers of a Ray
cluster, which may die and come back). ``submit`` returns a Future for the request's RequestOutput;
``on_delta`` gets each step's new token ids. A backend that cannot finish a request for a reason the
client should retry resolves it with ``finish_reason="error"`` and ``error`` starting with
``RETRYABLE_PREFIX``; the front answers that with 503 (or an error event that says to retry).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Callable, Protocol

from aurora_rl.engine.sampling import SamplingParams
from aurora_rl.serving.loop import EngineLoop

DeltaFn = Callable[[list[int]], None]
RETRYABLE_PREFIX = "retryable: "


class Backend(Protocol):
    max_len: int
    """Context limit per request (prompt plus generated tokens)."""
    has_tokenizer: bool
    """Whether the engine can apply stop strings (it needs a tokenizer)."""

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str,
               on_delta: DeltaFn | None) -> Future: ...

    def abort(self, request_id: str) -> bool: ...

    def policy_version(self) -> int | None: ...

    def health(self) -> dict:
        """``{"ok": bool, "status": str, ...}``: the fields ``/health`` reports."""
        ...


class LocalBackend:
    """One EngineLoop in this process."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.max_len = loop.engine.config.max_len
        self.has_tokenizer = loop.engine.tokenizer is not None

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str,
               on_delta: DeltaFn | None) -> Future:
        return self.loop.submit(prompt, params, request_id, on_delta)

    def abort(self, request_id: str) -> bool:
        return self.loop.abort(request_id)

    def policy_version(self) -> int | None:
        return getattr(self.loop.engine.decoder, "policy_version", None)

    def health(self) -> dict:
        alive = self.loop.is_alive()
        return {"ok": alive, "status": "ok" if alive else "engine loop not running",
                "in_flight": self.loop.in_flight(), "steps": self.loop.steps, "errors": self.loop.errors,
                "policy_version": self.policy_version()}
