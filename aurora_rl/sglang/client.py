"""A synchronous HTTP client for the SGLang server endpoints a rollout worker needs.

Request and response fields are those of sglang 0.5.22 (``srt/entrypoints/http_server.py``,
``srt/managers/io_struct.py``, ``srt/managers/tokenizer_manager.py``):

- ``POST /generate`` takes ``GenerateReqInput`` (``input_ids``, ``sampling_params``, ``rid``, ``stream``)
  and answers ``{"text", "output_ids", "meta_info"}``; ``meta_info`` holds ``finish_reason`` (a dict
  with ``type`` stop / length / abort), ``prompt_tokens``, ``completion_tokens``, ``weight_version``,
  optionally ``weight_versions`` spans, ``e2e_latency`` and, when a request was verified at least once,
  ``spec_verify_ct``, ``spec_num_correct_drafts``, ``spec_num_proposed_drafts``, ``spec_accept_length``
  (= completion_tokens / spec_verify_ct), ``spec_accept_rate``.
- Draft-only weight swap: ``/update_weights_from_disk`` in 0.5.22 has no way to name the draft (it loads
  the same folder into the target runner, then the draft runner). The draft-only route is
  ``POST /update_weights_from_tensor`` with ``selector: "draft"``, which must run inside a
  ``POST /begin_weight_update`` / ``POST /end_weight_update`` session. Its ``serialized_named_tensors``
  holds, per TP rank, a base64 ForkingPickler payload of ``[(name, tensor), ...]`` (what sglang's
  ``MultiprocessingSerializer.serialize(..., output_str=True)`` writes); CPU tensors travel as named
  shared memory (torch's ``file_system`` strategy), so the caller must run on the server's host.
- ``GET /health`` (200 once a generation works), ``GET /get_server_info``.

Every failure raises ``SGLangHTTPError`` naming the endpoint and the HTTP status.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

log = logging.getLogger(__name__)

SAMPLING_KEYS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "seed": "sampling_seed", "stop": "stop", "stop_token_ids": "stop_token_ids",
                 "ignore_eos": "ignore_eos"}
"""Our SamplingParams field -> sglang ``sampling_params`` key (0.5.22 ``sampling/sampling_params.py``)."""


class SGLangHTTPError(RuntimeError):
    def __init__(self, endpoint: str, status: int | None, detail: str) -> None:
        super().__init__(f"SGLang {endpoint}: status {status}: {detail}")
        self.endpoint, self.status, self.detail = endpoint, status, detail


@dataclass
class GenerateResult:
    """One finished ``/generate`` answer, with the speculation counters SGLang reports."""

    request_id: str
    output_ids: list[int]
    text: str | None
    finish_reason: str
    """``stop``, ``length`` or ``abort`` (the ``type`` of sglang's finish_reason dict)."""
    prompt_tokens: int
    completion_tokens: int
    verify_steps: int
    """``spec_verify_ct``: target verify passes (0 when sglang reported none)."""
    accepted_tokens: int
    """``spec_num_correct_drafts``: draft tokens the target kept."""
    proposed_tokens: int
    """``spec_num_proposed_drafts``."""
    weight_version: str | None
    """Draft/target weight version the server reported for the end of this request."""
    weight_versions: list[dict] = field(default_factory=list)
    """Spans ``{"version", "start", "end"}`` over the output when the version changed mid-request."""
    latency_s: float | None = None
    meta_info: dict = field(default_factory=dict)

    @property
    def accept_length(self) -> float:
        """Tokens per verify step including the bonus token (sglang's ``spec_accept_length``)."""
        return self.completion_tokens / self.verify_steps if self.verify_steps else 1.0


def to_sampling_params(params: dict[str, Any]) -> dict[str, Any]:
    """Translate our SamplingParams fields to sglang's; unknown or unsupported keys are errors."""
    unknown = sorted(set(params) - set(SAMPLING_KEYS) - {"lookahead", "extra"})
    if unknown:
        raise ValueError(f"sampling parameter(s) {unknown} are not supported by the SGLang engine; "
                         f"valid: {sorted(SAMPLING_KEYS)}")
    if params.get("lookahead") is not None:
        raise ValueError("per-request lookahead is not supported by the SGLang engine (it is a server "
                         "argument, speculative_num_steps)")
    out = {SAMPLING_KEYS[k]: v for k, v in params.items() if k in SAMPLING_KEYS and v is not None}
    if out.get("top_k") == 0:  # ours: 0 disables; sglang: -1 disables, 0 is rejected
        out["top_k"] = -1
    for key in ("stop", "stop_token_ids"):
        if key in out:
            out[key] = list(out[key])
    out.setdefault("temperature", 0.0)  # ours defaults to greedy, sglang to 1.0
    return out


def parse_generate_response(body: Any, request_id: str = "") -> GenerateResult:
    """Parse a non-streamed, single-prompt ``/generate`` answer."""
    if isinstance(body, list):
        if len(body) != 1:
            raise SGLangHTTPError("/generate", 200, f"expected one answer, got a list of {len(body)}")
        body = body[0]
    if not isinstance(body, dict) or "meta_info" not in body or "output_ids" not in body:
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise SGLangHTTPError("/generate", 200, f"answer lacks output_ids/meta_info (got {keys})")
    meta = body["meta_info"]
    reason = meta.get("finish_reason")
    reason = reason.get("type", "unknown") if isinstance(reason, dict) else (reason or "unknown")
    output_ids = [int(t) for t in body["output_ids"]]
    completion = int(meta.get("completion_tokens", len(output_ids)))
    verify = int(meta.get("spec_verify_ct") or 0)
    # spec_num_correct_drafts exists since the histogram rework; older releases only had
    # spec_accept_length, from which the kept drafts follow (completion - one bonus per verify).
    if "spec_num_correct_drafts" in meta:
        accepted = int(meta["spec_num_correct_drafts"])
    else:
        accepted = max(completion - verify, 0) if verify else 0
    version = meta.get("weight_version")
    return GenerateResult(
        request_id=str(meta.get("id", request_id)), output_ids=output_ids, text=body.get("text"),
        finish_reason=str(reason), prompt_tokens=int(meta.get("prompt_tokens", 0)), completion_tokens=completion,
        verify_steps=verify, accepted_tokens=accepted, proposed_tokens=int(meta.get("spec_num_proposed_drafts") or 0),
        weight_version=None if version is None else str(version), weight_versions=list(meta.get("weight_versions") or []),
        latency_s=meta.get("e2e_latency"), meta_info=meta,
    )


_SHARING_LOCK = threading.Lock()


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]], tp_size: int) -> list[str]:
    """What sglang's ``MultiprocessingSerializer.serialize(named, output_str=True)`` produces, once per
    TP rank: ForkingPickler (torch's shared-memory reductions) then base64. Same host only.

    CPU tensors are shared under torch's ``file_system`` strategy: the default ``file_descriptor``
    one hands descriptors over multiprocessing's resource sharer, which only answers processes that
    share this process's multiprocessing authkey (its own children), so a server that was launched
    as a plain subprocess, or started by hand, could not read them (``AuthenticationError``).
    The caller keeps the tensors alive until the server has answered.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp
    from torch.multiprocessing import reductions  # noqa: F401  (registers torch's tensor reductions)

    tensors = [(n, t.contiguous()) for n, t in named]
    payloads = []
    with _SHARING_LOCK:
        previous = tmp.get_sharing_strategy()
        tmp.set_sharing_strategy("file_system")
        try:
            for _ in range(tp_size):  # one pickle per rank, as sglang's own callers do
                buf = io.BytesIO()
                ForkingPickler(buf).dump(tensors)
                payloads.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        finally:
            tmp.set_sharing_strategy(previous)
    return payloads


def draft_update_body(serialized: list[str], version: int | str, flush_cache: bool = False) -> dict[str, Any]:
    """Body of ``/update_weights_from_tensor`` that loads into the draft runner(s) only.

    ``flush_cache`` stays off: the radix cache holds the target's KV, which a draft swap leaves valid.
    """
    return {"serialized_named_tensors": serialized, "load_format": None, "flush_cache": flush_cache,
            "abort_all_requests": False, "weight_version": str(version), "selector": "draft"}


class SGLangClient:
    """Blocking calls to one SGLang server; safe to share between threads (httpx.Client is)."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, endpoint: str, body: dict | None = None) -> Any:
        try:
            r = self.http.request(method, endpoint, json=body)
        except httpx.HTTPError as exc:
            raise SGLangHTTPError(endpoint, None, f"{type(exc).__name__}: {exc} (server {self.base_url})") from exc
        if r.status_code != 200:
            raise SGLangHTTPError(endpoint, r.status_code, r.text[:500])
        if not r.content:
            return None
        data = r.json()
        if isinstance(data, dict) and data.get("success") is False:
            raise SGLangHTTPError(endpoint, r.status_code, str(data.get("message")))
        return data

    def health(self) -> bool:
        try:
            return self.http.get("/health", timeout=10.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float, alive: Any = None, interval_s: float = 1.0) -> None:
        """Poll ``/health`` until 200; ``alive()`` returning False (a dead subprocess) fails early."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.health():
                return
            if alive is not None and not alive():
                raise SGLangHTTPError("/health", None, f"the server process at {self.base_url} exited before it was healthy")
            time.sleep(interval_s)
        raise SGLangHTTPError("/health", None, f"not healthy after {timeout_s:.0f} s at {self.base_url}")

    def server_info(self) -> dict:
        return self._call("GET", "/get_server_info")

    def generate(self, input_ids: list[int], sampling_params: dict[str, Any], rid: str | None = None) -> GenerateResult:
        body = {"input_ids": list(input_ids), "sampling_params": sampling_params, "stream": False}
        if rid is not None:
            body["rid"] = rid
        return parse_generate_response(self._call("POST", "/generate", body), rid or "")

    def update_draft_from_tensors(self, named: list[tuple[str, torch.Tensor]], version: int, tp_size: int = 1) -> dict:
        """Load ``named`` (EAGLE3 layout names) into the draft runner only, tagged ``weight_version``."""
        named = [(n, t.detach().contiguous()) for n, t in named]  # kept alive until the server has read them
        self._call("POST", "/begin_weight_update", {"selector": "draft"})
        try:
            out = self._call("POST", "/update_weights_from_tensor",
                             draft_update_body(serialize_named_tensors(named, tp_size), version))
        finally:
            self._call("POST", "/end_weight_update", {})
        return out
