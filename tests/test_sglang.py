"""SGLang engine: launch arguments, response parsing, the draft-update request, trace recompute, and an
end-to-end run of SGLangRollout against a MOCK SGLang server.

SGLang cannot be installed or run on these CPU machines (see /work/shared/NOTES.md), so nothing here
talks to real SGLang. The fixtures and the mock server follow the formats of sglang 0.5.22's sources
(``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``, ``srt/managers/tokenizer_manager.py``).
"""

from __future__ import annotations

import base64
import json
import pickle
import threading
import time

import pytest
import torch

from aurora_rl.config import EngineSection
from aurora_rl.models.eagle3_io import to_eagle3_tensors
from aurora_rl.sglang import SGLangServerConfig, build_launch_command, recompute_trace
from aurora_rl.sglang.client import (SGLangHTTPError, draft_update_body, parse_generate_response,
                                     serialize_named_tensors, to_sampling_params)
from aurora_rl.sglang.engine import SGLangRollout
from tests.conftest import tiny_target
from tests.sglang_mock import MockSGLang
from tests.test_speculative import make_draft

pytestmark = pytest.mark.unit

# A /generate answer as sglang 0.5.22 writes it for one non-streamed prompt given as input_ids:
# {"text", "output_ids", "meta_info"}; the spec_* keys appear once the request was verified at least once.
GENERATE_WITH_SPEC = json.loads("""{
  "text": " the quick brown fox",
  "output_ids": [5, 6, 7, 8, 9, 10, 11, 12],
  "meta_info": {
    "id": "req-1", "finish_reason": {"type": "length", "length": 8}, "prompt_tokens": 4,
    "weight_version": "7", "num_retractions": 0, "reasoning_tokens": 0, "completion_tokens": 8,
    "cached_tokens": 0, "spec_accept_rate": 0.4166666666666667, "spec_accept_length": 2.6666666666666665,
    "spec_num_correct_drafts": 5, "spec_num_proposed_drafts": 12, "spec_verify_ct": 3, "e2e_latency": 0.125
  }
}""")
GENERATE_NO_SPEC = json.loads("""{
  "text": "ok", "output_ids": [42],
  "meta_info": {"id": "req-2", "finish_reason": {"type": "stop", "matched": 1}, "prompt_tokens": 3,
                "weight_version": "default", "num_retractions": 0, "reasoning_tokens": 0,
                "completion_tokens": 1, "cached_tokens": 2, "e2e_latency": 0.01}
}""")


# ---- arguments ----------------------------------------------------------------------------------
def _cfg(**kw):
    return SGLangServerConfig(**{"model_path": "meta-llama/Llama-3.1-8B-Instruct", "draft_path": "/ckpt/draft", **kw})


def test_launch_command_has_the_pinned_flags():
    cmd = build_launch_command(_cfg(tp_size=2, speculative_num_steps=3, speculative_num_draft_tokens=4,
                                    mem_fraction_static=0.7, dtype="bfloat16", port=31000,
                                    max_running_requests=16, extra_args=["--cuda-graph-max-bs", "16"]))
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    pairs = dict(zip(cmd[3::2], cmd[4::2]))
    assert pairs == {"--model-path": "meta-llama/Llama-3.1-8B-Instruct", "--speculative-algorithm": "EAGLE3",
                     "--speculative-draft-model-path": "/ckpt/draft", "--speculative-num-steps": "3",
                     "--speculative-eagle-topk": "1", "--speculative-num-draft-tokens": "4", "--tp-size": "2",
                     "--dtype": "bfloat16", "--host": "127.0.0.1", "--port": "31000",
                     "--mem-fraction-static": "0.7", "--max-running-requests": "16", "--cuda-graph-max-bs": "16"}


@pytest.mark.parametrize("kw, field", [
    ({"port": 0}, "port"), ({"tp_size": 0}, "tp_size"), ({"speculative_num_steps": 0}, "speculative_num_steps"),
    ({"speculative_num_draft_tokens": 3}, "speculative_num_draft_tokens"),
    ({"speculative_eagle_topk": 4, "speculative_num_draft_tokens": 30}, "speculative_num_draft_tokens"),
    ({"mem_fraction_static": 1.5}, "mem_fraction_static"), ({"dtype": "fp8"}, "dtype"),
    ({"model_path": ""}, "model_path"), ({"extra_args": ["--tp-size", "4"]}, "extra_args"),
])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        _cfg(**kw)


def test_from_engine_maps_our_engine_section_to_a_chain():
    cfg = SGLangServerConfig.from_engine(EngineSection(kind="sglang", lookahead=3, num_slots=8, max_len=1024),
                                         "m", "d", tp_size=2, mem_fraction_static=0.6)
    assert (cfg.speculative_num_steps, cfg.speculative_eagle_topk, cfg.speculative_num_draft_tokens) == (3, 1, 4)
    assert (cfg.max_running_requests, cfg.context_length, cfg.tp_size) == (8, 1024, 2)
    with pytest.raises(ValueError, match="unknown SGLang server argument.*eagle_top_k.*valid"):
        SGLangServerConfig.from_dict({"model_path": "m", "draft_path": "d", "eagle_top_k": 2})


# ---- responses and requests ---------------------------------------------------------------------
def test_parse_generate_with_spec_counters():
    r = parse_generate_response(GENERATE_WITH_SPEC)
    assert r.output_ids == [5, 6, 7, 8, 9, 10, 11, 12] and r.finish_reason == "length" and r.request_id == "req-1"
    assert (r.verify_steps, r.accepted_tokens, r.proposed_tokens, r.completion_tokens) == (3, 5, 12, 8)
    assert r.accept_length == pytest.approx(GENERATE_WITH_SPEC["meta_info"]["spec_accept_length"])
    assert r.weight_version == "7" and r.latency_s == 0.125


def test_parse_generate_without_spec_counters_and_bad_answers():
    r = parse_generate_response(GENERATE_NO_SPEC)
    assert (r.verify_steps, r.accepted_tokens, r.accept_length, r.finish_reason) == (0, 0, 1.0, "stop")
    assert parse_generate_response([GENERATE_NO_SPEC]).output_ids == [42]
    with pytest.raises(SGLangHTTPError, match="/generate.*output_ids"):
        parse_generate_response({"text": "x"})


def test_sampling_params_translation():
    sp = to_sampling_params({"max_tokens": 16, "top_k": 0, "seed": 3, "stop": ("\n",), "stop_token_ids": (2,)})
    assert sp == {"max_new_tokens": 16, "top_k": -1, "sampling_seed": 3, "stop": ["\n"], "stop_token_ids": [2],
                  "temperature": 0.0}
    with pytest.raises(ValueError, match="beam.*valid"):
        to_sampling_params({"beam": 2})
    with pytest.raises(ValueError, match="lookahead"):
        to_sampling_params({"lookahead": 2})


def test_draft_update_body_targets_the_draft_only():
    named = [("fc.weight", torch.arange(6.0).view(2, 3)), ("d2t", torch.tensor([0, 1, 1]))]
    ser = serialize_named_tensors(named, tp_size=2)
    body = draft_update_body(ser, version=5)
    assert body == {"serialized_named_tensors": ser, "load_format": None, "flush_cache": False,
                    "abort_all_requests": False, "weight_version": "5", "selector": "draft"}
    assert len(ser) == 2
    for payload in ser:  # one pickle per rank; what sglang's MultiprocessingSerializer.deserialize does
        decoded = pickle.loads(base64.b64decode(payload))
        assert [n for n, _ in decoded] == ["fc.weight", "d2t"]
        torch.testing.assert_close(decoded[0][1], named[0][1])


def test_draft_update_payload_reads_in_an_unrelated_process():
    """The server is not our multiprocessing child: torch's default file-descriptor sharing fails there
    (multiprocessing's resource sharer rejects the other process's authkey), file-system sharing works."""
    import subprocess
    import sys

    named = [("fc.weight", torch.arange(6.0).view(2, 3))]
    ser = serialize_named_tensors(named, tp_size=2)
    reader = ("import base64, pickle, sys, torch\n"
              "for s in sys.stdin.read().split():\n"
              "    print(pickle.loads(base64.b64decode(s))[0][1].sum().item())\n")
    out = subprocess.run([sys.executable, "-c", reader], input=" ".join(ser), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["15.0", "15.0"]


# ---- recompute ----------------------------------------------------------------------------------
def test_recompute_gives_the_taps_of_incremental_serving():
    model, _ = tiny_target()
    prompt, output = [3, 17, 29, 4, 8], [50, 51, 9, 77]
    rt = recompute_trace(model, prompt, output, GENERATE_WITH_SPEC["meta_info"], policy_version=2,
                         dtype=torch.float32, request_id="r")
    t, L = rt.trace, len(prompt) + len(output) - 1
    assert t.taps.shape == (L, 3 * 64) and t.hidden.shape == (L, 64) and t.verify_steps == 0
    assert t.proposals.shape == (0, 0) and t.accept_length == 1.0
    assert (rt.counters.verify_steps, rt.counters.accepted_tokens, rt.counters.policy_version) == (3, 5, 7)
    assert rt.source == "sglang"
    # what a serving target computes: prefill the prompt, then one token at a time
    cache, slot, tokens = model.new_cache(1, 32), torch.tensor([0]), prompt + output[:-1]
    first = model.forward(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, slot)
    taps, hidden = [first.taps[0]], [first.hidden[0]]
    for i in range(len(prompt), L):
        o = model.forward(torch.tensor([[tokens[i]]]), torch.tensor([[i]]), cache, slot)
        taps.append(o.taps[0])
        hidden.append(o.hidden[0])
    torch.testing.assert_close(t.taps, torch.cat(taps), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t.hidden, torch.cat(hidden), atol=1e-4, rtol=1e-4)
    default = recompute_trace(model, prompt, output, GENERATE_NO_SPEC["meta_info"], policy_version=2)
    assert default.counters.policy_version == 2 and default.trace.taps.dtype == torch.bfloat16


def test_recomputed_traces_feed_the_learner_without_proposal_rows():
    from aurora_rl.training.batching import collate

    model, _ = tiny_target()
    draft = make_draft(model, vocab=128)
    rt = recompute_trace(model, [3, 17, 29], [50, 51, 9, 77], {}, policy_version=0, dtype=torch.float32)
    batch = collate([rt.trace], draft, model.lm_head.weight, depth=3)
    assert batch.proposals.shape[0] == 0 and batch.num_tokens > 0  # NTP/KL rows, no PG rows


@pytest.mark.parametrize("algorithm", ["aurora", "eagle3_kl", "osd", "frozen"])
def test_learner_on_sglang_traces_switches_off_the_proposal_terms_and_says_so(algorithm):
    """Recomputed traces log no proposals: every algorithm still updates (or, frozen, reports) on their
    features, the proposal-based terms see no rows, and the metrics count such traces."""
    import math

    from aurora_rl.training.learner import Learner, LearnerConfig

    model, _ = tiny_target()
    traces = [recompute_trace(model, [3, 17, 29], [50, 51, 9, 77], GENERATE_WITH_SPEC["meta_info"], 0,
                              torch.float32).trace,
              recompute_trace(model, [8, 4], [60, 61, 62], {}, 0, torch.float32).trace]
    learner = Learner(make_draft(model, vocab=128), model.lm_head.weight,
                      LearnerConfig(depth=3, warmup_steps=0), algorithm=algorithm)
    m = learner.update(traces)
    assert m["learner/traces_without_proposals"] == 2 and m["learner/traces"] == 2
    assert m["data/num_steps"] == 0 and m["offpolicy/num_proposal_tokens"] == 0 and m["data/num_tokens"] > 0
    assert all(math.isfinite(v) for v in m.values())
    if algorithm == "aurora":
        assert m["losses/pg"] == 0.0 and m["losses/ntp"] > 0.0
    assert learner.policy_version == (0 if algorithm == "frozen" else 1)


def test_recompute_rejects_empty_completion():
    model, _ = tiny_target()
    with pytest.raises(ValueError, match="0 output tokens"):
        recompute_trace(model, [1, 2], [], {}, 0)


# ---- end to end against a mock SGLang server ------------------------------------------------------
def _poll_until(worker, n, timeout_s=60.0):
    outputs, deadline = [], time.monotonic() + timeout_s
    while len(outputs) < n and time.monotonic() < deadline:
        outputs += worker.poll()["outputs"]
        time.sleep(0.02)
    return outputs


def test_sglang_rollout_end_to_end_against_mock_server(tmp_path):
    from aurora_rl.serving.http import serve

    mock = MockSGLang()
    handle = serve(mock.app, port=0)
    model, _ = tiny_target()
    draft = make_draft(model, vocab=48)
    sunk, lock = [], threading.Lock()

    def sink(rt):
        with lock:
            sunk.append(rt)

    worker = SGLangRollout(0, model, draft.config, initial_version=0, url=handle.url, export_dir=tmp_path,
                           trace_sink=sink, trace_dtype=torch.float32, max_concurrency=2)
    try:
        refused = worker.submit([("a", [3, 4, 5], {"max_tokens": 6}), ("b", [7, 8], {"max_tokens": 3}),
                                 ("bad", [1], {"beam": 2}), ("boom", [0, 1], {"max_tokens": 2})])
        assert refused == ["bad"]
        outs = {o["request_id"]: o for o in _poll_until(worker, 4)}
        assert set(outs) == {"a", "b", "bad", "boom"}
        assert outs["a"]["status"] == "finished" and outs["a"]["output_tokens"] == 6
        assert outs["a"]["verify_steps"] == 3 and outs["a"]["accept_length"] == 2.0 and outs["a"]["source"] == "sglang"
        assert outs["bad"]["status"] == "error" and "beam" in outs["bad"]["error"]
        assert outs["boom"]["status"] == "error" and "/generate: status 500" in outs["boom"]["error"]
        assert mock.calls[0][1]["sampling_params"]["temperature"] == 0.0
        by_id = {rt.trace.request_id: rt for rt in sunk}
        assert set(by_id) == {"a", "b"} and by_id["a"].trace.taps.shape == (3 + 6 - 1, 3 * 64)
        assert by_id["a"].trace.verify_steps == 0 and by_id["a"].counters.verify_steps == 3

        swap = worker.swap_draft(draft.state_dict(), version=1)
        assert (swap.folder / "config.json").exists() and (swap.folder / "model.safetensors").exists()
        endpoints = [c[0] for c in mock.calls if c[0] != "/generate"]
        assert endpoints == ["/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update"]
        assert mock.calls[-3][1] == {"selector": "draft"}
        body = mock.calls[-2][1]
        assert body["selector"] == "draft" and body["weight_version"] == "1" and body["flush_cache"] is False
        assert set(mock.loaded_names) == set(to_eagle3_tensors(draft)) - {"embed_tokens.weight", "d2t", "t2d"}
        remapped = make_draft(model, vocab=48, seed=5)
        remapped.remap_vocab(torch.arange(80, 128))
        n_calls = len(mock.calls)
        with pytest.raises(ValueError, match="different draft vocabulary.*restart"):
            worker.swap_draft(remapped.state_dict(), version=2)
        assert len(mock.calls) == n_calls  # nothing was sent

        worker.submit([("c", [9, 10], {"max_tokens": 4})])
        (out_c,) = _poll_until(worker, 1)
        assert out_c["policy_version"] == 1
        stats = worker.stats()
        assert stats["system/swaps"] == 1 and stats["system/worker_version"] == 1
        assert stats["sglang/traces"] == 3 and stats["sglang/zero_step_traces"] == 3
        assert stats["sglang/requests_failed"] == 2
        assert [rt.counters.policy_version for rt in sunk if rt.trace.request_id == "c"] == [1]
        assert worker.evaluate([[5, 6]], {"max_tokens": 2}, lookahead=3, batch_size=1)[0]["output_tokens"] == 2
        assert worker.stats()["sglang/traces"] == 3  # evaluation keeps no traces

        # Exports do not pile up: only the newest two folders stay on disk.
        for version in (3, 4, 5):
            worker.swap_draft(draft.state_dict(), version=version)
        assert sorted(f.name for f in tmp_path.glob("draft-v*")) == ["draft-v000004", "draft-v000005"]
    finally:
        worker.shutdown()
        handle.stop()


def test_rollout_needs_exactly_one_of_server_or_url():
    model, _ = tiny_target()
    with pytest.raises(ValueError, match="exactly one of server"):
        SGLangRollout(0, model, make_draft(model, vocab=48).config)
