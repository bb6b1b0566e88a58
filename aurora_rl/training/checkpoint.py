"""Learner checkpoints: save, find, load and resume, crash-safe, safetensors and JSON only (no pickle).

Layout of ``<root>/step-<N>/`` (N zero-padded to 8 digits):
- ``draft/``: the draft in the EAGLE3 Hugging Face layout (``save_eagle3``, with the embedding and
  ``{"policy_version", "step"}`` under ``config.json["aurora_rl"]``), loadable by SGLang and vLLM.
- ``optimizer.safetensors``: AdamW moments flattened as ``"{i}.exp_avg"``, ``"{i}.exp_avg_sq"``,
  ``"{i}.step"`` for trainable parameter index i (params that have no state yet are absent).
- ``learner.json``, written last: step, policy_version, the learner config, the algorithm name, the
  trainable parameter names in optimizer order, the caller's ``extra``, and the size and sha256 of every
  file above.

Crash safety: the step folder is built in a temp folder beside it (``.step-<N>.tmp-*``) and moved into
place with ``os.replace``; only then is the ``latest`` pointer file (the folder's name) replaced
atomically. A crash at any point leaves ``latest`` naming the previous complete checkpoint.
``latest_checkpoint`` ignores temp folders. Loading checks every file against the manifest, so a
missing or truncated file is an error naming it. ``keep_last`` deletes older step folders after the
pointer moved (never the one it names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.eagle3_io import load_eagle3, save_eagle3
from aurora_rl.training.learner import Learner, LearnerConfig
from aurora_rl.training.trace_io import current_umask

log = logging.getLogger(__name__)

FORMAT = "aurora_rl.checkpoint"
LATEST = "latest"
META = "learner.json"
OPTIMIZER = "optimizer.safetensors"
DRAFT = "draft"
_STEP_DIR = re.compile(r"step-(\d+)")
_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; unpacks as ``draft, optimizer_state, meta``."""

    path: Path
    draft: Eagle3Draft
    optimizer_state: dict[int, dict[str, torch.Tensor]]
    """Per trainable-parameter index: ``exp_avg``, ``exp_avg_sq``, ``step`` (torch AdamW state)."""
    meta: dict

    def __iter__(self):
        return iter((self.draft, self.optimizer_state, self.meta))


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path, sync: bool = False) -> str:
    """Hex sha256 of a file; ``sync`` also flushes it to disk (before the folder is renamed into place)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def make_readable(tree: Path) -> None:
    """Give ``tree`` the umask's permissions: safetensors writes 0600 files and mkdtemp 0700 folders,
    which other readers of a shared checkpoint folder (rollout workers, SGLang) could not open."""
    mask = current_umask()
    for p in [tree, *tree.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _temp_path(final: Path, kind: str) -> Path:
    """A unique hidden sibling of ``final`` (not mkdtemp/mkstemp: those ignore the umask, 0700/0600)."""
    return final.with_name(f".{final.name}.{kind}-{uuid.uuid4().hex[:12]}")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:  # open() honours the umask
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = _temp_path(path, "tmp")
    try:
        _write_synced(tmp, text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` (the same step saved again) is moved aside first.

    Directories cannot be replaced in one rename, so for a re-saved step there is a short window in
    which ``dst`` is absent; its previous content then survives as ``.<name>.old-*``.
    """
    old = None
    if dst.exists():
        old = _temp_path(dst, "old")
        old.mkdir()
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old)


def _trainable_names(learner: Learner) -> list[str]:
    return [n for n, p in learner.draft.named_parameters() if p.requires_grad]


def save_optimizer(learner: Learner, path: Path) -> None:
    """AdamW state of ``learner`` flattened into one safetensors file."""
    tensors = {}
    for i, p in enumerate(learner.params):
        state = learner.optimizer.state.get(p, {})
        for key in _MOMENTS:
            if key in state:
                tensors[f"{i}.{key}"] = state[key].detach().cpu().contiguous().clone()
    save_file(tensors, str(path), metadata={"format": FORMAT})


def _meta(learner: Learner, extra: dict | None) -> dict:
    return {
        "format": FORMAT, "step": learner.step, "policy_version": learner.policy_version,
        "algorithm": learner.algorithm.name, "algorithm_args": learner.algorithm_args,
        "config": dataclasses.asdict(learner.config),
        "param_names": _trainable_names(learner), "extra": extra or {},
    }


def save_checkpoint(learner: Learner, root: str | Path, extra: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Write ``<root>/step-<N>/`` for the learner's current step, then point ``latest`` at it."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an integer >= 1, got {keep_last!r}")
    try:
        json.dumps(extra or {})
    except TypeError as e:
        raise ValueError(f"save_checkpoint extra must be JSON-serialisable ({e})") from e
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(learner.step)
    tmp = _temp_path(final, "tmp")
    tmp.mkdir()
    try:
        save_eagle3(learner.draft, tmp / DRAFT, include_embedding=True,
                    extra={"policy_version": learner.policy_version, "step": learner.step})
        save_optimizer(learner, tmp / OPTIMIZER)
        make_readable(tmp)
        meta = _meta(learner, extra)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        meta["files"] = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
                         for p in files}
        _write_synced(tmp / META, json.dumps(meta, indent=2))
        _replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _write_atomic_text(root / LATEST, final.name + "\n")
    log.info("saved checkpoint %s (policy version %d)", final, learner.policy_version)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def step_dirs(root: str | Path) -> list[Path]:
    """Complete-looking step folders of ``root`` (with a manifest), oldest first; temp folders ignored."""
    root = Path(root)
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step folders (never the one ``latest`` names)."""
    current = latest_checkpoint(root)
    dirs = step_dirs(root)
    doomed = [p for p in dirs[: max(len(dirs) - keep_last, 0)] if p != current]
    for p in doomed:
        shutil.rmtree(p)
        log.info("retention: removed %s", p)
    return doomed


def latest_checkpoint(root: str | Path) -> Path | None:
    """The step folder ``latest`` names; without a pointer, the newest complete step folder; else None."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _STEP_DIR.fullmatch(name):
            raise CheckpointError(f"{pointer} names {name!r}, not a step-<N> folder")
        target = root / name
        if not (target / META).is_file():
            raise CheckpointError(f"{pointer} names {target}, which has no {META}")
        return target
    dirs = step_dirs(root)
    return dirs[-1] if dirs else None


def _resolve(path: Path) -> Path:
    if (path / META).is_file() or _STEP_DIR.fullmatch(path.name):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint in {path} (no {LATEST} pointer, no complete step-<N> folder)")
    return found


def _verify_files(folder: Path) -> dict:
    meta_file = folder / META
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} is missing: incomplete checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: format={meta.get('format') if isinstance(meta, dict) else meta!r}, "
                              f"expected {FORMAT!r}")
    for rel, want in meta.get("files", {}).items():
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: incomplete checkpoint")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f} has {size} bytes, the manifest says {want['bytes']}: truncated or corrupt")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 in {meta_file}: corrupt")
    return meta


def load_optimizer_state(path: Path, num_params: int) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                index, _, name = key.partition(".")
                if not index.isdigit() or name not in _MOMENTS or int(index) >= num_params:
                    raise CheckpointError(f"{path}: unexpected tensor {key!r} for {num_params} parameters")
                state.setdefault(int(index), {})[name] = handle.get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    for i, s in state.items():
        if set(s) != set(_MOMENTS):
            raise CheckpointError(f"{path}: parameter {i} has {sorted(s)}, expected {list(_MOMENTS)}")
    return state


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a step folder, or the one ``latest`` names when ``path`` is a checkpoint root."""
    folder = _resolve(Path(path))
    meta = _verify_files(folder)
    try:
        draft = load_eagle3(folder / DRAFT)
    except (FileNotFoundError, SafetensorError, KeyError) as e:
        raise CheckpointError(f"{folder / DRAFT}: cannot load the draft ({e})") from e
    optimizer_state = load_optimizer_state(folder / OPTIMIZER, len(meta["param_names"]))
    return Checkpoint(folder, draft, optimizer_state, meta)


def resume_learner(path: str | Path, target_head: torch.Tensor, config: LearnerConfig | None = None,
                   algorithm: str | None = None, algorithm_args: dict | None = None) -> Learner:
    """A learner with the checkpoint's weights, AdamW moments, step and policy version.

    ``config`` and the learning rule (``algorithm``, ``algorithm_args``) default to the saved ones; when
    given, they apply and only the weights, the optimizer's moments and step counts come from the
    checkpoint.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if config is None:
        try:
            config = LearnerConfig(**meta["config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path / META}: saved learner config does not fit LearnerConfig ({e})") from e
    if algorithm is None:
        algorithm, algorithm_args = meta["algorithm"], meta.get("algorithm_args", {})
    elif algorithm != meta["algorithm"]:
        log.info("resuming a %s checkpoint with algorithm %s", meta["algorithm"], algorithm)
    learner = Learner(ckpt.draft, target_head, config, policy_version=int(meta["policy_version"]),
                      algorithm=algorithm, algorithm_args=algorithm_args)
    learner.step = int(meta["step"])
    names = _trainable_names(learner)
    if names != meta["param_names"]:
        raise CheckpointError(f"{ckpt.path / META}: parameter names {meta['param_names']} do not match the "
                              f"draft's trainable parameters {names}")
    _restore_moments(learner, ckpt)
    log.info("resumed %s at step %d, policy version %d", ckpt.path, learner.step, learner.policy_version)
    return learner


def _restore_moments(learner: Learner, ckpt: Checkpoint) -> None:
    for i, s in ckpt.optimizer_state.items():
        p = learner.params[i]
        for key in ("exp_avg", "exp_avg_sq"):
            if s[key].shape != p.shape:
                raise CheckpointError(f"{ckpt.path / OPTIMIZER}: {i}.{key} has shape {tuple(s[key].shape)}, "
                                      f"parameter {ckpt.meta['param_names'][i]} has {tuple(p.shape)}")
    groups = learner.optimizer.state_dict()["param_groups"]  # the current config's hyperparameters
    learner.optimizer.load_state_dict({"state": ckpt.optimizer_state, "param_groups": groups})
