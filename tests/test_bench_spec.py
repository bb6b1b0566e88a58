"""The speculation benchmark runs end to end in quick mode and writes its table as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_lookahead_list_is_checked():
    from aurora_rl.bench_spec import parse_lookaheads

    assert parse_lookaheads("3, 5,adaptive") == [3, 5, "adaptive"]
    assert parse_lookaheads("4+copy,adaptive+copy") == ["4+copy", "adaptive+copy"]
    with pytest.raises(ValueError, match="'fast'"):
        parse_lookaheads("3,fast")
    assert parse_lookaheads("0,0+copy") == [0, "0+copy"]  # the speculative path at k = 0: its fixed cost
    with pytest.raises(ValueError, match="'-1\\+copy'"):
        parse_lookaheads("-1+copy")


@pytest.mark.unit
def test_waves_are_served_abba_and_speedups_are_paired():
    from aurora_rl.bench_spec import paired_speedup, run_cells

    served = []

    class FakeCell:
        def __init__(self, name, batch=2):
            self.name, self.batch, self.wave_means = name, batch, []

        def serve(self, prompts, max_tokens, record=True):
            served.append((self.name, tuple(map(tuple, prompts)), max_tokens, record))

    a, b = FakeCell("a"), FakeCell("b")
    run_cells([a, b], [[1], [2], [3]], max_tokens=4, repeats=2, warmup_tokens=2)
    # First an unrecorded short warm-up of the first wave by every cell, then the ABBA waves.
    assert served[:2] == [("a", ((1,), (2,)), 2, False), ("b", ((1,), (2,)), 2, False)]
    served = served[2:]
    assert all(m == 4 and rec for _, _, m, rec in served)
    assert [n for n, *_ in served] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [w for _, w, *_ in served[::2]] == [((1,), (2,)), ((3,),), ((1,), (2,)), ((3,),)]
    a.wave_means, b.wave_means = [10.0, 10.0, 20.0], [5.0, 12.0, 30.0]
    median, ratios = paired_speedup(b, a)
    assert ratios == [0.5, 1.2, 1.5] and median == 1.2
    a.wave_decode_means, b.wave_decode_means = [10.0, 10.0, 10.0], [20.0, 30.0, 40.0]
    assert paired_speedup(b, a, decode=True) == (3.0, [2.0, 3.0, 4.0])


@pytest.mark.smoke
def test_bench_spec_quick(tmp_path, smollm2_dir):
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    from table import main  # experiments/table.py: the table experiment's short mode is this benchmark's quick mode

    # float32: in bf16 a verify of k+1 tokens and a 1-token decode round differently, and the adaptive
    # controller picks k from wall time, so near-tied argmaxes may flip between runs (see docs/RESULTS.md).
    r = main(["--short", "--draft", "random", "--threads", "1", "--dtype", "float32", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_spec.json").read_text())
    assert data["greedy_outputs_identical"] is True
    assert [(row["batch"], row["lookahead"]) for row in data["table"]] == [
        (1, None), (1, "control"), (1, 4), (1, "adaptive"), (4, None), (4, "control"), (4, 4), (4, "adaptive")]
    assert all(row["mean"] > 0 and row["p5"] <= row["p50"] <= row["p95"] for row in data["table"])
    assert all(row["decode_mean"] > row["mean"] and row["decode_speedup"] > 0 for row in data["table"])
    fixed = [row for row in data["table"] if row["lookahead"] == 4]
    assert all(3.0 <= row["mean_lookahead"] <= 4.0 for row in fixed)  # capped only near max_tokens
    adaptive = [row for row in data["table"] if row["lookahead"] == "adaptive"]
    assert all(0.0 <= row["mean_lookahead"] <= 4.0 for row in adaptive)
    assert (tmp_path / "bench_spec.png").stat().st_size > 0
    assert "| 4 | adaptive |" in (tmp_path / "results.md").read_text() and r["machine"]["cores"] >= 1
    assert r["capture"][0]["capture"] is False and r["capture"][1]["capture"] is True


@pytest.mark.smoke
def test_exclude_run_finds_exactly_the_prompts_a_run_served(tmp_path, smollm2_tokenizer):
    from aurora_rl.bench_spec import trained_prompts
    from aurora_rl.data.sharegpt import chat_token_ids, sample_prompts

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "seed: 3\nworkload:\n  source: sharegpt\n  phases:\n  - {domain: code, requests: 5}\n"
        "  max_prompt_tokens: 100000\n  held_out: 2\n")
    (run / "requests.jsonl").write_text("".join(json.dumps({"index": i}) + "\n" for i in (1, 0, 2)))
    got = trained_prompts(run, smollm2_tokenizer, 49152)
    order = [tuple(chat_token_ids(smollm2_tokenizer, p.messages)) for p in sample_prompts("code", 6, seed=3)]
    assert got == set(order[2:5])  # the first 2 are held out; 3 of the 5 requests were served
    # An experiment script's arm keeps its overrides instead of Hydra's folder: the same prompts.
    (run / ".hydra" / "config.yaml").unlink()
    (run / "overrides.txt").write_text("seed=3 workload=code workload.max_prompt_tokens=100000 workload.held_out=2 "
                                       "workload.phases=[{domain:code,requests:5}]\n")
    assert trained_prompts(run, smollm2_tokenizer, 49152) == set(order[2:5])
    (run / "requests.jsonl").unlink()
    with pytest.raises(SystemExit, match="requests.jsonl"):
        trained_prompts(run, smollm2_tokenizer, 49152)


@pytest.mark.unit
def test_markdown_table_gives_the_median_speedup_and_the_ratio_of_means():
    from aurora_rl.bench_spec import markdown_table

    row = {"batch": 1, "mean": 35.2, "p50": 30.0, "p5": 20.0, "p95": 60.0, "decode_mean": 54.2,
           "accept_length": 1.54, "mean_lookahead": 0.89}
    base = {**row, "lookahead": None, "speedup": 1.0, "speedup_of_means": 1.0, "decode_speedup": 1.0}
    spec = {**row, "lookahead": "adaptive+copy", "speedup": 1.11, "speedup_of_means": 1.17, "decode_speedup": 1.19}
    lines = markdown_table([base, spec]).splitlines()
    assert "| speedup | ratio of means |" in lines[0]
    assert lines[2].startswith("| 1 | none |") and "| 1.00x | 1.00x |" in lines[2]
    assert "| 1.11x | 1.17x | 54.2 | 1.19x | 1.54 | 0.89 |" in lines[3]
