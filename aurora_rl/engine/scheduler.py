"""Continuous batching over a fixed number of slots: a waiting queue and the slots' occupants.

``admit()`` moves waiting requests into free slots (lowest slot first, so busy slots stay packed at
the front and the KV cache view stays contiguous); ``finish()`` frees a slot at once so that the next
waiting request can enter in the same engine step.
"""

from __future__ import annotations

import collections
import time

from aurora_rl.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}

    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if s not in self.running]

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        admitted = []
        for slot in self.free_slots:
            if not self.waiting:
                break
            seq = self.waiting.popleft()
            seq.slot, seq.status, seq.t_admitted = slot, Status.RUNNING, time.perf_counter()
            self.running[slot] = seq
            admitted.append(seq)
        return admitted

    def decoding(self) -> list[Sequence]:
        """Running sequences ordered by slot."""
        return [self.running[s] for s in sorted(self.running)]

    def finish(self, seq: Sequence, status: Status, reason: str) -> None:
        seq.status, seq.finish_reason, seq.t_finished = status, reason, time.perf_counter()
        if seq.slot is not None:
            self.running.pop(seq.slot, None)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is; returns it (marked aborted) or None if unknown."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self.finish(seq, Status.ABORTED, "abort")
                return seq
        for seq in list(self.running.values()):
            if seq.request_id == request_id:
                self.finish(seq, Status.ABORTED, "abort")
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
