"""The day0 and shift experiments in their short modes (tiny random model, real Ray runs), and the
analysis pieces they are built from. The short modes run as a user runs them, one command in a fresh
interpreter: that also keeps the Ray driver state of two runs out of this test process."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def load(name: str):
    # experiments/ is not a package: load the script as a module, in-process.
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_recovery_counts_requests_until_back_within_90_percent():
    recovery = load("shift").recovery
    acc = [2.0, 2.0, 2.0, 1.0, 1.2, 1.9, 1.9, 1.9]
    # Moving mean of window 2 over requests since the shift (index 3): 1.0, 1.1, 1.55, 1.9 >= 1.8.
    assert recovery(acc, 3, pre_level=2.0, window=2) == 4
    assert recovery(acc, 3, pre_level=2.0, window=1) == 3
    assert recovery(acc[:5], 3, pre_level=2.0, window=2) is None


@pytest.mark.unit
def test_requests_that_did_not_finish_are_counted_not_dropped(tmp_path):
    load_requests = load("shift").load_requests
    lines = [{"request_id": "r0", "index": 0, "status": "finished", "accept_length": 1.5},
             {"request_id": "r1", "index": 1, "status": "error", "error": "boom"},
             {"request_id": "r2", "index": 2, "status": "finished", "accept_length": 1.0}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    finished, others = load_requests(tmp_path)
    assert [r["index"] for r in finished] == [0, 2] and others == 1
    with pytest.raises(FileNotFoundError, match="requests.jsonl is missing"):
        load_requests(tmp_path / "nowhere")


@pytest.mark.unit
def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        load("day0").parse_args(["--arms", "aurora,best"])
    with pytest.raises(SystemExit):
        load("shift").parse_args(["--phases", "code:10"])
    with pytest.raises(SystemExit):
        load("shift").parse_args(["--phases", "code=10,chat=5"])


@pytest.mark.smoke
def test_day0_short(tmp_path):
    out = tmp_path / "day0"
    run_script("day0", "--short", "--arms", "osd,no_spec", "--out", str(out))
    result = json.loads((out / "results.json").read_text())
    assert set(result["arms"]) == {"osd", "no_spec"} and result["mode"] == "short"
    osd, base = result["arms"]["osd"], result["arms"]["no_spec"]
    assert osd["requests"] == base["requests"] == 6 and osd["not_finished"] == base["not_finished"] == 0
    # Paired against itself, the baseline's speedup is exactly 1 request by request.
    assert base["curve"]["paired_speedup"] == pytest.approx([1.0] * 6)
    assert all(math.isfinite(x) and x > 0 for x in osd["curve"]["paired_speedup"])
    assert osd["final_policy_version"] >= 1 and base["final_policy_version"] == 0
    ev = osd["eval"]
    assert ev["accept_length"] >= 1.0 and ev["speedup"] > 0 and ev["adaptive_speedup"] > 0
    lines = (out / "osd" / "requests.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["index"] for x in lines) == list(range(6))
    assert (out / "day0.png").stat().st_size > 0 and "| osd | 6 |" in (out / "results.md").read_text()


@pytest.mark.smoke
def test_shift_short(tmp_path):
    out = tmp_path / "shift"
    run_script("shift", "--short", "--out", str(out))
    result = json.loads((out / "results.json").read_text())
    assert [p["domain"] for p in result["phases"]] == ["code", "chat", "all"]
    for arm in ("online", "frozen"):
        r = result["arms"][arm]
        assert r["requests"] == 16 and r["not_finished"] == 0
        assert r["domains"] == ["code"] * 4 + ["chat"] * 6 + ["all"] * 6
        assert len(r["accept_length_per_phase"]) == 3 and len(r["recovery_requests"]) == 2
    assert max(result["arms"]["frozen"]["policy_version"]) == 0
    assert max(result["arms"]["online"]["policy_version"]) >= 0
    assert result["online_over_frozen_shifted"] > 0
    assert (out / "shift.png").stat().st_size > 0


@pytest.mark.unit
def test_learner_ablation_variants_are_parsed_and_bad_ones_named():
    parse_variant = load("learner_ablation").parse_variant
    assert parse_variant("p:prompt_bases=64,replay_ratio=2,dtype=bfloat16") == (
        "p", {"prompt_bases": 64, "replay_ratio": 2, "dtype": "bfloat16"})
    with pytest.raises(ValueError, match="not_a_field"):
        parse_variant("x:not_a_field=1")
    with pytest.raises(ValueError, match="no name"):
        parse_variant(":lr=0.1")


@pytest.mark.smoke
def test_learner_ablation_short(tmp_path):
    run_script("learner_ablation", "--short", "--out", str(tmp_path), "--variant", "plain:replay_ratio=1",
               "--variant", "prompt:prompt_bases=8,replay_ratio=1")
    data = json.loads((tmp_path / "learner_ablation.json").read_text())["results"]
    assert list(data) == ["plain", "prompt"]
    for r in data.values():
        curve = r["curve"]
        assert curve[0]["learner_s"] == 0.0 and curve[-1]["learner_s"] >= 4.0  # the --short budget was spent
        assert curve[-1]["updates"] > 0 and all(1.0 <= p["accept_length"] <= 1.0 + 4 for p in curve)
    assert (tmp_path / "learner_ablation.png").stat().st_size > 0
    assert "| prompt |" in (tmp_path / "learner_ablation.md").read_text()


@pytest.mark.smoke
def test_objective_ablation_short(tmp_path):
    """Record both trace sets with the tiny model, train two arms one update each, print the table."""
    import torch

    threads = torch.get_num_threads()  # the scripts set their own; the rest of the session keeps its own
    traces = tmp_path / "traces"
    load("record_objective_traces").main(["--short", "--out", str(traces), "--threads", "1"])
    assert (traces / "sampled" / "held_out.safetensors").is_file()
    ablation = load("objective_ablation")
    for s in ("greedy", "sampled"):
        ablation.main(["--traces", str(traces), "--out", str(tmp_path), "--set", s, "--arms", "full", "osd",
                       "--seeds", "0", "--updates", "1", "--batch-traces", "2", "--depth", "4"])
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {(r["set"], r["arm"]) for r in runs} == {(s, a) for s in ("greedy", "sampled") for a in ("full", "osd")}
    assert all(1.0 <= r["accept_length"] <= 4.0 and r["updates_per_s"] > 0 for r in runs)
    # Greedy proposals are point masses: the full loss saw them as deterministic, none as stochastic.
    assert all(r["deterministic_steps_last"] > 0 for r in runs if r["set"] == "greedy" and r["arm"] == "full")
    assert all(r["deterministic_steps_last"] == 0 for r in runs if r["set"] == "sampled" and r["arm"] == "full")
    table = ablation.table(tmp_path)
    assert "| greedy | full | 1 |" in table and "| sampled | osd | 1 |" in table
    torch.set_num_threads(threads)


@pytest.mark.unit
def test_oracle_ceiling_cells_accept_every_proposal_and_stay_lossless():
    """The ceiling experiment's oracle cells (a tiny random target and draft): every proposal is right, so
    steps emit about k + 1 tokens where the draft alone gets almost nothing accepted, and the outputs
    are plain decoding's."""
    from aurora_rl.engine import SamplingParams
    from tests.conftest import tiny_target
    from tests.test_engine import prompts
    from tests.test_speculative import make_draft

    exp = load("oracle_draft_ceiling")
    model, _ = tiny_target()
    draft, ps, sp = make_draft(model), prompts(4), SamplingParams(max_tokens=21, ignore_eos=True)
    answers = exp.answers_of(model, None, ps, 21, 2)
    oracle = exp.Oracle(answers)
    for name, (lookahead, _) in exp.CELLS.items():
        outs = exp.oracle_cell(model, None, draft, 2, name, oracle).engine.generate(ps, sp)
        assert [o.output_ids for o in outs] == [answers[tuple(p)] for p in ps], name
        # 20 tokens after the prefill's first: 4 steps of 5 at k = 4 (the tree is 5 deep), accept length 5
        assert min(o.accept_length for o in outs) == 5.0, (name, [o.accept_length for o in outs])
        alone = exp.Cell(model, None, draft, 2, lookahead, capture=True).engine.generate(ps, sp)
        assert max(o.accept_length for o in alone) < 2.0, name  # the random draft (or no copy) alone
