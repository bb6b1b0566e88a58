"""Shared by the experiment scripts: run one arm of an experiment, read what it logged, smooth curves.

An arm is one ordinary ``aurora-rl`` run (the same Hydra config tree and overrides a user would type),
run in this process so that a short mode costs one interpreter start, into ``<out>/<arm>/``. What the
analysis reads is what every run writes: ``requests.jsonl`` (one record per finished request, with its
traffic index and domain) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("experiments")


def median_ms(fn, n: int = 15) -> float:
    """Median wall time of ``n`` calls of ``fn``, in milliseconds (the microbenchmarks' timer)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compose(overrides: list[str], output_dir: Path):
    """The validated RunConfig for ``overrides``, exactly as ``aurora-rl <overrides>`` would compose it."""
    from aurora_rl.cli import compose as compose_run_config

    return compose_run_config(overrides, output_dir)


def run_arm(name: str, overrides: list[str], out: Path, reuse: bool = False) -> dict[str, Any]:
    """Run one arm into ``out/name`` (or reuse a finished one); returns its summary."""
    from aurora_rl.runtime.driver import run

    arm_dir = out / name
    done = arm_dir / "summary.json"
    if reuse and done.is_file() and (arm_dir / "requests.jsonl").is_file():
        say(f"{name}: reusing {arm_dir}")
        return json.loads(done.read_text())
    cfg = compose(overrides, arm_dir)
    arm_dir.mkdir(parents=True, exist_ok=True)
    (arm_dir / "overrides.txt").write_text(" ".join(overrides) + "\n")
    say(f"{name}: aurora-rl {' '.join(overrides)}")
    t0 = time.perf_counter()
    summary = run(cfg)
    say(f"{name}: {summary['requests_served']} requests, {summary['learner_steps']} learner steps in "
        f"{time.perf_counter() - t0:.0f}s")
    return summary


def load_requests(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """(finished requests of a run in the order they finished, how many others were answered: errors
    and aborts, which have no accept length and are reported as a count)."""
    path = run_dir / "requests.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: was {run_dir} written by an aurora-rl run?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    finished = [r for r in records if r.get("status") == "finished"]
    return finished, len(records) - len(finished)


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def rolling(xs: list[float], window: int) -> list[float]:
    return [mean(xs[max(0, i - window + 1): i + 1]) for i in range(len(xs))]


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def write_result(out: str | Path | None, name: str, result: Any, table: str) -> None:
    """An experiment's figures as ``<out>/<name>.json`` and its table as ``<out>/<name>.md`` (no-op without ``out``)."""
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(table + "\n")


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    pyplot().close(fig)
