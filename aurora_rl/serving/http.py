"""OpenAI-compatible HTTP front for an EngineLoop: completions, chat, streaming, models and health.

Contract:
- `create_app(backend, tokenizer, model_name, api_key=None, default_max_tokens=256)` serves a `Backend`
  (`aurora_rl.serving.backend`; an EngineLoop is wrapped in a `LocalBackend`):
  `POST /v1/completions` (prompt: a string or a list of token ids), `POST /v1/chat/completions`
  (messages through the tokenizer's chat template), `GET /v1/models`, `GET /v1/models/{id}` and
  `GET /health` (the backend's state; 503 when it cannot serve). One choice per request (n=1).
- `stream: true` answers Server-Sent Events in OpenAI's chunk format ending with `data: [DONE]`;
  `stream_options.include_usage` adds a final chunk with `usage`. Streamed text concatenates to exactly
  the non-streamed text: the full output is re-decoded each step, a trailing replacement character
  (half a multi-byte character) is held back, and so is any tail that could begin a stop string.
- Responses carry `usage` and an extension object `aurora` (accept_length, verify_steps, draft_tokens,
  accepted_tokens, policy_version, ttft_s, latency_s). Extension request fields: top_k, lookahead,
  ignore_eos. `temperature` defaults to 1.0 as in OpenAI's API.
- Bad requests get 400 (401 without the API key, 404 for another model name, 415 for a body that is not
  `application/json`) with an OpenAI error body naming the field; they never reach the engine.
  `max_tokens` beyond what the context leaves after the prompt is a 400 (omitted, it is capped there);
  `temperature` must be finite and in [0, 2], as OpenAI's. An engine error is a 500 (or an error chunk
  when streaming); a retryable one (a rollout worker died) is a 503 or an error chunk that says to
  retry. A client that disconnects has its request aborted in the engine, freeing its slot.
- `serve(app, host, port)` runs uvicorn in a daemon thread; port 0 picks a free port (`handle.port`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator

import uvicorn
from jinja2 import TemplateError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from aurora_rl.data.sharegpt import chat_token_ids
from aurora_rl.engine.engine import PromptTooLongError
from aurora_rl.engine.sequence import RequestOutput
from aurora_rl.serving.backend import RETRYABLE_PREFIX, Backend, LocalBackend
from aurora_rl.serving.loop import EngineLoop
from aurora_rl.serving.openai_types import (ApiError, ChatRequest, CompletionRequest, ResponseFormat,
                                            check_content_type, check_room, sse, validation_error)

log = logging.getLogger(__name__)

_DONE = None  # queue sentinel: the request's future is resolved


class StreamDetokenizer:
    """Turns a growing list of output ids into text pieces that are safe to send now."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.sent = ""

    def feed(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        # A stop string in the text ends the request there (the engine cuts at the first one).
        safe = text[: min(hits)] if hits else text[: len(text) - stop_prefix_len(text, self.stop)]
        piece = safe[len(self.sent):]
        self.sent += piece
        return piece

    def finish(self, final_text: str | None) -> str:
        """The rest of ``final_text`` (the engine's text, authoritative) after what was sent."""
        if final_text is None:
            final_text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final_text.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent[-40:], final_text[-40:])
        return final_text[len(self.sent):]


class TokenIdText:
    """The text of a model without a tokenizer (the tiny random target): token ids written as numbers.

    Prompts must then be token ids; output text is the ids separated by spaces, so streamed and
    non-streamed answers can still be compared as text."""

    def encode(self, text: str) -> list[int]:
        raise ValueError("this model has no tokenizer: send the prompt as a list of token ids")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"{i} " for i in ids)

    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("this model has no tokenizer, so no chat template: use /v1/completions with token ids")


def stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class _Call:
    """One accepted request on its way through the engine."""

    fmt: ResponseFormat
    stop: tuple[str, ...]
    include_usage: bool
    future: Future
    queue: asyncio.Queue | None


class _Front:
    """The app's state: the backend, the tokenizer, the served name, and request counters."""

    def __init__(self, backend: Backend, tokenizer: Any, model_name: str, api_key: str | None,
                 default_max_tokens: int) -> None:
        self.backend, self.model_name = backend, model_name
        self.tokenizer = tokenizer if tokenizer is not None else TokenIdText()
        self.api_key, self.default_max_tokens = api_key, default_max_tokens
        self.counts: Counter = Counter()
        self.created = int(time.time())

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            what = "missing" if not given else "incorrect"
            raise ApiError(401, f"{what} API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    async def parse(self, request: Request, cls: type[CompletionRequest] | type[ChatRequest]):
        self.check_auth(request)
        check_content_type(request.headers.get("content-type"))
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        try:
            req = cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        self.check_model(req.model)
        if (err := req.unsupported()) is not None:
            raise err
        if req.stop and not self.backend.has_tokenizer:
            raise ApiError(400, "stop strings need an engine with a tokenizer", "stop")
        return req

    def prompt_ids(self, req: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(req, CompletionRequest):
            if isinstance(req.prompt, list):
                return req.prompt
            try:
                return list(self.tokenizer.encode(req.prompt))
            except ValueError as exc:
                raise ApiError(400, str(exc), "prompt") from exc
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:
            m["role"] = "system" if m["role"] == "developer" else m["role"]
            m.setdefault("content", "")
        try:
            return chat_token_ids(self.tokenizer, messages)
        except (ValueError, TypeError, KeyError, TemplateError) as exc:
            raise ApiError(400, f"messages do not fit the chat template: {exc}", "messages") from exc

    async def submit(self, req: CompletionRequest | ChatRequest, kind: str) -> _Call:
        ids = await asyncio.to_thread(self.prompt_ids, req)
        param = "messages" if kind == "chat" else "prompt"
        room = self.backend.max_len - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the context limit is {self.backend.max_len} "
                           "(prompt plus output): shorten it", param, code="context_length_exceeded")
        params = req.sampling_params(min(self.default_max_tokens, room))
        check_room(req, params.max_tokens, len(ids), self.backend.max_len)
        aloop = asyncio.get_running_loop()
        queue: asyncio.Queue | None = asyncio.Queue() if req.stream else None

        def post(item: list[int] | None) -> None:
            try:
                aloop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed (server stopping): nobody is listening
                log.debug("dropped a stream delta: event loop closed")

        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            fut = await asyncio.to_thread(self.backend.submit, ids, params, rid, post if queue else None)
        except PromptTooLongError as exc:
            raise ApiError(400, str(exc), param, code="context_length_exceeded") from exc
        except ValueError as exc:
            raise ApiError(400, str(exc), param) from exc
        if queue is not None:
            fut.add_done_callback(lambda _: post(_DONE))
        self.counts["accepted"] += 1
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        fmt = ResponseFormat(kind, rid, self.model_name, int(time.time()), queue is not None)
        return _Call(fmt, params.stop, include_usage, fut, queue)

    def abort(self, rid: str) -> None:
        if self.backend.abort(rid):
            self.counts["aborted"] += 1
            log.info("client of %s went away: request aborted, slot freed", rid)

    def stats(self, out: RequestOutput) -> dict:
        return {"usage": {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
                          "total_tokens": out.num_prompt_tokens + out.num_output_tokens},
                "aurora": {"accept_length": out.accept_length, "verify_steps": out.verify_steps,
                           "draft_tokens": out.draft_tokens, "accepted_tokens": out.accepted_tokens,
                           "policy_version": self.backend.policy_version(),
                           "ttft_s": out.ttft_s, "latency_s": out.latency_s}}

    def engine_error(self, out: RequestOutput) -> ApiError:
        if out.error and out.error.startswith(RETRYABLE_PREFIX):
            self.counts["retryable_errors"] += 1
            return ApiError(503, out.error.removeprefix(RETRYABLE_PREFIX), type="server_error",
                            code="retry_request")
        self.counts["failed"] += 1
        return ApiError(500, f"engine error: {out.error}", type="server_error")

    async def complete(self, request: Request, call: _Call) -> JSONResponse:
        waiting = asyncio.wrap_future(call.future)
        while not (await asyncio.wait({waiting}, timeout=0.5))[0]:
            if await request.is_disconnected():  # e.g. a client timeout: don't finish for nobody
                await asyncio.to_thread(self.abort, call.fmt.id)
                break
        out = await waiting
        if out.finish_reason == "error":
            raise self.engine_error(out)
        text = out.text if out.text is not None else self.tokenizer.decode(out.output_ids, skip_special_tokens=True)
        return JSONResponse(call.fmt.body(call.fmt.choice(text, out.finish_reason), **self.stats(out)))

    async def stream(self, call: _Call) -> AsyncIterator[str]:
        extra = {"usage": None} if call.include_usage else {}
        try:
            if call.fmt.kind == "chat":
                yield sse(call.fmt.body(call.fmt.choice(None, None, role=True), **extra))
            detok = StreamDetokenizer(self.tokenizer, call.stop)
            while (ids := await call.queue.get()) is not _DONE:
                if piece := detok.feed(ids):
                    yield sse(call.fmt.body(call.fmt.choice(piece, None), **extra))
            out: RequestOutput = call.future.result()
            if out.finish_reason == "error":
                yield sse(self.engine_error(out).body())
            else:
                stats = self.stats(out)
                yield sse(call.fmt.body(call.fmt.choice(detok.finish(out.text), out.finish_reason), **extra,
                                    aurora=stats["aurora"]))
                if call.include_usage:
                    yield sse(call.fmt.body({}, usage=stats["usage"]))
            yield "data: [DONE]\n\n"
        finally:
            if not call.future.done():  # the client went away mid-stream
                asyncio.get_running_loop().run_in_executor(None, self.abort, call.fmt.id)

    def health(self) -> JSONResponse:
        body = self.backend.health()
        ok = body.pop("ok")
        body = {"status": body.pop("status"), "model": self.model_name, **body, "requests": dict(self.counts)}
        return JSONResponse(body, status_code=200 if ok else 503)


def create_app(backend: Backend | EngineLoop, tokenizer: Any, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    if isinstance(backend, EngineLoop):
        backend = LocalBackend(backend)
    front = _Front(backend, tokenizer, model_name, api_key, default_max_tokens)
    app = FastAPI(title="aurora_rl", docs_url=None, redoc_url=None)
    app.state.front = front

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status < 500:  # 500s are counted as "failed" where the engine error is seen
            front.counts["rejected"] += 1
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request):
        call = await front.submit(await front.parse(request, CompletionRequest), "completion")
        return await _respond(front, request, call)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        call = await front.submit(await front.parse(request, ChatRequest), "chat")
        return await _respond(front, request, call)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        front.check_auth(request)
        return {"object": "list", "data": [_model_card(front)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict:
        front.check_auth(request)
        front.check_model(name)
        return _model_card(front)

    @app.get("/health")
    async def health() -> JSONResponse:
        return await asyncio.to_thread(front.health)  # the loop's lock is held for a whole engine step

    return app


def _model_card(front: _Front) -> dict:
    return {"id": front.model_name, "object": "model", "created": front.created, "owned_by": "aurora_rl"}


async def _respond(front: _Front, request: Request, call: _Call):
    if call.queue is None:
        return await front.complete(request, call)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(front.stream(call), media_type="text/event-stream", headers=headers)


@dataclass
class ServerHandle:
    """A uvicorn server running in a background thread; ``stop()`` (or leaving a ``with``) ends it."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("HTTP server thread did not stop within %.1fs", timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          startup_timeout_s: float = 30.0) -> ServerHandle:
    """Start serving ``app``; returns once the server accepts connections. Port 0 picks a free port."""
    if not _is_loopback(host):
        log.warning("binding to %s: the server is reachable from other machines", host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)  # bind here: errors surface in the caller
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)  # signal handlers are only installed on the main thread
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"HTTP server on {host}:{port} did not start (see the log above)")
        time.sleep(0.01)
    handle = ServerHandle(server, thread, host, sock.getsockname()[1])
    log.info("serving at %s", handle.url)
    return handle
