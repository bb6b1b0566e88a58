"""Training-time test: the unrolled draft equals the serving draft step by step, depth for depth."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.training.ttt import TTTInputs, unroll
from tests.conftest import tiny_target
from tests.test_speculative import make_draft


def serving_chain(draft, tokens, feats, base, depth):
    """Logits of the draft at depths 1..depth for base position ``base``, run as the engine runs it."""
    cache = draft.new_cache(1, 64)
    slot = torch.tensor([0])
    pos = torch.arange(base + 1)[None]
    out = draft(tokens[None, 1: base + 2], draft.fuse(feats[None, : base + 1]), pos, cache, slot)
    logits, h = [out.logits[0, -1]], out.hidden[:, -1:]
    for j in range(2, depth + 1):
        out = draft(tokens[None, base + j: base + j + 1], h, torch.tensor([[base + j - 1]]), cache, slot)
        logits.append(out.logits[0, 0])
        h = out.hidden
    return torch.stack(logits)


@pytest.mark.unit
def test_unrolled_draft_matches_serving_steps():
    model, _ = tiny_target()
    draft = make_draft(model, vocab=64, seed=1)
    g = torch.Generator().manual_seed(0)
    lengths = [14, 9]
    K = 4
    T = max(lengths)
    tokens = torch.zeros(2, T + 1, dtype=torch.long)
    feats = torch.zeros(2, T, 192)
    for b, L in enumerate(lengths):
        tokens[b, : L + 1] = torch.randint(2, 128, (L + 1,), generator=g)
        out = model(tokens[b: b + 1, :L], torch.arange(L)[None], model.new_cache(1, 32), torch.tensor([0]))
        feats[b, :L] = out.taps[0]
    bases = torch.tensor([[3, 7, 10], [0, 5, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    inp = TTTInputs(tokens=tokens, features=feats, lengths=torch.tensor(lengths), bases=bases, base_valid=valid)
    with torch.no_grad():
        got = unroll(draft, inp, K)
    assert got.shape == (2, 3, K, 64)
    for b in range(2):
        for s in range(3):
            if not valid[b, s]:
                continue
            i = int(bases[b, s])
            depth = min(K, lengths[b] - i - 1)  # depth j needs token x_{i+j} to exist
            ref = serving_chain(draft, tokens[b], feats[b], i, depth)
            torch.testing.assert_close(got[b, s, :depth], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.unit
def test_unroll_is_differentiable_and_leaves_embedding_frozen():
    model, _ = tiny_target()
    draft = make_draft(model, vocab=64)
    inp = TTTInputs(tokens=torch.randint(0, 128, (1, 9)), features=torch.randn(1, 8, 192),
                    lengths=torch.tensor([8]), bases=torch.tensor([[2, 4]]), base_valid=torch.ones(1, 2, dtype=torch.bool))
    unroll(draft, inp, 3).logsumexp(-1).sum().backward()
    assert draft.embed.weight.grad is None
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0
