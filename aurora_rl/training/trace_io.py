"""Traces on disk: safetensors files (never pickle), written atomically, validated on load.

Contract:
- ``save_traces(traces, path)`` writes one safetensors file. Tensors are keyed ``"{i}.{field}"`` for
  every tensor field of ``Trace``; the non-tensor fields (request_id, status, finish_reason, greedy,
  temperature, top_p, top_k; the last three optional on load) go
  into the header metadata as JSON, next to a format marker and the trace count. The file is written
  to a temp file beside ``path`` and moved into place with ``os.replace``: it is complete or absent.
- ``load_traces(path)`` reads it back and validates every trace: a missing field, a wrong dtype or
  rank, inconsistent shapes (taps/hidden rows != prompt + completion - 1, per-step columns or
  proposal rows that disagree, accepted > lookahead), or an unknown status raise ``ValueError`` naming
  the file, the trace index and the field. A file that is not safetensors, or not a trace file, is
  refused with a ``ValueError`` naming it.
- ``TraceWriter(folder, shard_size)`` appends: it can be a ``trace_sink`` and writes a shard
  ``traces-00000.safetensors``, ``traces-00001.safetensors``, ... every ``shard_size`` traces (plus a
  last partial shard on ``close``), continuing after shards already in the folder.
  ``load_trace_dir(folder)`` loads all shards in order (temp files are ignored); ``load_trace_path``
  accepts a file or a folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from aurora_rl.engine.trace import Trace, TraceStatus

log = logging.getLogger(__name__)

FORMAT = "aurora_rl.traces"
FORMAT_VERSION = "1"
SHARD_PATTERN = re.compile(r"traces-(\d{5,})\.safetensors")

_LONG = ("prompt_ids", "output_ids", "step_position", "proposals", "accepted", "lookahead", "policy_version")
_FLOAT = ("taps", "hidden", "behaviour_logp", "step_time_s")
TENSOR_FIELDS = ("prompt_ids", "output_ids", "taps", "hidden", "step_position", "proposals", "behaviour_logp",
                 "accepted", "lookahead", "policy_version", "step_time_s")
_RANK = {"taps": 2, "hidden": 2, "proposals": 2, "behaviour_logp": 2}
OPTIONAL_FIELDS = ("copied", "served_stats")
"""Step columns added after format 1 was first written: saved always, absent in older files (default)."""
TREE_FIELDS = ("tree_offsets", "tree_tokens", "tree_parents", "tree_logp", "tree_copied", "tree_accepted")
"""Token-tree columns (``Trace.tree_*``): saved when a trace has them, None when a file has not."""
_STEP_COLUMNS = ("step_position", "accepted", "lookahead", "policy_version", "step_time_s")


def _info(t: Trace) -> dict:
    return {"request_id": t.request_id, "status": t.status.value, "finish_reason": t.finish_reason,
            "greedy": bool(t.greedy), "temperature": float(t.temperature), "top_p": float(t.top_p),
            "top_k": int(t.top_k)}


def save_traces(traces: list[Trace], path: str | Path) -> Path:
    """Write ``traces`` to one safetensors file at ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(traces):
        for name in TENSOR_FIELDS + OPTIONAL_FIELDS + tuple(n for n in TREE_FIELDS if getattr(t, n) is not None):
            # clone: views into a bigger storage (or storage shared between fields) are refused by safetensors.
            tensors[f"{i}.{name}"] = getattr(t, name).detach().cpu().contiguous().clone()
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "num_traces": str(len(traces)),
                "traces": json.dumps([_info(t) for t in traces])}
    tmp = str(path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"))
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600; other readers need the umask's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it for all threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_traces(path: str | Path) -> list[Trace]:
    """Read and validate a trace file written by ``save_traces``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            infos = _read_metadata(path, metadata)
            keys = set(handle.keys())
            traces = [_read_trace(path, i, info, handle, keys) for i, info in enumerate(infos)]
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors trace file ({e})") from e
    _check_widths(path, traces)
    return traces


def _read_metadata(path: Path, metadata: dict) -> list[dict]:
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: format={metadata.get('format')!r}, expected {FORMAT!r} (not a trace file)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={metadata.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION!r}")
    try:
        infos = json.loads(metadata["traces"])
        count = int(metadata["num_traces"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad trace metadata ({e!r})") from e
    if not isinstance(infos, list) or len(infos) != count:
        raise ValueError(f"{path}: metadata lists {len(infos) if isinstance(infos, list) else infos!r} "
                         f"traces, num_traces={count}")
    return infos


def _read_trace(path: Path, i: int, info, handle, keys: set[str]) -> Trace:
    where = f"{path}: trace {i}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: metadata entry {info!r} is not an object")
    for name in ("request_id", "status", "finish_reason", "greedy"):
        if name not in info:
            raise ValueError(f"{where}: missing field {name!r}")
    valid = [s.value for s in TraceStatus]
    if info["status"] not in valid:
        raise ValueError(f"{where}: field 'status' = {info['status']!r}; valid: {valid}")
    if not isinstance(info["greedy"], bool):
        raise ValueError(f"{where}: field 'greedy' = {info['greedy']!r}, expected true or false")
    if not isinstance(info["request_id"], str):
        raise ValueError(f"{where}: field 'request_id' = {info['request_id']!r}, expected a string")
    fields = {}
    for name in TENSOR_FIELDS:
        if f"{i}.{name}" not in keys:
            raise ValueError(f"{where}: missing field {name!r}")
        fields[name] = handle.get_tensor(f"{i}.{name}")
    for name in OPTIONAL_FIELDS + TREE_FIELDS:
        if f"{i}.{name}" in keys:
            fields[name] = handle.get_tensor(f"{i}.{name}")
    check_trace_fields(fields, where)
    return Trace(request_id=info["request_id"], status=TraceStatus(info["status"]),
                 finish_reason=info["finish_reason"], greedy=info["greedy"], **_sampling(info, where), **fields)


def _sampling(info: dict, where: str) -> dict:
    """The sampling fields of a trace's metadata; files from before them hold greedy traces only."""
    out = {"temperature": info.get("temperature", 0.0 if info["greedy"] else 1.0),
           "top_p": info.get("top_p", 1.0), "top_k": info.get("top_k", 0)}
    bad = (isinstance(out["temperature"], bool) or not isinstance(out["temperature"], (int, float))
           or out["temperature"] < 0 or (out["temperature"] == 0) != info["greedy"])
    if bad:
        raise ValueError(f"{where}: field 'temperature' = {out['temperature']!r} with greedy={info['greedy']} "
                         "(expected 0 exactly when greedy)")
    if not isinstance(out["top_p"], (int, float)) or not 0 < out["top_p"] <= 1:
        raise ValueError(f"{where}: field 'top_p' = {out['top_p']!r}, expected a number in (0, 1]")
    if not isinstance(out["top_k"], int) or out["top_k"] < 0:
        raise ValueError(f"{where}: field 'top_k' = {out['top_k']!r}, expected an integer >= 0")
    return out


def check_trace_fields(f: dict[str, torch.Tensor], where: str) -> None:
    """Dtypes, ranks and the shape relations between a trace's tensors; ValueError naming the field."""
    for name in TENSOR_FIELDS:
        t = f[name]
        if name in _LONG and t.dtype != torch.long:
            raise ValueError(f"{where}: field {name!r} has dtype {t.dtype}, expected torch.int64")
        if name in _FLOAT and not t.is_floating_point():
            raise ValueError(f"{where}: field {name!r} has dtype {t.dtype}, expected a floating dtype")
        if t.dim() != _RANK.get(name, 1):
            raise ValueError(f"{where}: field {name!r} has shape {tuple(t.shape)}, expected rank {_RANK.get(name, 1)}")
    rows = len(f["prompt_ids"]) + len(f["output_ids"]) - 1
    for name in ("taps", "hidden"):
        if f[name].shape[0] != rows:
            raise ValueError(f"{where}: field {name!r} has {f[name].shape[0]} rows, expected prompt + completion - 1"
                             f" = {rows}")
    steps = f["proposals"].shape[0]
    for name in _STEP_COLUMNS:
        if f[name].shape[0] != steps:
            raise ValueError(f"{where}: field {name!r} has {f[name].shape[0]} entries, proposals has {steps} rows")
    if f["behaviour_logp"].shape != f["proposals"].shape:
        raise ValueError(f"{where}: field 'behaviour_logp' has shape {tuple(f['behaviour_logp'].shape)}, "
                         f"proposals has {tuple(f['proposals'].shape)}")
    if steps and bool((f["lookahead"] > f["proposals"].shape[1]).any() | (f["lookahead"] < 0).any()):
        raise ValueError(f"{where}: field 'lookahead' outside [0, {f['proposals'].shape[1]}]")
    if steps and bool((f["accepted"] > f["lookahead"]).any() | (f["accepted"] < 0).any()):
        raise ValueError(f"{where}: field 'accepted' outside [0, lookahead]")
    copied = f.get("copied")
    if copied is not None and (copied.dtype != torch.bool or copied.shape != (steps,)):
        raise ValueError(f"{where}: field 'copied' has dtype {copied.dtype} and shape {tuple(copied.shape)}, "
                         f"expected torch.bool and ({steps},)")
    stats = f.get("served_stats")
    if stats is not None and (not stats.is_floating_point() or stats.shape != (rows, 3)):
        raise ValueError(f"{where}: field 'served_stats' has dtype {stats.dtype} and shape {tuple(stats.shape)}, "
                         f"expected a float tensor of shape ({rows}, 3)")


def _check_widths(path: Path, traces: list[Trace]) -> None:
    """All traces of a file come from one target: the same feature widths."""
    for name in ("taps", "hidden"):
        widths = {int(getattr(t, name).shape[1]) for t in traces if getattr(t, name).shape[0]}
        if len(widths) > 1:
            raise ValueError(f"{path}: field {name!r} has different widths across traces: {sorted(widths)}")


class TraceWriter:
    """Append traces to a folder of shards; usable as a ``trace_sink`` (``writer.append``)."""

    def __init__(self, folder: str | Path, shard_size: int = 256) -> None:
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"TraceWriter.shard_size must be an integer >= 1, got {shard_size!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        existing = [int(m.group(1)) for p in self.folder.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))]
        self.next_shard = max(existing, default=-1) + 1
        self.written = 0
        """Traces written to shards by this writer."""
        self._pending: list[Trace] = []

    def append(self, trace: Trace) -> None:
        self._pending.append(trace)
        if len(self._pending) >= self.shard_size:
            self.flush()

    __call__ = append

    def flush(self) -> Path | None:
        """Write buffered traces as the next shard (nothing if none are buffered)."""
        if not self._pending:
            return None
        path = save_traces(self._pending, self.folder / f"traces-{self.next_shard:05d}.safetensors")
        self.written += len(self._pending)
        self.next_shard += 1
        self._pending = []
        log.debug("wrote %s", path)
        return path

    close = flush

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def shard_paths(folder: str | Path) -> list[Path]:
    """The shards of ``folder`` in shard order (temp files and other files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"trace folder {folder} does not exist")
    shards = [(int(m.group(1)), p) for p in folder.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(shards)]


def load_trace_dir(folder: str | Path) -> list[Trace]:
    """All traces of all shards of ``folder``, in order."""
    traces: list[Trace] = []
    for p in shard_paths(folder):
        traces.extend(load_traces(p))
    return traces


def load_trace_path(path: str | Path) -> list[Trace]:
    """Traces from a trace file or a folder of shards."""
    return load_trace_dir(path) if Path(path).is_dir() else load_traces(path)
