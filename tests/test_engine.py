"""Engine: greedy identity with transformers, continuous batching, stops, sampling, errors."""

from __future__ import annotations

import pytest
import torch

from aurora_rl.engine import EngineConfig, LLMEngine, PromptTooLongError, SamplingParams, Status
from aurora_rl.engine.sampling import processed_probs
from tests.conftest import tiny_target


class ByteTokenizer:
    """Bytes 2..127 of ASCII text as tokens (0 = BOS, 1 = EOS), enough for stop-string tests."""

    def encode(self, text):
        return [b for b in text.encode()]

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i > 1).decode(errors="replace")


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_transformers_with_continuous_batching(family):
    model, hf = tiny_target(family)
    engine = LLMEngine(model, EngineConfig(num_slots=3, max_len=64))
    ps = prompts(7)
    outs = engine.generate(ps, SamplingParams(max_tokens=12, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.output_ids == hf_greedy(hf, p, 12)
        assert o.num_output_tokens == 12 and o.finish_reason == "length" and o.verify_steps == 11
        assert o.tokens_per_s > 0 and o.latency_s > 0 and o.decode_tokens_per_s > 0


@pytest.mark.unit
def test_freed_slot_is_refilled_in_the_same_step():
    model, _ = tiny_target()
    engine = LLMEngine(model, EngineConfig(num_slots=2, max_len=64))
    ps = prompts(3)
    ids = [engine.add_request(ps[0], SamplingParams(max_tokens=2, ignore_eos=True)),
           engine.add_request(ps[1], SamplingParams(max_tokens=5, ignore_eos=True)),
           engine.add_request(ps[2], SamplingParams(max_tokens=5, ignore_eos=True))]
    assert engine.step() == []  # both slots prefilled, one token each
    finished = engine.step()  # request 0 reaches 2 tokens and leaves; request 2 enters now
    assert [o.request_id for o in finished] == [ids[0]]
    assert sorted(s.request_id for s in engine.scheduler.running.values()) == sorted(ids[1:])
    assert not engine.scheduler.waiting


@pytest.mark.unit
def test_prompt_longer_than_context_is_refused():
    model, _ = tiny_target()
    engine = LLMEngine(model, EngineConfig(num_slots=1, max_len=16))
    with pytest.raises(PromptTooLongError, match="16 tokens but the context limit is 16"):
        engine.add_request(list(range(2, 18)))
    with pytest.raises(ValueError, match=r"in \[0, 128\)"):
        engine.add_request([5, 500])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([])


@pytest.mark.unit
def test_context_limit_ends_generation_with_length():
    model, _ = tiny_target()
    engine = LLMEngine(model, EngineConfig(num_slots=1, max_len=16))
    (out,) = engine.generate([list(range(2, 12))], SamplingParams(max_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length" and out.num_prompt_tokens + out.num_output_tokens == 16


@pytest.mark.unit
def test_stop_on_eos_stop_token_and_stop_string():
    model, hf = tiny_target()
    p = prompts(1)[0]
    ref = hf_greedy(hf, p, 20)
    engine = LLMEngine(model, EngineConfig(num_slots=2, max_len=64), tokenizer=ByteTokenizer())
    stop_tok = ref[5]
    (o,) = engine.generate([p], SamplingParams(max_tokens=20, stop_token_ids=(stop_tok,), ignore_eos=True))
    assert o.output_ids == ref[: ref.index(stop_tok) + 1] and o.finish_reason == "stop"
    engine.eos_ids = {stop_tok}
    (o,) = engine.generate([p], SamplingParams(max_tokens=20))
    assert o.output_ids[-1] == stop_tok and o.finish_reason == "stop"
    engine.eos_ids = set()
    full = ByteTokenizer().decode(ref)
    stop = full[6:8]
    (o,) = engine.generate([p], SamplingParams(max_tokens=20, stop=(stop,)))
    assert o.finish_reason == "stop" and o.text == full[: full.find(stop)] and stop not in o.text


@pytest.mark.unit
def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model, _ = tiny_target()
    engine = LLMEngine(model, EngineConfig(num_slots=4, max_len=64))
    p = prompts(1)[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    a, b, c = engine.generate([p, p, p], [sp, sp, SamplingParams(max_tokens=16, temperature=1.0, seed=8,
                                                                    ignore_eos=True)])
    assert a.output_ids == b.output_ids and a.output_ids != c.output_ids
    g = engine.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    k1 = engine.generate([p], SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=1, ignore_eos=True))[0]
    assert g.output_ids == k1.output_ids


@pytest.mark.unit
def test_processed_probs_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p=0.8: 0.5 (< 0.8, keep next), 0.5+0.3 reaches 0.8 -> keep {0, 1}.
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert processed_probs(logits, SamplingParams()).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.unit
@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(lookahead=-1)])
def test_bad_sampling_params_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.unit
def test_abort_frees_the_slot():
    model, _ = tiny_target()
    engine = LLMEngine(model, EngineConfig(num_slots=1, max_len=64))
    rid = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    out = engine.abort(rid)
    assert out.status is Status.ABORTED and not engine.scheduler.running and not engine.has_work()
