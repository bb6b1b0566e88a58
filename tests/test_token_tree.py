"""Token trees: masks and accept rules by hand, tree attention against a masked reference, and lossless
greedy and sampled outputs of tree speculation against plain decoding."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.chain_proposer import ChainProposer
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from aurora_rl.engine.token_tree import (COPY, TokenTree, ancestor_bits, greedy_tree_verify, rejection_tree_verify,
                                         select_nodes)
from aurora_rl.models import cpu_kernels
from aurora_rl.models.draft import select_draft_vocab, token_frequencies
from aurora_rl.models.layers import TreeAttention, attend, tree_mask
from tests.conftest import tiny_target
from tests.test_engine import prompts
from tests.test_speculative import make_draft, traces_by_id


def small_tree() -> TokenTree:
    """root(9) -> 5 -> {6, 7}; root -> 8 -> 6."""
    t = TokenTree.rooted(9)
    a = t.add(0, 5, -0.1)
    t.add(a, 6, -0.2)
    t.add(0, 8, -1.0)
    t.add(a, 7, -2.0)
    t.add(3, 6, -0.5)
    return t


@pytest.mark.unit
def test_tree_structure_masks_and_selection_by_hand():
    t = small_tree()
    assert t.tokens == [9, 5, 6, 8, 7, 6] and t.parents == [-1, 0, 1, 0, 1, 3] and t.depths == [0, 1, 2, 1, 2, 2]
    assert t.add(0, 5, -0.3, COPY) == 1 and len(t) == 6  # a sibling with the same token merges
    bits = [b & 0xFF for b in t.mask_bits()]
    # node 4 (parent 1, root 0): itself (bit 0), node 1 (bit 3), root (bit 4); bits 5.. = entries before
    assert bits[4] == 0b11111001 and bits[0] == 0xFF and bits[2] == 0xFF and bits[5] == 0b11100101
    assert ancestor_bits([-1, -1])[1] & 0b11 == 0b01  # two roots do not see each other
    assert t.path(4) == [1, 4] and t.path(0) == []
    # select: best 3 of scores, ancestors closed (index 2 outscores its parent 1 only by a tie)
    assert select_nodes([-0.1, -0.1, -0.1, -3.0], [-1, 0, 1, -1], 3) == [0, 1, 2]
    assert select_nodes([-2.0, -0.5, -0.6], [-1, 0, -1], 2) == [2, 0]


@pytest.mark.unit
def test_greedy_tree_verify_by_hand():
    t = small_tree()
    # argmax at nodes 0..5: root -> 8 (node 3) -> 6 (node 5) -> 4 (bonus)
    assert greedy_tree_verify(t, [8, 0, 0, 6, 0, 4]) == greedy_tree_verify(t, [8, 1, 1, 6, 1, 4])
    v = greedy_tree_verify(t, [8, 0, 0, 6, 0, 4])
    assert v.path == [3, 5] and v.next_token == 4
    v = greedy_tree_verify(t, [5, 3, 0, 0, 0, 0])  # root -> 5, then argmax 3 has no child: correction 3
    assert v.path == [1] and v.next_token == 3
    assert greedy_tree_verify(t, [2, 0, 0, 0, 0, 0]).path == []


@pytest.mark.unit
def test_rejection_tree_verify_emits_the_target_distribution():
    """The first and second emitted tokens over 20k draws follow p at the root and p at the child."""
    V = 10
    t = small_tree()
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(len(t), V, generator=g), -1)
    first, second = torch.zeros(V), torch.zeros(V)
    n = 20000
    for _ in range(n):
        v = rejection_tree_verify(t, p, g)
        toks = [t.tokens[i] for i in v.path] + [v.next_token]
        first[toks[0]] += 1
        if toks[0] == 5:
            second[toks[1]] += 1
    assert 0.5 * (first / n - p[0]).abs().sum() < 0.015
    assert 0.5 * (second / second.sum() - p[1]).abs().sum() < 0.03
    one_hot = torch.zeros(len(t), V)
    one_hot[:, 8] = 1.0  # the target certain of a second sibling: always accepted
    assert rejection_tree_verify(t, one_hot, g).path[0] == 3


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_tree_attention_equals_masked_sdpa(dtype):
    if not cpu_kernels.available():
        pytest.skip("native kernels not built on this machine (the PyTorch path is tested below)")
    g = torch.Generator().manual_seed(1)
    S, nkv, hd, nh, L = 3, 2, 32, 4, 40
    kc, vc = (torch.randn(S, nkv, L, hd, generator=g).to(dtype) for _ in range(2))
    t = small_tree()
    base = [7, 20]
    index = torch.tensor([[b + i for i in range(len(t))] for b in base])
    bits = torch.tensor([t.mask_bits()] * 2)
    q = torch.randn(2, len(t), nh, hd, generator=g).to(dtype)
    slots = torch.tensor([2, 0])
    got = cpu_kernels.attention(q, kc, vc, slots, index, hd ** -0.5, 30, tree_mask=bits)
    mask = tree_mask(index, bits, 30)
    ref = attend(q.transpose(1, 2).float(), kc[slots, :, :30].float(), vc[slots, :, :30].float(), mask)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref, **tol)
    assert mask[0, 0, 4].nonzero().flatten().tolist() == list(range(7)) + [7, 8, 11]


@pytest.mark.unit
@pytest.mark.parametrize("native", [True, False])
def test_tree_pass_equals_each_paths_chain_pass(native, monkeypatch):
    """Every node's logits in one tree pass equal those of its root path run as a plain chain."""
    if not native:
        monkeypatch.setattr(cpu_kernels, "attention_supported", lambda k: False)
    model, _ = tiny_target()
    prefix = torch.arange(3, 14).view(1, -1)
    t = small_tree()
    cache = model.new_cache(2, 48)
    model(prefix, torch.arange(11).view(1, -1), cache, torch.tensor([1]))
    cache.lengths[1] = 11
    index = torch.tensor([[11 + i for i in range(len(t))]])
    pos = torch.tensor([[11 + d for d in t.depths]])
    out = model(torch.tensor([t.tokens]), pos, cache, torch.tensor([1]),
                tree=TreeAttention(index, torch.tensor([t.mask_bits()])))
    for node in range(len(t)):
        chain = [0] + t.path(node)
        ref_cache = model.new_cache(1, 48)
        ids = torch.cat([prefix, torch.tensor([[t.tokens[i] for i in chain]])], 1)
        ref = model(ids, torch.arange(ids.shape[1]).view(1, -1), ref_cache, torch.tensor([0]))
        torch.testing.assert_close(out.logits[0, node], ref.logits[0, -1], atol=1e-4, rtol=1e-4)


def tree_engine(model, draft, topk, budget, slots=3, max_len=64, sink=None, copy=False, depth=4):
    cfg = SpecConfig(lookahead=4, tree_topk=topk, tree_budget=budget, tree_depth=depth, context_copy=copy)
    dec = SpecDecoder(draft, slots, max_len, cfg, trace_sink=sink)
    return LLMEngine(model, EngineConfig(num_slots=slots, max_len=max_len), decoder=dec), dec


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_tree_speculation_is_token_identical(family):
    model, _ = tiny_target(family)
    ps = prompts(7)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=64)).generate(ps, sp)
    draft = make_draft(model)
    for topk, budget, copy in ((1, 3, False), (3, 8, False), (4, 12, True), (2, 0, False)):
        engine, dec = tree_engine(model, draft, topk, budget, copy=copy)
        outs = engine.generate(ps, sp)
        assert [o.output_ids for o in outs] == [o.output_ids for o in base], (topk, budget, copy)
        assert dec.cache.lengths.sum() == 0 and not dec.proposer.pending
    assert sum(o.accepted_tokens for o in outs) == 0  # budget 0: plain decoding through the tree path
    mixed = [SamplingParams(max_tokens=24, ignore_eos=True, lookahead=i % 2) for i in range(7)]
    outs = tree_engine(model, draft, 3, 6)[0].generate(ps, mixed)  # trees of different sizes in one pass
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]


@pytest.mark.unit
def test_tree_traces_record_every_branch_and_the_path():
    model, _ = tiny_target()
    traces = []
    ps = prompts(3)
    engine, _ = tree_engine(model, make_draft(model, vocab=128), 3, 7, sink=traces.append, copy=True)
    outs = engine.generate(ps, SamplingParams(max_tokens=16, ignore_eos=True))
    assert sum(o.accepted_tokens for o in outs) > 0
    for o, t in zip(outs, traces_by_id(traces, outs)):
        assert t.tree_offsets.shape == (t.verify_steps + 1,) and t.accepted_tokens == o.accepted_tokens
        tokens = t.tokens
        for s, pos in enumerate(t.step_position.tolist()):
            lo, hi = t.tree_offsets[s].item(), t.tree_offsets[s + 1].item()
            assert hi - lo <= 8 and t.tree_parents[lo] == -1 and t.tree_tokens[lo] == tokens[pos + 1]
            kept = t.tree_accepted[lo:hi].nonzero().flatten().tolist()
            a = int(t.accepted[s])
            assert len(kept) == a + 1
            # the accepted path's tokens are the ones emitted, and the chain columns agree with it
            assert t.tree_tokens[lo:hi][kept[1:]].tolist() == tokens[pos + 2: pos + 2 + a].tolist()
            assert t.proposals[s, :a].tolist() == tokens[pos + 2: pos + 2 + a].tolist()
            assert t.tree_logp[lo:hi].le(0).all()


@pytest.mark.unit
def test_a_step_where_no_row_proposes_runs_no_tree_pass_and_still_records_its_tree():
    """Budget 0 for every row is a plain step (``SpecDecoder.plain_step``): no draft, no tree pass, the
    tokens of plain decoding (sampled ones too: the same generator draws), and one root-only tree per
    step in the trace, so a trace's steps and trees stay aligned."""
    model, _ = tiny_target()
    ps = prompts(3)
    sp = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=5)
    base = LLMEngine(model, EngineConfig(num_slots=3, max_len=64)).generate(ps, sp)
    traces = []
    engine, dec = tree_engine(model, make_draft(model, vocab=128), 4, 0, sink=traces.append, copy=True)
    calls = []
    inner = engine.runner.extend_tree
    engine.runner.extend_tree = lambda *a, **k: calls.append(1) or inner(*a, **k)
    outs = engine.generate(ps, sp)
    assert [o.output_ids for o in outs] == [o.output_ids for o in base]
    assert calls == [] and dec.draft_calls == 0
    for o, t in zip(outs, traces_by_id(traces, outs)):
        assert t.verify_steps == o.num_output_tokens - 1 and t.tree_offsets.shape == (t.verify_steps + 1,)
        assert (t.tree_offsets.diff() == 1).all() and (t.tree_parents == -1).all()


class OracleCopyProposer(ChainProposer):
    """Its copy branch is the target's argmax after the row's committed tokens (a fresh target pass): a
    deterministic function of the context, so verification stays lossless, that the target often
    accepts, beside the draft's own top-k branches."""

    target = scratch = None

    def copies(self, seqs):
        out = []
        for s in seqs:
            ids = s.prompt_ids + s.output_ids
            logits = self.target(torch.tensor([ids]), torch.arange(len(ids)).view(1, -1), self.scratch,
                                 torch.tensor([0]), logit_index=torch.tensor([len(ids) - 1]), with_taps=False).logits
            out.append([int(logits[0].argmax())])
        return out


class OracleCopyDecoder(SpecDecoder):
    """A tree decoder whose copy branch comes from ``OracleCopyProposer``."""

    proposer_type = OracleCopyProposer

    def __init__(self, *a, target, **kw):
        super().__init__(*a, **kw)
        self.proposer.target, self.proposer.scratch = target, target.new_cache(1, 32)


def chi_square_same_law(a: list[int], b: list[int], min_count: int = 10) -> tuple[float, float]:
    """Two-sample chi-square over full token ids (ids rarer than ``min_count`` in both samples pooled into
    one cell): (statistic, critical value at p = 0.001 by the Wilson-Hilferty approximation)."""
    ca = torch.bincount(torch.tensor(a), minlength=128).float()
    cb = torch.bincount(torch.tensor(b), minlength=128).float()
    keep = (ca + cb) >= min_count
    ca = torch.cat([ca[keep], ca[~keep].sum().view(1)])
    cb = torch.cat([cb[keep], cb[~keep].sum().view(1)])
    used = (ca + cb) > 0
    ca, cb = ca[used], cb[used]
    expected = (ca + cb) / 2
    stat = float((((ca - expected) ** 2 + (cb - expected) ** 2) / expected).sum())
    k = int(used.sum()) - 1
    critical = k * (1 - 2 / (9 * k) + 3.09 * (2 / (9 * k)) ** 0.5) ** 3
    return stat, critical


@pytest.mark.unit
def test_sampled_tree_speculation_has_the_target_distribution():
    """T = 0.7, top-p 0.9, a pruned draft vocabulary chosen from token frequencies, the draft's top-k
    branches beside a copy branch: the second and third tokens (the first the tree step emits, and the
    next) follow plain sampling's law, by a chi-square test on full token ids."""
    model, _ = tiny_target()
    g = torch.Generator().manual_seed(3)
    # An untied head at a scale where T = 0.7 leaves 10-30 tokens of mass, the top one at 0.2-0.6:
    # siblings are accepted and rejected often, and a wrong residual would show.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g) * 0.25)
    p = prompts(1)[0]
    n = 800
    counts = token_frequencies(prompts(20), 128)
    draft = make_draft(model, vocab=48)
    draft.set_vocab(select_draft_vocab(counts, 48))
    mk = lambda s: SamplingParams(max_tokens=3, temperature=0.7, top_p=0.9, seed=s, ignore_eos=True)  # noqa: E731
    plain = LLMEngine(model, EngineConfig(num_slots=16, max_len=32)).generate([p] * n, [mk(s) for s in range(n)])
    dec = OracleCopyDecoder(draft, 16, 32, SpecConfig(tree_topk=3, tree_budget=6, tree_depth=3), target=model)
    spec = LLMEngine(model, EngineConfig(num_slots=16, max_len=32), decoder=dec).generate(
        [p] * n, [mk(10_000 + s) for s in range(n)])
    assert 0.3 * n < sum(o.accepted_tokens for o in spec) < 1.5 * n  # both branches of the rule, often
    for i in (1, 2):
        stat, critical = chi_square_same_law([o.output_ids[i] for o in plain], [o.output_ids[i] for o in spec])
        assert stat < critical, f"token {i}: chi-square {stat:.1f} >= {critical:.1f} (p = 0.001)"


@pytest.mark.unit
def test_sglang_launch_args_take_the_tree_settings_of_the_engine():
    from aurora_rl.config import EngineSection
    from aurora_rl.sglang.args import SGLangServerConfig, build_launch_command

    engine = EngineSection(kind="sglang", lookahead=3, tree_topk=4, tree_budget=11, tree_depth=5)
    cfg = SGLangServerConfig.from_engine(engine, "m", "d")
    pairs = dict(zip(build_launch_command(cfg)[3::2], build_launch_command(cfg)[4::2]))
    assert (pairs["--speculative-eagle-topk"], pairs["--speculative-num-draft-tokens"],
            pairs["--speculative-num-steps"]) == ("4", "12", "5")
    chain = SGLangServerConfig.from_engine(EngineSection(kind="sglang", lookahead=3), "m", "d")
    assert (chain.speculative_eagle_topk, chain.speculative_num_draft_tokens) == (1, 4)
    clash = EngineSection(kind="sglang", tree_topk=4, sglang={"speculative_eagle_topk": 2})
    with pytest.raises(ValueError, match="speculative_eagle_topk=2 contradicts engine.tree_topk"):
        SGLangServerConfig.from_engine(clash, "m", "d")


@pytest.mark.unit
def test_a_top1_tree_proposes_the_chain():
    """topk = 1 grows one branch: the same proposals and behaviour log-probs as a chain of that length (the
    draft's deeper steps at the same RoPE positions, each in a fresh cache entry)."""
    model, _ = tiny_target()
    ps = prompts(4)
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    draft = make_draft(model, vocab=128, seed=2)
    runs = []
    for cfg in (SpecConfig(lookahead=4), SpecConfig(tree_topk=1, tree_budget=4, tree_depth=4)):
        traces = []
        dec = SpecDecoder(draft, 2, 64, cfg, trace_sink=traces.append)
        outs = LLMEngine(model, EngineConfig(num_slots=2, max_len=64), decoder=dec).generate(ps, sp)
        runs.append(traces_by_id(traces, outs))
    for chain, tree in zip(*runs):
        assert chain.proposals.tolist() == tree.proposals.tolist()
        torch.testing.assert_close(chain.behaviour_logp, tree.behaviour_logp, atol=1e-5, rtol=1e-5)


@pytest.mark.unit
def test_tree_traces_survive_save_and_load(tmp_path):
    from aurora_rl.training.trace_io import load_traces, save_traces

    model, _ = tiny_target()
    traces = []
    engine, _ = tree_engine(model, make_draft(model, vocab=128), 3, 5, sink=traces.append)
    engine.generate(prompts(2), SamplingParams(max_tokens=8, ignore_eos=True))
    back = load_traces(save_traces(traces, tmp_path / "t.safetensors"))
    for a, b in zip(traces, back):
        for name in ("tree_offsets", "tree_tokens", "tree_parents", "tree_logp", "tree_copied", "tree_accepted"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.unit
def test_a_reference_swap_expands_trees_with_the_new_draft():
    """``swap_draft`` (the hot swap's reference swap) serves the new draft in the tree proposer too: trees
    and the fed draft come from one version (the tree proposer kept the old draft before)."""
    model, _ = tiny_target()
    old, new = make_draft(model), make_draft(model)
    with torch.no_grad():
        for p in new.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    engine, dec = tree_engine(model, old, 3, 6)
    assert dec.swap_draft(new, 7) is old
    assert dec.tree_proposer.draft is new and dec.draft is new and dec.policy_version == 7
    ps = prompts(3)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    swapped = [o.draft_tokens for o in engine.generate(ps, sp)], [o.accepted_tokens for o in engine.generate(ps, sp)]
    fresh_engine, _ = tree_engine(model, new, 3, 6)
    fresh = [o.draft_tokens for o in fresh_engine.generate(ps, sp)], [o.accepted_tokens for o in fresh_engine.generate(ps, sp)]
    assert swapped == fresh  # the same proposals as an engine built on the new draft
