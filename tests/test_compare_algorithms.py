"""Smoke run of experiments/compare_algorithms.py --quick on the tiny random model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "compare_algorithms.py"
ALGORITHMS = ("aurora", "eagle3_kl", "osd", "frozen")


def load_script():
    # experiments/ is not a package: load the script as a module (in-process: no second interpreter
    # re-importing torch, which dominates a seconds-long run).
    spec = importlib.util.spec_from_file_location("compare_algorithms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.smoke
def test_compare_algorithms_quick(tmp_path):
    out = tmp_path / "cmp"
    returned = load_script().main(["--quick", "--out", str(out)])
    summary = json.loads((out / "results.json").read_text())
    assert summary["complete"] and set(returned["results"]) == set(summary["results"])
    results = summary["results"]
    for name in ALGORITHMS:
        assert name in results, f"{name} missing from {sorted(results)}"
        e = results[name]["eval"]
        assert math.isfinite(e["accept_length"]) and e["accept_length"] >= 1.0, (name, e["accept_length"])
        assert results[name]["updates"] == summary["settings"]["updates"] > 0
        assert len(e["depth_acceptance"]) == summary["settings"]["lookahead"]
        # Greedy speculation is lossless: every draft yields the same tokens.
        assert e["identical_outputs_to_start"] == e["prompts"]
    # Frozen never changes the draft, so it speculates exactly like the untrained start draft.
    assert results["frozen"]["eval"]["accept_length"] == results["start"]["eval"]["accept_length"]
    assert results["frozen"]["eval"]["depth_accepted"] == results["start"]["eval"]["depth_accepted"]
    # Identical data for every algorithm.
    assert summary["data"]["train_traces"] == 8
    assert (out / "results.md").read_text().count("| frozen |") == 1
    assert (out / "accept_length.png").stat().st_size > 0
