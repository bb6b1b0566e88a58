"""Trace files: exact round trip, shards, atomic writes, validation errors naming the field, no pickle."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aurora_rl.engine.trace import TraceStatus
from aurora_rl.training import trace_io
from aurora_rl.training.trace_io import (
    TENSOR_FIELDS, TraceWriter, current_umask, load_trace_dir, load_traces, save_traces,
)
from tests.test_learner import served_traces


@pytest.fixture(scope="module")
def traces():
    out = list(served_traces()[1][:3])
    # Exercise the non-default non-tensor fields too.
    out[1] = dataclasses.replace(out[1], status=TraceStatus.ABORTED, finish_reason=None, greedy=False,
                                 temperature=0.7, top_p=0.9, top_k=5)
    return out


def assert_same(a, b):
    keys = ("request_id", "status", "finish_reason", "greedy", "temperature", "top_p", "top_k")
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]
    for name in TENSOR_FIELDS + trace_io.OPTIONAL_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num()), name  # NaN: not computed


def raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


@pytest.mark.unit
def test_round_trip_keeps_every_field(traces, tmp_path):
    path = save_traces(traces, tmp_path / "t.safetensors")
    back = load_traces(path)
    assert len(back) == len(traces)
    for a, b in zip(traces, back):
        assert_same(a, b)
    assert back[0].taps.dtype == torch.bfloat16 and back[1].status is TraceStatus.ABORTED
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not safetensors' 0600
    assert load_traces(save_traces([], tmp_path / "empty.safetensors")) == []


@pytest.mark.unit
def test_writer_shards_and_continues_numbering(traces, tmp_path):
    many = traces * 2  # 6 traces
    with TraceWriter(tmp_path, shard_size=4) as w:
        for t in many[:5]:
            w(t)  # usable directly as a trace_sink
        assert w.written == 4
    (tmp_path / ".traces-00009.safetensors.tmp-x").write_bytes(b"half written")  # a crashed write
    w2 = TraceWriter(tmp_path, shard_size=4)
    w2.append(many[5])
    w2.close()
    assert sorted(p.name for p in tmp_path.glob("traces-*")) == [
        "traces-00000.safetensors", "traces-00001.safetensors", "traces-00002.safetensors"]
    back = load_trace_dir(tmp_path)
    assert len(back) == 6
    for a, b in zip(many, back):
        assert_same(a, b)


def _drop_key(tensors, meta):
    del tensors["1.hidden"]


def _short_taps(tensors, meta):
    tensors["1.taps"] = tensors["1.taps"][:-1].clone()


def _short_proposals(tensors, meta):
    tensors["0.proposals"] = tensors["0.proposals"][:-1].clone()


def _short_logp(tensors, meta):
    tensors["2.behaviour_logp"] = tensors["2.behaviour_logp"][:, :-1].clone()


def _float_ids(tensors, meta):
    tensors["0.output_ids"] = tensors["0.output_ids"].float()


def _too_many_accepted(tensors, meta):
    tensors["2.accepted"] = tensors["2.lookahead"] + 1


def _bad_status(tensors, meta):
    infos = json.loads(meta["traces"])
    infos[2]["status"] = "exploded"
    meta["traces"] = json.dumps(infos)


def _no_greedy(tensors, meta):
    infos = json.loads(meta["traces"])
    del infos[0]["greedy"]
    meta["traces"] = json.dumps(infos)


@pytest.mark.unit
@pytest.mark.parametrize("corrupt,message", [
    (_drop_key, r"trace 1: missing field 'hidden'"),
    (_short_taps, r"trace 1: field 'taps' has \d+ rows, expected prompt \+ completion - 1"),
    (_short_proposals, r"trace 0: field 'step_position' has \d+ entries, proposals has \d+ rows"),
    (_short_logp, r"trace 2: field 'behaviour_logp' has shape"),
    (_float_ids, r"trace 0: field 'output_ids' has dtype torch.float32"),
    (_too_many_accepted, r"trace 2: field 'accepted' outside"),
    (_bad_status, r"trace 2: field 'status' = 'exploded'; valid: \['finished', 'aborted', 'error'\]"),
    (_no_greedy, r"trace 0: missing field 'greedy'"),
])
def test_validation_names_trace_and_field(traces, tmp_path, corrupt, message):
    path = save_traces(traces, tmp_path / "t.safetensors")
    tensors, meta = raw(path)
    corrupt(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=message):
        load_traces(path)


@pytest.mark.unit
def test_non_trace_payloads_are_refused_without_unpickling(traces, tmp_path, monkeypatch):
    def no_unpickling(*a, **kw):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"0.taps": [1, 2, 3]}))
    with pytest.raises(ValueError, match="pickled.safetensors is not a readable safetensors trace file"):
        load_traces(pickled)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="weights.safetensors: format=None.*not a trace file"):
        load_traces(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_traces(tmp_path / "missing.safetensors")


@pytest.mark.unit
def test_failed_write_keeps_the_previous_file(traces, tmp_path, monkeypatch):
    path = save_traces(traces[:1], tmp_path / "t.safetensors")

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trace_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_traces(traces, path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    assert_same(load_traces(path)[0], traces[0])
