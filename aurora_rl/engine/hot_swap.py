"""DraftSwapper: newer draft weights fetched, validated and built off the engine thread, swapped by reference.

The engine thread only ever does ``apply()`` at a step boundary: when a new draft is ready it is handed
to ``SpecDecoder.swap_draft`` (a reference assignment, plus moving the held depth-1 logits when the
vocabulary changed), so serving stalls for well under a millisecond, not for the copy and the
repacking of the weights for the native kernels. Everything slow runs in the swapper's thread,
freeing the replaced draft too:

1. ``fetch(version)`` returns ``(newer_version, state)`` or None (injected: the rollout worker reads
   the WeightStore through Ray; the engine never imports Ray).
2. ``validate_state`` checks the payload against the serving draft: every name known, every shape
   equal, every float finite, the vocabulary map in range. A payload that fails is refused, counted
   and logged, and its version is not fetched again; the serving draft is never touched.
3. A copy of the serving draft takes the payload (names absent from it keep their serving values, as
   the frozen embedding does), is cast to the serving dtype, and has its kernel weights packed.

``wake()`` asks for a fetch now; otherwise the thread looks every ``idle_poll_s``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.layers import Linear

log = logging.getLogger(__name__)

FetchFn = Callable[[int], "tuple[int, dict[str, torch.Tensor]] | None"]


class BadDraftPayload(ValueError):
    """Published draft weights that must not be served; the message names every problem."""


def validate_state(state: dict, serving: Eagle3Draft) -> None:
    """Raise BadDraftPayload unless ``state`` fits ``serving``: known names, equal shapes, finite, sane maps."""
    if not isinstance(state, dict) or not state:
        raise BadDraftPayload(f"the payload must be a non-empty dict of tensors, got {type(state).__name__}")
    reference = serving.state_dict()
    problems = []
    for name, t in state.items():
        ref = reference.get(name)
        if ref is None:
            problems.append(f"{name!r} is not a tensor of the serving draft")
        elif not isinstance(t, torch.Tensor):
            problems.append(f"{name!r} is a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != tuple(ref.shape):
            problems.append(f"{name!r} has shape {tuple(t.shape)}, the serving draft has {tuple(ref.shape)}")
        elif t.is_floating_point() != ref.is_floating_point():
            problems.append(f"{name!r} is {t.dtype}, the serving draft has {ref.dtype}")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            problems.append(f"{name!r} holds NaN or Inf")
    d2t = state.get("d2t")
    if not problems and isinstance(d2t, torch.Tensor):
        target = torch.arange(d2t.numel()) + d2t
        if bool(((target < 0) | (target >= serving.config.vocab_size)).any()):
            problems.append(f"'d2t' maps draft ids outside the target vocabulary [0, {serving.config.vocab_size})")
    if problems:
        raise BadDraftPayload("; ".join(problems))


def build_draft(state: dict[str, torch.Tensor], serving: Eagle3Draft) -> Eagle3Draft:
    """A new draft: ``serving``'s weights overwritten by ``state``, in ``serving``'s dtype, kernels packed."""
    draft = copy.deepcopy(serving)
    with torch.no_grad():
        own = dict(draft.named_parameters()) | dict(draft.named_buffers())
        for name, t in state.items():
            own[name].copy_(t)
    for m in draft.modules():
        if isinstance(m, Linear):
            m._native_key = None  # the copy's weights live elsewhere: pack them here, not on the engine thread
            m.packed_weight()
    return draft.eval()


@dataclass
class SwapStats:
    """What the swapper did, for TensorBoard (``system/swap_*``)."""

    swaps: int = 0
    refused: int = 0
    fetch_errors: int = 0
    build_ms: float = 0.0
    """Background time of the last fetch + validate + build."""
    stall_ms: float = 0.0
    """Engine-thread time of the last swap."""
    max_stall_ms: float = 0.0
    last_error: str | None = None


class DraftSwapper:
    """Keeps the decoder's draft current without stalling it (see the module docstring)."""

    def __init__(self, decoder, fetch: FetchFn, idle_poll_s: float = 1.0) -> None:
        self.decoder, self.fetch, self.idle_poll_s = decoder, fetch, idle_poll_s
        self.stats = SwapStats()
        self._ready: tuple[int, Eagle3Draft] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._skip_through = -1  # versions refused are not fetched again
        self._retired: list[Eagle3Draft] = []
        self._thread = threading.Thread(target=self._run, name="draft-swapper", daemon=True)

    def start(self) -> "DraftSwapper":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def apply(self) -> bool:
        """At a step boundary (engine thread): swap in a ready draft; True when one was swapped."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None or ready[0] <= self.decoder.policy_version:
            return False
        t0 = time.perf_counter()
        retired = self.decoder.swap_draft(ready[1], ready[0])
        with self._lock:
            self._retired.append(retired)  # freed in the swapper's thread, not here
        self._wake.set()
        s = self.stats
        s.stall_ms = (time.perf_counter() - t0) * 1000
        s.max_stall_ms = max(s.max_stall_ms, s.stall_ms)
        s.swaps += 1
        return True

    def poll_once(self) -> bool:
        """Fetch, validate and build the newest draft if there is one; True when one became ready."""
        with self._lock:
            have = max(self.decoder.policy_version, self._ready[0] if self._ready else -1, self._skip_through)
        t0 = time.perf_counter()
        newer = self.fetch(have)
        if newer is None:
            return False
        version, state = newer
        serving = self.decoder.draft
        try:
            validate_state(state, serving)
        except BadDraftPayload as err:
            self._skip_through = version
            self.stats.refused += 1
            self.stats.last_error = f"version {version}: {err}"
            log.error("refused draft version %d, serving version %d goes on: %s", version,
                      self.decoder.policy_version, err)
            return False
        draft = build_draft(state, serving)
        with self._lock:
            self._ready = (version, draft)
        self.stats.build_ms = (time.perf_counter() - t0) * 1000
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.idle_poll_s)
            self._wake.clear()
            with self._lock:
                retired, self._retired = self._retired, []
            del retired  # the old drafts' tensors are freed here, off the engine thread
            if self._stop.is_set():
                break
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - a failed fetch must not stop serving; counted, retried
                self.stats.fetch_errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("fetching newer draft weights failed; serving goes on with the current draft")
