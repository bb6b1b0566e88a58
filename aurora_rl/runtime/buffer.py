"""TraceBuffer: the bounded queue between rollout workers and the learner.

It stores object-store references to traces plus small metadata (bytes, policy versions), never the
tensors themselves. It is bounded in count and in bytes; when full, the configured policy decides:
``block`` refuses the new traces (the producer keeps them and retries: backpressure), ``drop_oldest``
evicts from the front, ``sample`` evicts a random entry. Batches handed to the learner skip traces
whose newest step is more than ``max_trace_lag`` published policy versions behind the learner (a
whole-trace bound on how old the learner's data gets; ``algorithm.args.max_lag`` is the per-step
bound of the policy-gradient term, in the same versions). Every trace that does not reach the learner is counted by
reason. A plain class, run as a Ray actor by the driver.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from typing import Any

from aurora_rl.config import BufferSection


@dataclass
class Entry:
    ref: Any
    """ObjectRef of one Trace (wrapped in a list by callers so Ray does not resolve it)."""
    nbytes: int
    policy_version: int
    """Newest draft version that proposed in this trace."""
    request_id: str = ""


class TraceBuffer:
    def __init__(self, config: BufferSection, seed: int = 0) -> None:
        self.config = config
        self._queue: collections.deque[Entry] = collections.deque()
        self._bytes = 0
        self._rng = random.Random(seed)
        self.dropped: collections.Counter[str] = collections.Counter()
        self.received = 0
        self.delivered = 0

    def put(self, entries: list[Entry]) -> int:
        """Add entries; returns how many were taken (fewer only under the ``block`` policy)."""
        taken = 0
        for e in entries:
            if e.nbytes > self.config.max_bytes:
                self.dropped["too_large"] += 1
                taken += 1
                continue
            while self._full(e.nbytes):
                if self.config.policy == "block":
                    return taken
                victim = (self._queue.popleft() if self.config.policy == "drop_oldest"
                          else self._pop_at(self._rng.randrange(len(self._queue))))
                self._bytes -= victim.nbytes
                self.dropped["evicted_" + self.config.policy] += 1
            self._queue.append(e)
            self._bytes += e.nbytes
            self.received += 1
            taken += 1
        return taken

    def get_batch(self, n: int, current_version: int) -> list[Entry]:
        """Up to ``n`` entries, oldest first, skipping (and counting) those too stale to learn from."""
        out: list[Entry] = []
        while self._queue and len(out) < n:
            e = self._queue.popleft()
            self._bytes -= e.nbytes
            if current_version - e.policy_version > self.config.max_trace_lag:
                self.dropped["stale"] += 1
                continue
            out.append(e)
        self.delivered += len(out)
        return out

    def stats(self) -> dict[str, float]:
        s = {"buffer/depth": float(len(self._queue)), "buffer/bytes": float(self._bytes),
             "buffer/received": float(self.received), "buffer/delivered": float(self.delivered),
             "buffer/dropped_total": float(sum(self.dropped.values()))}
        s.update({f"buffer/dropped_{k}": float(v) for k, v in self.dropped.items()})
        return s

    def __len__(self) -> int:
        return len(self._queue)

    def _full(self, nbytes: int) -> bool:
        return bool(self._queue) and (len(self._queue) >= self.config.max_traces
                                      or self._bytes + nbytes > self.config.max_bytes)

    def _pop_at(self, i: int) -> Entry:
        self._queue.rotate(-i)
        e = self._queue.popleft()
        self._queue.rotate(i)
        return e
