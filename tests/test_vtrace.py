"""V-trace along speculation chains: hand examples, and a definition-level reference that
cross-checks RLlib's vtrace_torch as `chain_vtrace` calls it."""

import math

import pytest
import torch
from torch.testing import assert_close

from algorithms.terms import chain_values, chain_vtrace

pytestmark = pytest.mark.unit
LN = math.log


def t(x, **kw):
    return torch.tensor(x, **kw)


def test_chain_values_hand_example():
    # α = [.5, .4, .9], k = 3: V3 = .9, V2 = .4(1 + .9) = .76, V1 = .5(1 + .76) = .88
    # k = 2 drops depth 3: V2 = .4, V1 = .5 * 1.4 = .7
    alpha = t([[0.5, 0.4, 0.9], [0.5, 0.4, 0.9]])
    pmask = t([[True, True, True], [True, True, False]])
    assert_close(chain_values(alpha, pmask), t([[0.88, 0.76, 0.9], [0.7, 0.4, 0.0]]))


def reference_vtrace(log_rhos, discounts, rewards, values, rho_bar, pg_rho_bar):
    """IMPALA eq. (1), written from the definition, batch-major [B, T], c̄ = 1, bootstrap 0:
    v_s = V_s + Σ_{t≥s} (Π_{i=s}^{t-1} γ_i c_i) ρ_t δ_t,  A_s = ρ^pg_s (r_s + γ_s v_{s+1} − V_s)."""
    B, T = values.shape
    rho = log_rhos.exp()
    crho, c, pgrho = rho.clamp(max=rho_bar), rho.clamp(max=1.0), rho.clamp(max=pg_rho_bar)
    v_next = torch.cat([values[:, 1:], torch.zeros(B, 1)], 1)
    delta = crho * (rewards + discounts * v_next - values)
    vs = torch.zeros(B, T)
    for b in range(B):
        for s in range(T):
            acc, coef = values[b, s].item(), 1.0
            for u in range(s, T):
                acc += coef * delta[b, u].item()
                coef *= discounts[b, u].item() * c[b, u].item()
            vs[b, s] = acc
    vs_next = torch.cat([vs[:, 1:], torch.zeros(B, 1)], 1)
    return vs, pgrho * (rewards + discounts * vs_next - values)


def test_chain_vtrace_hand_example():
    # Step 0: k = 3, a = 1 (depth 1 accepted, depth 2 rejected, depth 3 not a step).
    #   V = [.88, .76, -]; ρ = [.6/.3, .2/.4] = [2, .5] -> clipped [1, .5], c = [1, .5]
    #   δ2 = .5(0 − .76) = −.38 -> v2 = .38;  δ1 = 1(1 + .76 − .88) = .88 -> v1 = .88 + .88 − .38 = 1.38
    #   A1 = 1·(1 + v2 − V1) = .5;  A2 = .5(0 − .76) = −.38
    # Step 1: k = 3, a = 3, on-policy: v = returns [3, 2, 1];
    #   A = [1 + 2 − .88, 1 + 1 − .76, 1 + 0 − .9] = [2.12, 1.24, .1]
    alpha = t([[0.5, 0.4, 0.9], [0.5, 0.4, 0.9]])
    target_logp = t([[LN(0.6), LN(0.2), 0.0], [LN(0.5)] * 3])
    behaviour_logp = t([[LN(0.3), LN(0.4), -math.inf], [LN(0.5)] * 3])
    vt = chain_vtrace(target_logp, behaviour_logp, t([1, 3]), torch.ones(2, 3, dtype=torch.bool),
                      alpha, rho_bar=1.0)
    assert vt.valid.tolist() == [[True, True, False], [True, True, True]]
    assert_close(vt.rewards, t([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert_close(vt.vs, t([[1.38, 0.38, 0.0], [3.0, 2.0, 1.0]]))
    assert_close(vt.pg_advantages, t([[0.5, -0.38, 0.0], [2.12, 1.24, 0.1]]))
    # The same numbers from the definition-level reference on the valid entries.
    ref_vs, ref_adv = reference_vtrace(
        torch.where(vt.valid, target_logp - behaviour_logp, torch.zeros(2, 3)),
        vt.discounts, vt.rewards, vt.values, 1.0, 1.0)
    assert_close(vt.vs, ref_vs * vt.valid)
    assert_close(vt.pg_advantages, ref_adv * vt.valid)


def test_chain_vtrace_matches_reference_on_random_chains():
    g = torch.Generator().manual_seed(0)
    M, K = 16, 5
    k = torch.randint(1, K + 1, (M,), generator=g)
    pmask = torch.arange(K) < k.unsqueeze(1)
    accepted = (torch.rand(M, generator=g) * (k + 1)).long().clamp(max=k)
    alpha = torch.rand(M, K, generator=g)
    tlp, blp = -torch.rand(M, K, generator=g) * 2, -torch.rand(M, K, generator=g) * 2
    vt = chain_vtrace(tlp, blp, accepted, pmask, alpha, rho_bar=1.5, pg_rho_bar=0.8)
    log_rhos = torch.where(vt.valid, tlp - blp, torch.zeros(M, K))
    ref_vs, ref_adv = reference_vtrace(log_rhos, vt.discounts, vt.rewards, vt.values, 1.5, 0.8)
    assert_close(vt.vs, ref_vs * vt.valid)
    assert_close(vt.pg_advantages, ref_adv * vt.valid)
    assert (vt.pg_advantages[vt.valid & (vt.rewards == 0)] <= 0).all()  # rejections are negative


def test_chain_vtrace_empty():
    vt = chain_vtrace(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long),
                      torch.zeros(0, 3, dtype=torch.bool), torch.zeros(0, 3))
    assert vt.vs.shape == (0, 3) and vt.pg_advantages.shape == (0, 3)
