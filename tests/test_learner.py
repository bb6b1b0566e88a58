"""The draft learner: losses go down, versions count published batches, lag and stale drops are reported,
non-finite steps are skipped, bad configs are refused; offline training is deterministic."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from aurora_rl.engine import SamplingParams
from aurora_rl.training import learner as learner_mod
from aurora_rl.training.batching import collate
from aurora_rl.training.learner import Learner, LearnerConfig
from aurora_rl.training.offline import batch_schedule, main as offline_main, train_offline
from aurora_rl.training.trace_io import save_traces
from aurora_rl.training.ttt import unroll
from tests.conftest import tiny_target
from tests.test_engine import prompts
from tests.test_speculative import make_draft, spec_engine

DEPTH = 3


def collect_traces(model, draft, n=4, k=DEPTH, max_tokens=12, seed=0):
    """Traces of ``n`` greedy requests served by ``draft`` (policy version 0), in request order."""
    traces = []
    spec_engine(model, draft, k, sink=traces.append).generate(
        prompts(n, seed), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return sorted(traces, key=lambda t: int(t.request_id.rsplit("-", 1)[-1]))


@functools.lru_cache(maxsize=1)
def served_traces():
    """(tiny target, 4 traces) served once per test session and shared by the learner, checkpoint and
    trace-file tests (serving is the slow part). Callers must not modify the traces in place."""
    model, _ = tiny_target()
    return model, tuple(collect_traces(model, make_draft(model)))


@pytest.fixture(scope="module")
def served():
    model, traces = served_traces()
    return model, list(traces)


def new_learner(model, algorithm="aurora", algorithm_args=None, **cfg) -> Learner:
    cfg = {"depth": DEPTH, "warmup_steps": 0, "lr": 1e-2, "replay_ratio": 1, "prompt_bases": 0, **cfg}
    return Learner(make_draft(model), model.lm_head.weight, LearnerConfig(**cfg), algorithm=algorithm,
                   algorithm_args=algorithm_args)


def weights(learner):
    return {n: p.detach().clone() for n, p in learner.draft.named_parameters()}


@torch.no_grad()
def ntp(learner, traces) -> float:
    """Mean cross entropy of the emitted tokens over all valid TTT entries (all depths equal)."""
    batch = collate(traces, learner.draft, learner.target_head, DEPTH)
    logits = unroll(learner.draft, batch.ttt, DEPTH)
    valid = batch.mask & (batch.target_tokens >= 0)
    logp = logits.log_softmax(-1).gather(-1, batch.target_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-logp[valid].mean())


@pytest.mark.unit
@pytest.mark.parametrize("algorithm", ["aurora", "eagle3_kl"])
def test_updates_reduce_ntp_loss(served, algorithm):
    model, traces = served
    learner = new_learner(model, algorithm=algorithm)
    before = ntp(learner, traces)
    for _ in range(4):
        learner.update(traces)
    after = ntp(learner, traces)
    assert after < before - 0.1, (before, after)


@pytest.mark.unit
def test_frozen_changes_nothing(served):
    model, traces = served
    learner = new_learner(model, algorithm="frozen")
    w0 = weights(learner)
    m = learner.update(traces)
    assert learner.step == 0 and learner.policy_version == 0 and m["learner/policy_version"] == 0
    for n, p in weights(learner).items():
        assert torch.equal(p, w0[n]), n
    assert "accept/length_sim" in m  # diagnostics still logged


@pytest.mark.unit
def test_policy_version_counts_batches_not_optimizer_steps(served):
    model, traces = served
    learner = new_learner(model, algorithm="eagle3_kl")
    for i in range(1, 4):
        m = learner.update(traces)
        assert learner.step == learner.policy_version == i == m["learner/policy_version"]
    # Three optimizer passes over one batch publish one new version: lag is counted in versions.
    replay = new_learner(model, algorithm="eagle3_kl", replay_ratio=3)
    replay.update(traces)
    assert replay.step == 3 and replay.policy_version == 1


@pytest.mark.unit
def test_grad_accum_splits_traces_but_takes_one_step(served, monkeypatch):
    model, traces = served
    sizes = []

    def spy(chunk, *a, **kw):
        sizes.append(len(chunk))
        return collate(chunk, *a, **kw)

    monkeypatch.setattr(learner_mod, "collate", spy)
    one = new_learner(model, algorithm="eagle3_kl")
    one.update(traces)
    assert sizes == [4]
    sizes.clear()
    two = new_learner(model, algorithm="eagle3_kl", grad_accum=2)
    two.update(traces)
    assert sizes == [2, 2] and two.step == one.step == 1 and two.policy_version == 1


@pytest.mark.unit
def test_publishable_state_excludes_frozen_embedding(served):
    model, _ = served
    learner = new_learner(model)
    state = learner.publishable_state()
    trainable = {n for n, p in learner.draft.named_parameters() if p.requires_grad}
    assert "embed.weight" not in state and set(state) == trainable and "fc.weight" in state
    state["fc.weight"].add_(1.0)  # a copy: publishing never aliases the live weights
    assert not torch.equal(state["fc.weight"], learner.draft.fc.weight)


@pytest.mark.unit
def test_stale_proposals_report_lag_and_max_lag_drops_them(served):
    model, traces = served
    steps = sum(int((t.lookahead > 0).sum()) for t in traces)
    cfg = LearnerConfig(depth=DEPTH)
    learner = Learner(make_draft(model), model.lm_head.weight, cfg, policy_version=3)
    m = learner.update(traces)
    assert m["offpolicy/lag_mean"] == 3.0 and m["offpolicy/dropped_stale"] == 0.0
    m = Learner(make_draft(model), model.lm_head.weight, cfg, policy_version=3,
                algorithm_args={"max_lag": 0}).update(traces)
    assert m["offpolicy/lag_mean"] > 0 and m["offpolicy/dropped_stale"] == steps > 0


@pytest.mark.unit
@pytest.mark.parametrize("algorithm", ["aurora", "eagle3_kl"])
def test_non_finite_gradient_skips_the_step(served, algorithm):
    model, traces = served
    taps = traces[0].taps.clone()
    taps[2, 0] = float("inf")
    bad = [dataclasses.replace(traces[0], taps=taps)] + traces[1:]
    learner = new_learner(model, algorithm=algorithm)
    w0 = weights(learner)
    m = learner.update(bad)
    assert m["learner/skipped_nonfinite"] == 1.0
    assert learner.step == 0 and learner.policy_version == 0
    for n, p in weights(learner).items():
        assert torch.equal(p, w0[n]), n
    learner.update(traces)  # a finite batch afterwards trains normally
    assert learner.step == 1 and all(torch.isfinite(p).all() for p in learner.params)


@pytest.mark.unit
@pytest.mark.parametrize("field,value", [
    ("depth", 0), ("grad_accum", 0), ("replay_ratio", 0), ("warmup_steps", -1), ("lr", 0.0),
    ("lr", float("nan")), ("dtype", "float8"),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"learner.{field}"):
        LearnerConfig(**{field: value})


@pytest.mark.unit
def test_bad_algorithm_lists_valid_names(served):
    model, _ = served
    with pytest.raises(ValueError, match="unknown algorithm 'nope'.*eagle3_kl"):
        Learner(make_draft(model), model.lm_head.weight, LearnerConfig(), algorithm="nope")
    with pytest.raises(ValueError, match="max_lag"):
        Learner(make_draft(model), model.lm_head.weight, LearnerConfig(), algorithm_args={"max_lag": -1})


# ---- offline ------------------------------------------------------------------------------------

@pytest.mark.unit
def test_batch_schedule_is_seeded_and_distinct():
    a = batch_schedule(10, 5, 4, seed=1)
    assert a == batch_schedule(10, 5, 4, seed=1) != batch_schedule(10, 5, 4, seed=2)
    assert all(len(set(b)) == len(b) == 4 for b in a)


@pytest.mark.unit
def test_train_offline_is_deterministic(served):
    model, traces = served
    draft = make_draft(model)
    w_init = {n: p.detach().clone() for n, p in draft.named_parameters()}
    cfg = LearnerConfig(depth=DEPTH, warmup_steps=0, lr=1e-2, replay_ratio=1, prompt_bases=0)
    head = model.lm_head.weight
    runs = [train_offline(traces, draft, head, cfg, num_updates=3, batch_traces=2, seed=s, algorithm="eagle3_kl")
            for s in (7, 7, 8)]
    (l1, m1), (l2, m2), (l3, _) = runs
    assert len(m1) == 3 and [m["offline/update"] for m in m1] == [1.0, 2.0, 3.0] and l1.step == 3
    for n, p in l1.draft.named_parameters():
        assert torch.equal(p, l2.draft.get_parameter(n)), n
    assert [m["losses/total"] for m in m1] == [m["losses/total"] for m in m2]
    assert not torch.equal(l1.draft.fc.weight, l3.draft.fc.weight)
    for n, p in draft.named_parameters():  # the caller's draft is untouched
        assert torch.equal(p, w_init[n]), n


@pytest.mark.unit
def test_offline_cli_writes_draft_and_metrics(served, tmp_path, capsys):
    import json

    from aurora_rl.models.eagle3_io import load_eagle3

    model, traces = served
    _, hf = tiny_target()
    hf.save_pretrained(tmp_path / "target")  # the tiny target as a HF folder, loaded by --target
    save_traces(traces, tmp_path / "traces.safetensors")
    offline_main(["--traces", str(tmp_path / "traces.safetensors"), "--algorithm", "eagle3_kl", "--updates", "2",
                  "--batch-traces", "2", "--out", str(tmp_path / "out"), "--target", str(tmp_path / "target"),
                  "--draft-vocab-size", "32", "--depth", str(DEPTH), "--log-every", "1"])
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["offline/update"] for x in lines] == [1.0, 2.0]
    draft = load_eagle3(tmp_path / "out" / "draft")
    assert draft.config.draft_vocab_size == 32 and bool(draft.t2d[1])  # EOS always in the vocabulary
    assert "update 2/2" in capsys.readouterr().out


def _captured_grads(learner, traces):
    grads = []
    learner.optimizer.step = lambda: grads.append([p.grad.clone() for p in learner.params])
    learner.update(traces)
    return torch.cat([g.flatten() for g in grads[0]])


@pytest.mark.unit
def test_grad_accum_weights_micro_batches_by_tokens(served):
    model, traces = served
    three = traces[:3]  # uneven split: 2 traces and 1 trace
    g1 = _captured_grads(new_learner(model, algorithm="eagle3_kl"), three)
    g2 = _captured_grads(new_learner(model, algorithm="eagle3_kl", grad_accum=2), three)
    assert float((g1 - g2).norm() / g1.norm()) < 0.05


@pytest.mark.unit
def test_no_op_update_keeps_the_version_and_lr_metric_is_the_one_used(served):
    model, traces = served
    learner = new_learner(model, algorithm="eagle3_kl", warmup_steps=4, lr=1.0)
    m = learner.update([])
    assert learner.step == learner.policy_version == 0 and "learner/grad_norm" not in m
    m = learner.update(traces)
    assert learner.step == 1 and m["learner/lr"] == pytest.approx(0.25)


@pytest.mark.unit
def test_learner_does_not_touch_the_callers_draft(served):
    model, traces = served
    draft = make_draft(model).to_dtype(torch.bfloat16).eval()
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    learner = Learner(draft, model.lm_head.weight, LearnerConfig(depth=DEPTH), algorithm="eagle3_kl")
    learner.update(traces)
    assert draft.fc.weight.dtype == torch.bfloat16 and not draft.training
    for k, v in draft.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.unit
@pytest.mark.parametrize("bad", [dict(grad_clip=-1.0), dict(weight_decay=-0.1), dict(betas=(0.9, 1.0)),
                                 dict(batch_traces=0), dict(publish_every=0), dict(checkpoint_every=-1)])
def test_more_bad_learner_configs(bad):
    with pytest.raises(ValueError, match=f"learner.{next(iter(bad))}"):
        LearnerConfig(**bad)
