"""Runtime pieces without Ray: the trace buffer's bounds and policies, the weight store's versions."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.config import BufferSection
from aurora_rl.runtime.buffer import Entry, TraceBuffer
from aurora_rl.runtime.weights import WeightStore, check_finite


def entries(n, nbytes=10, version=0, start=0):
    return [Entry([f"ref{start + i}"], nbytes, version, f"r{start + i}") for i in range(n)]


@pytest.mark.unit
def test_drop_oldest_bounds_count_and_counts_evictions():
    buf = TraceBuffer(BufferSection(max_traces=3, policy="drop_oldest"))
    assert buf.put(entries(5)) == 5
    assert [e.request_id for e in buf.get_batch(10, 0)] == ["r2", "r3", "r4"]
    assert buf.stats()["buffer/dropped_evicted_drop_oldest"] == 2


@pytest.mark.unit
def test_block_refuses_when_full_so_the_producer_keeps_its_traces():
    buf = TraceBuffer(BufferSection(max_traces=10, max_bytes=25, policy="block"))
    assert buf.put(entries(4)) == 2  # 10 + 10 fit under 25 bytes, the third does not
    assert len(buf) == 2 and buf.stats()["buffer/dropped_total"] == 0
    buf.get_batch(1, 0)
    assert buf.put(entries(2, start=4)) == 1


@pytest.mark.unit
def test_sample_policy_evicts_and_oversized_traces_are_counted():
    buf = TraceBuffer(BufferSection(max_traces=2, max_bytes=100, policy="sample"), seed=1)
    buf.put(entries(4))
    assert len(buf) == 2 and buf.stats()["buffer/dropped_evicted_sample"] == 2
    buf.put(entries(1, nbytes=1000, start=9))
    assert buf.stats()["buffer/dropped_too_large"] == 1 and len(buf) == 2


@pytest.mark.unit
def test_stale_traces_are_dropped_and_counted():
    buf = TraceBuffer(BufferSection(max_traces=10, max_trace_lag=2))
    buf.put(entries(2, version=1) + entries(2, version=5, start=2))
    got = buf.get_batch(4, current_version=6)
    assert [e.request_id for e in got] == ["r2", "r3"]
    assert buf.stats()["buffer/dropped_stale"] == 2


@pytest.mark.unit
def test_weight_store_versions_and_finite_check():
    store = WeightStore()
    assert store.get_if_newer(-1) is None
    store.publish(0, ["a"])
    assert store.get_if_newer(-1) == (0, ["a"]) and store.get_if_newer(0) is None
    store.publish(3, ["b"])
    assert store.get_if_newer(0) == (3, ["b"])
    with pytest.raises(ValueError, match="not newer"):
        store.publish(3, ["c"])
    bad = {"w": torch.tensor([1.0, float("nan")]), "ok": torch.ones(2), "ids": torch.tensor([1, 2])}
    assert check_finite(bad) == ["w"]
    assert check_finite({"w": torch.tensor([float("inf")])}) == ["w"]
