"""Checkpoints: exact round trip, resume continues training, crash safety, corrupt files named, retention."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from aurora_rl.training import checkpoint as ckpt_mod
from aurora_rl.training.checkpoint import (
    CheckpointError, latest_checkpoint, load_checkpoint, resume_learner, save_checkpoint, step_dirs,
)
from aurora_rl.training.learner import Learner, LearnerConfig
from aurora_rl.training.trace_io import current_umask
from tests.test_learner import DEPTH, served_traces
from tests.test_speculative import make_draft


@pytest.fixture(scope="module")
def served():
    model, traces = served_traces()
    return model, list(traces)


def trained(model, traces, updates=2) -> Learner:
    cfg = LearnerConfig(depth=DEPTH, warmup_steps=1, lr=1e-2, betas=(0.8, 0.9), replay_ratio=1, prompt_bases=0)
    learner = Learner(make_draft(model), model.lm_head.weight, cfg, algorithm="eagle3_kl")
    for _ in range(updates):
        learner.update(traces)
    return learner


def assert_same_learner(a: Learner, b: Learner) -> None:
    assert (a.step, a.policy_version) == (b.step, b.policy_version)
    for (n, p), (m, q) in zip(a.draft.named_parameters(), b.draft.named_parameters()):
        assert n == m and torch.equal(p, q), n
    for p, q in zip(a.params, b.params):
        sa, sb = a.optimizer.state[p], b.optimizer.state[q]
        assert set(sa) == set(sb) == {"exp_avg", "exp_avg_sq", "step"}
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.unit
def test_round_trip_and_resume_continue_training(served, tmp_path, monkeypatch):
    def no_unpickling(*a, **kw):
        raise AssertionError("something tried to unpickle")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, no_unpickling)
    model, traces = served
    learner = trained(model, traces)
    folder = save_checkpoint(learner, tmp_path, extra={"requests_served": 12})
    assert folder == tmp_path / "step-00000002" == latest_checkpoint(tmp_path)
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    mode = 0o666 & ~current_umask()  # readable by other processes as the umask allows (not 0600)
    assert all(f.stat().st_mode & 0o777 == mode for f in folder.rglob("*") if f.is_file())
    draft, opt_state, meta = load_checkpoint(tmp_path)
    assert (meta["step"], meta["policy_version"], meta["algorithm"]) == (2, 2, "eagle3_kl")
    assert meta["extra"] == {"requests_served": 12} and meta["config"]["betas"] == [0.8, 0.9]
    assert json.loads((folder / "draft" / "config.json").read_text())["aurora_rl"] == {"policy_version": 2, "step": 2}
    for n, p in learner.draft.state_dict().items():
        assert torch.equal(p, draft.state_dict()[n]), n
    assert torch.equal(opt_state[0]["exp_avg"], learner.optimizer.state[learner.params[0]]["exp_avg"])

    resumed = resume_learner(tmp_path, model.lm_head.weight)
    assert resumed.config == learner.config and resumed.algorithm.name == "eagle3_kl"
    assert_same_learner(resumed, learner)
    # The same update on both gives the same weights, moments and next version (3).
    m_orig, m_res = learner.update(traces), resumed.update(traces)
    assert resumed.policy_version == 3 and m_res["learner/lr"] == m_orig["learner/lr"]
    assert_same_learner(resumed, learner)


@pytest.mark.unit
def test_resume_with_a_new_config_keeps_moments(served, tmp_path):
    model, traces = served
    learner = trained(model, traces, updates=1)
    save_checkpoint(learner, tmp_path)
    cfg = LearnerConfig(depth=DEPTH, lr=5e-3)
    resumed = resume_learner(tmp_path / "step-00000001", model.lm_head.weight, cfg, algorithm="aurora")
    assert resumed.algorithm.name == "aurora" and resumed.optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    p = resumed.params[1]
    assert torch.equal(resumed.optimizer.state[p]["exp_avg_sq"], learner.optimizer.state[learner.params[1]]["exp_avg_sq"])


@pytest.mark.unit
def test_crash_mid_write_leaves_previous_checkpoint_loadable(served, tmp_path, monkeypatch):
    model, traces = served
    learner = trained(model, traces, updates=1)
    save_checkpoint(learner, tmp_path)
    learner.update(traces)

    def crash_after_partial_write(learner, path):
        path.write_bytes(b"\x00" * 100)
        raise OSError("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "save_optimizer", crash_after_partial_write)
    with pytest.raises(OSError, match="killed mid-write"):
        save_checkpoint(learner, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]

    # A crash after the folder is in place but before the pointer moved.
    real_replace = ckpt_mod.os.replace

    def crash_on_pointer(src, dst):
        if str(dst).endswith("latest"):
            raise OSError("killed before the pointer moved")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_pointer)
    with pytest.raises(OSError, match="pointer"):
        save_checkpoint(learner, tmp_path)
    monkeypatch.undo()
    # Leftovers of a hard kill (no cleanup ran): a temp folder with a partial file.
    stale = tmp_path / ".step-00000003.tmp-dead"
    (stale / "draft").mkdir(parents=True)
    (stale / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    _, _, meta = load_checkpoint(tmp_path)
    assert meta["policy_version"] == 1
    # Without a pointer, the newest complete step folder counts; temp folders never do.
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000001", "step-00000002"]


@pytest.mark.unit
@pytest.mark.parametrize("victim", ["draft/model.safetensors", "optimizer.safetensors", "draft/config.json"])
def test_truncated_or_missing_file_is_named(served, tmp_path, victim):
    model, traces = served
    folder = save_checkpoint(trained(model, traces, updates=1), tmp_path)
    f = folder / victim
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{f}.*truncated"):
        load_checkpoint(tmp_path)
    f.unlink()
    with pytest.raises(CheckpointError, match=f"{f} is missing"):
        resume_learner(tmp_path, model.lm_head.weight)


@pytest.mark.unit
def test_corrupt_manifest_and_empty_root(served, tmp_path):
    model, traces = served
    assert latest_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(trained(model, traces, updates=1), tmp_path)
    (folder / "learner.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="learner.json is not valid JSON"):
        load_checkpoint(folder)
    (folder / "learner.json").unlink()
    with pytest.raises(CheckpointError, match="has no learner.json"):
        latest_checkpoint(tmp_path)


@pytest.mark.unit
def test_keep_last_retention(served, tmp_path):
    model, traces = served
    learner = trained(model, traces, updates=1)
    for step in (1, 2, 3, 4):
        learner.step = step
        save_checkpoint(learner, tmp_path, keep_last=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    save_checkpoint(learner, tmp_path, keep_last=2)  # the same step again replaces it whole
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("step-")] == ["latest"]
    assert load_checkpoint(tmp_path).meta["step"] == 4
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(learner, tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(learner, tmp_path, extra={"bad": object()})
