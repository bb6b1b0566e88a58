"""``aurora-rl experiment=day0 engine=vllm`` end to end, short: real vLLM serves in the rollout worker
(a Ray actor) with our day-0 draft, our learner trains on the recomputed traces, and vLLM's draft
follows the versions the learner publishes (hot swap through vLLM's weight loader).

Run as a user runs it, one command in a fresh interpreter (vLLM and Ray stay out of this process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.smoke


def test_day0_with_engine_vllm_serves_learns_and_swaps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["experiment=day0", "engine=vllm", "time_budget_s=25", "workload.max_tokens=32",
                 "workload.held_out=2", "eval.max_tokens=16", "engine.max_len=1024", "progress=false",
                 "learner.checkpoint_every=0", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "aurora_rl.cli", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests_served"] >= 4 and summary["counters"]["errors"] == 0
    assert summary["final_policy_version"] >= 1 and summary["eval"]["prompts"] == 2
    requests = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert all(r["source"] == "vllm" and r["status"] == "finished" for r in requests)
    assert all(r["verify_steps"] >= 1 for r in requests)  # vLLM speculated (with our draft)
    # vLLM's draft followed the learner: later requests were served by published versions
    assert max(r["policy_version"] for r in requests) >= 1
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    swaps = [e.value for e in acc.Scalars("system/swaps")]
    failures = [e.value for e in acc.Scalars("system/swap_failures")]
    assert swaps[-1] >= 1 and failures[-1] == 0
    assert (tmp_path / "vllm" / "worker0" / "draft-v000000" / "config.json").exists()
