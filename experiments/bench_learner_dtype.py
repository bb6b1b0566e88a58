"""Learner updates per second in float32 and in bf16 autocast, side by side on this machine.

Two learners from the same day-0 draft take turns on the same batches of recorded traces
(``record_objective_traces.py``), one update each per round, so load from other processes falls on
both alike; the first round is a warm-up and is not timed. Prints the CPU, whether it computes bf16
natively, what ``learner.dtype=auto`` picks here, both rates and their ratio.

    python experiments/bench_learner_dtype.py --traces experiments/results/objective_s9/traces
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record_objective_traces import day0  # noqa: E402

from aurora_rl.models.dtypes import cpu_has_native_bf16, resolve_dtype  # noqa: E402
from aurora_rl.training.learner import Learner, LearnerConfig  # noqa: E402
from aurora_rl.training.offline import batch_schedule  # noqa: E402
from aurora_rl.training.trace_io import load_traces  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", required=True)
    ap.add_argument("--set", default="greedy", choices=("greedy", "sampled"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch-traces", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ray.rllib.algorithms.impala.torch.vtrace_torch_v2  # noqa: F401  (imported before timing)
    rec = argparse.Namespace(**json.loads((Path(args.traces) / "key.json").read_text()))
    _, head, draft0, _ = day0(rec)
    train = load_traces(Path(args.traces) / args.set / "train.safetensors")
    learners = {dt: Learner(draft0, head, LearnerConfig(depth=4, prompt_bases=32, lr=3e-3, dtype=dt))
                for dt in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {dt: [] for dt in learners}
    for i, batch in enumerate(batch_schedule(len(train), args.rounds + 1, args.batch_traces, 0)):
        traces = [train[j] for j in batch]
        for dt, learner in learners.items():
            t0 = time.perf_counter()
            learner.update(traces)
            if i:
                times[dt].append(time.perf_counter() - t0)
    auto = str(resolve_dtype("auto")).removeprefix("torch.")
    print(f"CPU: {cpu_name()}; native bf16: {cpu_has_native_bf16()}; learner.dtype=auto -> {auto}; "
          f"{args.threads} thread(s), {args.batch_traces} traces per update, {args.rounds} timed rounds")
    rate = {dt: 1.0 / statistics.median(ts) for dt, ts in times.items()}
    print("| learner dtype | updates/s (median round) | s per update, each round |")
    print("|---|---:|---|")
    for dt, ts in times.items():
        print(f"| {dt} | {rate[dt]:.3f} | {' '.join(f'{t:.2f}' for t in ts)} |")
    print(f"bf16 autocast / float32 updates per second: {rate['bfloat16'] / rate['float32']:.2f}x")


if __name__ == "__main__":
    main()
