"""The llama.cpp peer: its batch bookkeeping, and (with the ``bench`` extra) a batch of sequences giving
each sequence the tokens it gets alone."""

from __future__ import annotations

import pytest

from aurora_rl.bench_llamacpp import BatchEntry, decode_entries, prefill_chunks


@pytest.mark.unit
def test_prefill_is_cut_at_n_batch_with_logits_at_the_prompt_end_only():
    chunks = prefill_chunks([5, 6, 7, 8, 9], seq=3, n_batch=2)
    assert [[e.token for e in c] for c in chunks] == [[5, 6], [7, 8], [9]]
    assert [e.pos for c in chunks for e in c] == [0, 1, 2, 3, 4]
    assert {e.seq for c in chunks for e in c} == {3}
    assert [e.logits for c in chunks for e in c] == [False, False, False, False, True]
    assert prefill_chunks([1], seq=0, n_batch=512) == [[BatchEntry(1, 0, 0, True)]]
    with pytest.raises(ValueError, match="empty prompt"):
        prefill_chunks([], seq=0, n_batch=8)


@pytest.mark.unit
def test_a_decode_step_is_one_token_per_sequence_at_its_next_position():
    assert decode_entries([11, 12], [7, 30]) == [BatchEntry(11, 7, 0, True), BatchEntry(12, 30, 1, True)]


@pytest.mark.smoke
def test_a_batch_of_two_gives_each_prompt_its_batch_one_tokens(smollm2_tokenizer):
    pytest.importorskip("llama_cpp")  # the bench extra: not in the test install
    from aurora_rl.assets import smollm2_gguf_path
    from aurora_rl.bench_llamacpp import LlamaCppCell, LlamaCppModel

    prompts = [smollm2_tokenizer(t)["input_ids"] for t in ("def fibonacci(n):", "The capital of France is a city")]
    model = LlamaCppModel(smollm2_gguf_path(), threads=1)
    alone, together = LlamaCppCell(model, 1, max_len=256), LlamaCppCell(model, 2, max_len=256)
    try:
        singles = [alone.generate([p], 16)[0] for p in prompts]
        pair = together.generate(prompts, 16)
        again = together.generate(prompts[:1], 16)  # a smaller wave after a full one: the memory was cleared
    finally:
        alone.close()
        together.close()
        model.close()
    assert [o.output_ids for o in pair] == [o.output_ids for o in singles]
    assert again[0].output_ids == singles[0].output_ids
    for o in pair:
        assert o.num_output_tokens == 16 and 0 < o.ttft_s and o.tokens_per_s > 0 and o.decode_tokens_per_s > 0
    assert pair[0].ttft_s < pair[1].ttft_s  # prompts are prefilled one after the other
