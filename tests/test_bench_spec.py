"""The speculation benchmark runs end to end in quick mode and writes its table as JSON."""

from __future__ import annotations

import json

import pytest


@pytest.mark.smoke
def test_bench_spec_quick(tmp_path, smollm2_dir):
    from aurora_rl.bench_spec import main

    r = main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_spec.json").read_text())
    assert data["greedy_outputs_identical"] is True
    assert [(row["batch"], row["lookahead"]) for row in data["table"]] == [(1, None), (1, 4), (4, None), (4, 4)]
    assert all(row["mean"] > 0 and row["p5"] <= row["p50"] <= row["p95"] for row in data["table"])
    assert r["capture"][0]["capture"] is False and r["capture"][1]["capture"] is True
