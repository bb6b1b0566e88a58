"""Run metrics: TensorBoard scalars (serve/, spec/, learner/, system/), one JSON line per answered
request (``requests.jsonl``: what experiment analyses read), a PNG of the main curves, and the summary
figures (also written as JSON).

The x axis of serving curves is requests served; learner and system scalars use wall seconds since
the start of the run (``walltime`` is also recorded by TensorBoard itself).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

WINDOW = 16


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class RunLogger:
    def __init__(self, out_dir: str | Path, config_text: str) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.out / "tb"))
        self.writer.add_text("config", "```\n" + config_text + "\n```")
        self.t0 = time.time()
        self.requests: list[dict[str, Any]] = []
        self._requests_file = open(self.out / "requests.jsonl", "w", encoding="utf-8", buffering=1)
        self._last_depth: dict[str, float] = {}

    def elapsed(self) -> int:
        return int((time.time() - self.t0) * 1000)

    def request(self, r: dict[str, Any]) -> None:
        """One answered request: a line of ``requests.jsonl``; a finished one also goes to the curves."""
        self._requests_file.write(json.dumps(r, default=str) + "\n")
        if r.get("status") != "finished":
            return
        self.requests.append(r)
        n = len(self.requests)
        w = self.requests[-WINDOW:]
        self.writer.add_scalar("serve/accept_length", r["accept_length"], n)
        self.writer.add_scalar("serve/tokens_per_s", r["tokens_per_s"], n)
        self.writer.add_scalar("serve/accept_length_window", _mean([x["accept_length"] for x in w]), n)
        self.writer.add_scalar("serve/tokens_per_s_window", _mean([x["tokens_per_s"] for x in w]), n)
        self.writer.add_scalar("serve/policy_version", r["policy_version"], n)

    def scalars(self, values: dict[str, float], prefix: str = "") -> None:
        step = self.elapsed()
        for k, v in values.items():
            if k == "t" or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            name = k if not prefix or k.startswith(prefix) else prefix + k
            self.writer.add_scalar(name, v, step)

    def depth_acceptance(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-depth acceptance rate since the last call, from cumulative worker counters."""
        out = {}
        for key, total in stats.items():
            if not key.startswith("spec/proposed_depth_"):
                continue
            j = key.rsplit("_", 1)[1]
            acc_key = f"spec/accepted_depth_{j}"
            dp = total - self._last_depth.get(key, 0.0)
            da = stats.get(acc_key, 0.0) - self._last_depth.get(acc_key, 0.0)
            if dp > 0:
                out[f"spec/accept_rate_depth_{j}"] = da / dp
            self._last_depth[key], self._last_depth[acc_key] = total, stats.get(acc_key, 0.0)
        self.scalars(out)
        return out

    def window(self, which: str) -> dict[str, float]:
        rs = self.requests[:WINDOW] if which == "start" else self.requests[-WINDOW:]
        return {"accept_length": _mean([r["accept_length"] for r in rs]),
                "tokens_per_s": _mean([r["tokens_per_s"] for r in rs]), "requests": len(rs)}

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = list(range(1, len(self.requests) + 1))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, label in ((axes[0], "accept_length", "accept length (tokens per verify step)"),
                               (axes[1], "tokens_per_s", "tokens/s per request")):
            ys = [r[key] for r in self.requests]
            ax.plot(n, ys, ".", alpha=0.35, label="per request")
            smooth = [_mean(ys[max(0, i - WINDOW + 1): i + 1]) for i in range(len(ys))]
            ax.plot(n, smooth, "-", lw=2, label=f"moving mean ({WINDOW})")
            ax.set_xlabel("requests served")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.out / "summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str))
        for k, v in _flatten(summary).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"summary/{k}", v, 0)
        return path

    def close(self) -> None:
        self._requests_file.close()
        self.writer.flush()
        self.writer.close()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The printed summary: start vs end of the online phase, and the held-out evaluation."""
    s, e, ev = summary["start"], summary["end"], summary.get("eval") or {}
    rows = [("requests served", f"{summary['requests_served']}"),
            ("draft versions published", f"{summary['final_policy_version']}"),
            ("accept length, first window", f"{s['accept_length']:.2f}"),
            ("accept length, last window", f"{e['accept_length']:.2f}"),
            ("tokens/s per request, first window", f"{s['tokens_per_s']:.1f}"),
            ("tokens/s per request, last window", f"{e['tokens_per_s']:.1f}")]
    if ev:
        rows += [("held-out accept length (final draft)", f"{ev['accept_length']:.2f}"),
                 ("held-out tokens/s, final draft", f"{ev['spec_tokens_per_s']:.1f}")]
        if ev.get("speedup") is not None:  # None: an SGLang replica has no run without speculation
            rows += [("held-out tokens/s, no speculation", f"{ev['plain_tokens_per_s']:.1f}"),
                     ("speedup over no speculation", f"{ev['speedup']:.2f}x")]
        if ev.get("adaptive_speedup") is not None:
            rows += [("held-out accept length, adaptive lookahead", f"{ev['adaptive_accept_length']:.2f}"),
                     ("speedup over no speculation, adaptive", f"{ev['adaptive_speedup']:.2f}x")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
