"""OpenAI wire format: request bodies as strict pydantic models, response and chunk bodies, error bodies.

Contract:
- `CompletionRequest` / `ChatRequest` parse a JSON object; types are strict (no "12" for 12) and unknown
  fields are refused, so a typo never silently falls back to a default.
- OpenAI fields this server cannot honour (n > 1, logprobs, penalties) are accepted only at their no-op
  values; anything else is refused naming the field.
- Extension fields: `top_k`, `lookahead` (draft tokens per step; 0 disables speculation), `ignore_eos`.
- `validation_error(exc)` turns a pydantic ValidationError into an `ApiError` whose `param` is the first
  bad field (`messages[0].role`) and whose message names every problem and the valid choices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aurora_rl.engine.sampling import SamplingParams


class ApiError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        """OpenAI allows content as a list of parts; only text parts can reach a text model."""
        if not isinstance(v, list):
            return v
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            raise ValueError('content parts must all be {"type": "text", "text": <string>}')
        return "".join(p["text"] for p in v)


class _SamplingRequest(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    """Omitted means 1.0, as OpenAI does; 0 is greedy; OpenAI's range is [0, 2]."""
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logprobs: bool | int | None = None
    # Extensions (the openai client sends them through ``extra_body``).
    top_k: int = Field(0, ge=0)
    lookahead: int | None = Field(None, ge=0)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            v = [] if v is None else [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError(f"stop must be a string or a list of strings, got {v!r:.80}")
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = getattr(self, "max_completion_tokens", None) or self.max_tokens or default_max_tokens
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, seed=self.seed,
                stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos, lookahead=self.lookahead)
        except ValueError as exc:  # SamplingParams messages open with the field name
            raise ApiError(400, str(exc), str(exc).split()[0]) from exc

    def unsupported(self) -> ApiError | None:
        """The first field set to something this server cannot do, as a 400."""
        if self.n != 1:
            return ApiError(400, f"n={self.n} is not supported: this server returns exactly one choice (n=1)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return ApiError(400, f"{name} is not supported (only 0), got {getattr(self, name)}", name)
        if self.logprobs not in (None, False, 0):
            return ApiError(400, f"logprobs are not supported, got {self.logprobs!r}", "logprobs")
        return None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one is one prompt
        if isinstance(v, str) or (isinstance(v, list) and all(type(t) is int for t in v)):
            return v
        raise ValueError("prompt must be a string or a list of token ids (ints); batched prompts are not "
                         f"supported, send one request per prompt; got {v!r:.80}")


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def check_content_type(value: str | None) -> None:
    """A request body must be declared JSON (as OpenAI's and vLLM's servers require)."""
    media = (value or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"content-type {value!r} is not supported: send the body as application/json",
                       "content-type", code="unsupported_media_type")


def check_room(req: CompletionRequest | ChatRequest, max_tokens: int, prompt_len: int, max_len: int) -> None:
    """A max_tokens the context cannot hold after the prompt is refused, not silently cut."""
    if prompt_len + max_tokens > max_len:
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(400, f"{field}={max_tokens} is too large: the prompt has {prompt_len} tokens and the "
                       f"context limit is {max_len}, so at most {max_len - prompt_len} new tokens fit",
                       field, code="context_length_exceeded")


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    parts = []
    for e in errors:
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("missing", "value_error", "extra_forbidden") and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r:.80})"
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not an OpenAI field this server supports)"
        parts.append(f"{_param(e['loc']) or 'body'}: {msg}")
    return ApiError(400, "; ".join(parts), _param(errors[0]["loc"]) or None)


@dataclass
class ResponseFormat:
    """How one request's answer is shaped: a completion or a chat completion, whole or as chunks."""

    kind: str
    """"chat" or "completion"."""
    id: str
    model: str
    created: int
    stream: bool

    def body(self, choice: dict, **extra: Any) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        obj += ".chunk" if self.kind == "chat" and self.stream else ""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice] if choice else [], **extra}

    def choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        """Choice 0; ``role`` makes the opening chat chunk that announces the assistant."""
        base = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.kind == "completion":
            return {**base, "text": text or ""}
        if not self.stream:
            return {**base, "message": {"role": "assistant", "content": text}}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {**base, "delta": delta}


def sse(obj: dict) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
