"""Smoke run of the benchmark entry point on the embedded model (quick mode, into a temporary folder)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.smoke
def test_bench_quick_writes_every_section(tmp_path, capsys):
    from aurora_rl.bench import main

    main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {"config", "environment", "generate", "bandwidth"} <= results.keys()
    assert results["config"]["max_tokens"] == 8
    assert list(results["generate"]) == ["1", "2"]
    for batch, r in results["generate"].items():
        assert r["requests"] % int(batch) == 0 and r["requests"] >= 2
        for side in ("ours", "hf"):
            s = r[side]
            assert all(s[k] > 0 for k in ("mean", "p50", "p5", "p95", "throughput")), (batch, side, s)
            assert s["p5"] <= s["p50"] <= s["p95"]
        assert r["ratio_mean"] > 0 and 0 <= r["identical"] <= r["requests"]
        assert r["identical"] + len(r["mismatches"]) == r["requests"]
    if any(r["mismatches"] for r in results["generate"].values()):
        assert results["identity_fp32"]["checked"] >= 1
    det = results["deterministic"]
    assert list(det) == ["1", "2"]
    for batch, r in det.items():
        assert r["ratio"] > 0 and r["deterministic_tokens_per_s"] > 0
        assert r["deterministic_same_as_alone"] == r["requests"], (batch, r)  # what the mode promises
    b = results["bandwidth"]
    assert b["weight_bytes"] > 200e6 and b["copy_bandwidth_gb_s"] > 0
    assert b["bound_ms"] > 0 and b["decode_step_ms"] > 0 and b["fraction_of_bound"] > 0
    out = capsys.readouterr().out
    assert "transformers generate" in out and "of the bound" in out and "engine.deterministic vs default" in out
