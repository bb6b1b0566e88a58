"""Unit tests for the draft's learning rules: each term on a hand-computed example, then the algorithms."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from algorithms import (
    AuroraConfig, Eagle3KLConfig, LossBatch, OSDConfig, get_algorithm, list_algorithms,
)
from algorithms.base import current_acceptance
from algorithms.metrics import acceptance_metrics
from algorithms.osd import rejected_entries
from algorithms.terms import (
    acceptance_prob, chain_vtrace, depth_weights, drop_stale, effective_sample_size,
    forward_kl_soft_ce, greedy_acceptance, ntp_loss, policy_gradient_loss, reverse_kl, truncated_ratios,
)

pytestmark = pytest.mark.unit
LN = math.log


def t(x, **kw):
    return torch.tensor(x, **kw)


# ---------------------------------------------------------------- distillation terms


def test_ntp_loss_hand_example():
    # Row 0: depth 1 logits [0, 0] -> q = [.5, .5], emitted 0 -> nll ln 2;
    #        depth 2 logits [ln 3, 0] -> q = [.75, .25], emitted 1 -> nll ln 4.
    # Row 1: depth 1 emitted token outside the draft vocab (-1), depth 2 masked: both skipped.
    # Weights [1, .5]: (ln 2 + .5 ln 4) / 1.5 = (4/3) ln 2.
    logits = t([[[0.0, 0.0], [LN(3), 0.0]], [[5.0, -5.0], [9.0, 9.0]]], requires_grad=True)
    tokens = t([[0, 1], [-1, 0]])
    mask = t([[True, True], [True, False]])
    loss = ntp_loss(logits, tokens, mask, t([1.0, 0.5]))
    assert_close(loss, t(4 / 3 * LN(2)))
    loss.backward()
    assert logits.grad[1].abs().sum() == 0  # skipped entries get no gradient


def test_reverse_kl_hand_example_and_grad_through_q_only():
    # q = [.75, .25], p = [.5, .5]: KL(q||p) = .75 ln 1.5 + .25 ln .5
    draft = t([[[LN(3), 0.0]]], requires_grad=True)
    target = t([[[LN(0.5), LN(0.5)]]], requires_grad=True)
    loss = reverse_kl(draft, target, t([[True]]), t([1.0]))
    assert_close(loss, t(0.75 * LN(1.5) + 0.25 * LN(0.5)))
    loss.backward()
    assert target.grad is None and draft.grad.abs().sum() > 0
    # Half the target's mass lies outside the draft vocab, p = [.25, .25] there: the true KL is
    # .75 ln 3 + .25 ln 1, not the renormalised value above.
    assert_close(reverse_kl(draft, t([[[LN(0.25), LN(0.25)]]]), t([[True]]), t([1.0])), t(0.75 * LN(3)))


def test_forward_kl_soft_ce_hand_example():
    # p = [.5, .5], q = [.75, .25]: -(.5 ln .75 + .5 ln .25); second entry masked out.
    draft = t([[[LN(3), 0.0], [0.0, 7.0]]])
    target = t([[[0.0, 0.0], [7.0, 0.0]]])
    loss = forward_kl_soft_ce(draft, target, t([[True, False]]), t([1.0, 0.8]))
    assert_close(loss, t(-(0.5 * LN(0.75) + 0.5 * LN(0.25))))


def test_acceptance_prob_hand_example():
    # q = [.75, .25], p = [.5, .5]: Σ min = .5 + .25 = .75 (= 1 − TV(q, p) = 1 − .25)
    logq = t([LN(0.75), LN(0.25)])
    assert_close(acceptance_prob(logq, t([0.5, 0.5])), t(0.75))
    # The unnormalised alpha: the target puts .5 of its mass outside the draft vocab, p = [.3, .2]
    # there: Σ min = .3 + .2 = .5; renormalising p to [.6, .4] would claim .6 + .25 = .85.
    assert_close(acceptance_prob(logq, t([0.3, 0.2])), t(0.5))
    assert_close(acceptance_prob(logq, t([0.6, 0.4])), t(0.85))
    # Greedy target (argmax = 1): accepted iff the draft samples token 1: q(1) = .25; a target argmax
    # outside the draft vocab (-1) is a certain rejection.
    assert_close(greedy_acceptance(t([[LN(3), 0.0]]), t([1])), t([0.25]))
    assert_close(greedy_acceptance(t([[LN(3), 0.0]]), t([-1])), t([0.0]))


def test_depth_weights_gamma_and_reach():
    assert_close(depth_weights("gamma", 0.8, K=3), t([1.0, 0.8, 0.64]))
    alpha = t([[0.5, 0.4, 0.9], [1.0, 0.0, 0.3]], requires_grad=True)
    # reach(j) = Π_{l<j} α_l: [1, .5, .5*.4], [1, 1, 0]
    w = depth_weights("reach", alpha=alpha)
    assert_close(w, t([[1.0, 0.5, 0.2], [1.0, 1.0, 0.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="'beta'.*gamma.*reach"):
        depth_weights("beta", K=3)


# ---------------------------------------------------------------- off-policy terms


def test_truncated_ratios_and_clip_fraction():
    # q/μ = .6/.3 = 2 (clipped to 1) and .2/.4 = .5 (kept)
    r = truncated_ratios(t([LN(0.6), LN(0.2)]), t([LN(0.3), LN(0.4)]), rho_bar=1.0)
    assert_close(r.ratios, t([2.0, 0.5]))
    assert_close(r.clipped, t([1.0, 0.5]))
    assert r.clip_fraction == pytest.approx(0.5)
    masked = truncated_ratios(t([LN(0.6), LN(0.2)]), t([LN(0.3), LN(0.4)]), 1.0, t([True, False]))
    assert masked.clip_fraction == pytest.approx(1.0)


def test_effective_sample_size_kish():
    equal = effective_sample_size(t([1.0, 1.0, 1.0, 1.0]))
    assert (equal.raw, equal.normalized) == pytest.approx((4.0, 1.0))
    # (2 + .5)^2 / (4 + .25) = 6.25 / 4.25
    skew = effective_sample_size(t([2.0, 0.5, 7.0]), mask=t([True, True, False]))
    assert skew.raw == pytest.approx(6.25 / 4.25)
    assert skew.normalized == pytest.approx(6.25 / 4.25 / 2)
    assert effective_sample_size(torch.zeros(0)).raw == 0.0


def test_drop_stale_counts():
    s = drop_stale(t([0, 3, 9, 8, 12]), max_lag=8)
    assert s.keep.tolist() == [True, True, False, True, False]
    assert s.dropped == 2
    with pytest.raises(ValueError, match="-1"):
        drop_stale(t([0, -1]), max_lag=8)


# ---------------------------------------------------------------- one SGD step on a linear draft


def linear_draft_batch(W):
    """One row, K = 2, Vd = 4. Features one-hot per depth so the two depths do not interact.
    Depth 1: behaviour proposed 2, accepted (target emitted 2). Depth 2: proposed 3, rejected
    (target emitted 0). W = 0 -> q uniform = μ, so ρ = 1.
    p1 = [.1, .1, .7, .1] -> α1 = .55;  p2 = [.7, .1, .1, .1] -> α2 = .55
    V2 = .55, V1 = .55·1.55 = .8525;  A2 = −.55, A1 = 1 + v2 − V1 = 1 + 0 − .8525 > 0."""
    feats = torch.eye(2).unsqueeze(0)  # [N=1, K=2, F=2]
    p1, p2 = t([0.1, 0.1, 0.7, 0.1]), t([0.7, 0.1, 0.1, 0.1])
    return LossBatch.sampled_rows(
        draft_logits=feats @ W, target_logp=torch.stack([p1, p2]).log().unsqueeze(0),
        target_tokens=t([[2, 0]]), mask=t([[True, True]]),
        proposal_row=t([0]), proposals=t([[2, 3]]), behaviour_logp=torch.full((1, 2), LN(0.25)),
        accepted=t([1]), proposal_mask=t([[True, True]]), lag=t([0]),
    )


def one_sgd_step(loss_fn):
    W = torch.zeros(2, 4, requires_grad=True)
    before = torch.softmax(linear_draft_batch(W).draft_logits, -1).detach()
    loss_fn(linear_draft_batch(W)).backward()
    with torch.no_grad():
        W -= 0.5 * W.grad
    after = torch.softmax(linear_draft_batch(W).draft_logits, -1).detach()
    return before[0], after[0]


@pytest.mark.parametrize("how", ["pg_term", "aurora_pg_only", "aurora_default"])
def test_one_update_raises_accepted_and_lowers_rejected(how):
    def pg_term(b):
        logq = torch.log_softmax(b.draft_logits[b.proposal_row], -1).gather(
            -1, b.proposals.unsqueeze(-1)).squeeze(-1)
        alpha = current_acceptance(b)[b.proposal_row]
        vt = chain_vtrace(logq, b.behaviour_logp, b.accepted, b.proposal_mask, alpha)
        assert vt.pg_advantages[0, 0] > 0 > vt.pg_advantages[0, 1]
        return policy_gradient_loss(logq, vt.pg_advantages, vt.valid, t([1.0, 0.8]))

    algo = get_algorithm("aurora")
    cfgs = {"aurora_pg_only": AuroraConfig(ntp_coef=0.0, rkl_coef=0.0, accept_coef=0.0, pg_coef=0.5), "aurora_default": AuroraConfig()}
    fn = pg_term if how == "pg_term" else (lambda b: algo.loss(b, cfgs[how]).loss)
    before, after = one_sgd_step(fn)
    assert after[0, 2] > before[0, 2]  # accepted proposal at depth 1 went up
    assert after[1, 3] < before[1, 3]  # rejected proposal at depth 2 went down


# ---------------------------------------------------------------- algorithms


def random_batch(N=6, K=3, V=5, M=4, seed=0, lag=None):
    g = torch.Generator().manual_seed(seed)
    k = t([3, 2, 3, 1])[:M]
    accepted = t([1, 2, 3, 0])[:M]
    return LossBatch.sampled_rows(
        draft_logits=torch.randn(N, K, V, generator=g).requires_grad_(),
        target_logp=torch.log_softmax(torch.randn(N, K, V + 1, generator=g) * 2, -1)[..., :V],
        target_tokens=torch.randint(-1, V, (N, K), generator=g),
        mask=torch.ones(N, K, dtype=torch.bool),
        proposal_row=t([0, 1, 2, 4])[:M], proposals=torch.randint(0, V, (M, K), generator=g),
        behaviour_logp=-torch.rand(M, K, generator=g) * 2, accepted=accepted,
        proposal_mask=torch.arange(K) < k.unsqueeze(1), lag=t(lag or [0, 1, 2, 3])[:M],
    )


def test_registry_lists_names_on_unknown():
    assert list_algorithms() == ["aurora", "eagle3_kl", "frozen", "osd"]
    with pytest.raises(ValueError, match=r"'auroa'.*aurora.*eagle3_kl.*frozen.*osd"):
        get_algorithm("auroa")


@pytest.mark.parametrize("cls, kwargs, pattern", [
    (AuroraConfig, {"gamma": 1.5}, r"AuroraConfig\.gamma.*1\.5"),
    (AuroraConfig, {"depth_weighting": "depth"}, r"depth_weighting.*'gamma', 'reach'.*'depth'"),
    (AuroraConfig, {"c_bar": 0.9}, r"c_bar.*0\.9"),
    (AuroraConfig, {"rho_bar": 0.5}, r"rho_bar.*0\.5"),
    (AuroraConfig, {"max_lag": -1}, r"max_lag.*-1"),
    (AuroraConfig, {"pg_coef": -0.1}, r"pg_coef.*-0\.1"),
    (AuroraConfig, {"accept_coef": -0.1}, r"accept_coef.*-0\.1"),
    (Eagle3KLConfig, {"gamma": 0.0}, r"Eagle3KLConfig\.gamma.*0\.0"),
    (OSDConfig, {"divergence": "js"}, r"divergence.*forward_kl.*reverse_kl.*'js'"),
])
def test_config_validation_names_bad_value(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


def test_loss_batch_rejects_bad_shapes():
    b = random_batch()
    with pytest.raises(ValueError, match=r"mask.*\(6, 3\).*\(6, 2\)"):
        dataclasses.replace(b, mask=b.mask[:, :2])
    with pytest.raises(ValueError, match=r"deterministic.*\(4,\).*\(3,\)"):
        dataclasses.replace(b, deterministic=b.deterministic[:3])


@pytest.mark.parametrize("name", ["aurora", "eagle3_kl", "osd", "frozen"])
def test_every_algorithm_reports_the_same_diagnostics(name):
    algo = get_algorithm(name)
    out = algo.loss(random_batch(), algo.make_config())
    for key in ["losses/total", "accept/depth_1", "accept/depth_3", "accept/length_sim",
                "offpolicy/ess", "offpolicy/lag_mean", "offpolicy/lag_max", "offpolicy/clip_fraction",
                "offpolicy/dropped_stale", "data/num_tokens"]:
        assert isinstance(out.metrics[key], float), key
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.loss.requires_grad == (name != "frozen")


def test_frozen_has_no_grad_but_logs_acceptance():
    b = random_batch()
    out = get_algorithm("frozen").loss(b, get_algorithm("frozen").make_config())
    assert not out.loss.requires_grad and out.loss.item() == 0.0
    alpha = current_acceptance(b)
    assert out.metrics["accept/depth_2"] == pytest.approx(alpha[:, 1].mean().item())


def test_acceptance_metrics_hand_example():
    # depth 1: mean(.5, .6) = .55; depth 2: only row 0 valid = .4
    # length_sim over full rows only (row 0): .5 + .5*.4 = .7
    m = acceptance_metrics(t([[0.5, 0.4], [0.6, 0.0]]), t([[True, True], [True, False]]))
    assert m == pytest.approx({"accept/depth_1": 0.55, "accept/depth_2": 0.4, "accept/length_sim": 0.7})


def test_osd_uses_only_first_rejected_positions():
    b = random_batch()  # steps: (row 0, k 3, a 1), (row 1, k 2, a 2), (row 2, k 3, a 3), (row 4, k 1, a 0)
    rows, idx = rejected_entries(b)
    assert list(zip(rows.tolist(), idx.tolist())) == [(0, 1), (4, 0)]
    out = get_algorithm("osd").loss(b, OSDConfig())
    out.loss.backward()
    touched = (b.draft_logits.grad.abs().sum(-1) > 0).nonzero().tolist()
    assert touched == [[0, 1], [4, 0]]
    expect = forward_kl_soft_ce(b.draft_logits[[0, 4], [1, 0]], b.target_logp[[0, 4], [1, 0]],
                                t([True, True]), 1.0)
    assert_close(out.loss, expect)
    assert out.metrics["osd/num_rejected"] == 2.0 and out.metrics["osd/no_rejections"] == 0.0
    rkl = get_algorithm("osd").loss(b, OSDConfig(divergence="reverse_kl"))
    assert "losses/reverse_kl" in rkl.metrics


def test_osd_without_proposals_is_zero_with_grad_path():
    b = random_batch()
    empty = LossBatch.sampled_rows(b.draft_logits, b.target_logp, b.target_tokens, b.mask)
    out = get_algorithm("osd").loss(empty, OSDConfig())
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert out.metrics["osd/no_rejections"] == 1.0


def test_aurora_with_no_proposals():
    b = random_batch()
    empty = LossBatch.sampled_rows(b.draft_logits, b.target_logp, b.target_tokens, b.mask)
    out = get_algorithm("aurora").loss(empty, AuroraConfig(depth_weighting="reach"))
    out.loss.backward()
    assert torch.isfinite(b.draft_logits.grad).all() and b.draft_logits.grad.abs().sum() > 0
    assert out.metrics["losses/pg"] == 0.0 and out.metrics["data/num_steps"] == 0.0
    assert out.metrics["offpolicy/ess"] == 0.0 and out.metrics["offpolicy/dropped_stale"] == 0.0


def test_aurora_drops_stale_steps_and_counts_them():
    b = random_batch(lag=[0, 9, 12, 8])  # max_lag 8 drops steps 1 and 2
    cfg = AuroraConfig(ntp_coef=0.0, rkl_coef=0.0, accept_coef=0.0, pg_coef=0.5)
    out = get_algorithm("aurora").loss(b, cfg)
    assert out.metrics["offpolicy/dropped_stale"] == 2.0
    assert out.metrics["offpolicy/lag_max"] == 12.0 and out.metrics["offpolicy/lag_mean"] == 7.25
    out.loss.backward()
    rows_with_grad = (b.draft_logits.grad.abs().sum((1, 2)) > 0).nonzero().flatten().tolist()
    assert rows_with_grad == [0, 4]  # rows 1 and 2 belong only to the dropped steps


def test_aurora_total_is_the_weighted_sum_of_terms():
    cfg = AuroraConfig(ntp_coef=0.3, rkl_coef=2.0, accept_coef=0.4, pg_coef=0.7)
    m = get_algorithm("aurora").loss(random_batch(), cfg).metrics
    expect = (0.3 * m["losses/ntp"] + 2.0 * m["losses/rkl"] - 0.4 * m["losses/expected_accept_length"]
              + 0.7 * m["losses/pg"])
    assert m["losses/total"] == pytest.approx(expect)


def test_importing_algorithms_pulls_in_neither_ray_nor_the_engine():
    code = ("import sys, algorithms; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.') "
            "or m.startswith('aurora_rl.engine')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
