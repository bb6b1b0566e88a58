"""Benchmarks on the embedded model, our engine against transformers ``generate`` in one run.

Sections (one function each; more sections, e.g. speculative decoding, plug in the same way):
- ``generate_section``: for each batch size, the same ShareGPT prompts (chat template applied) through
  our engine and through transformers ``generate`` in the same dtype: greedy, a fixed number of new
  tokens, EOS ignored on both sides (HF gets ``eos_token_id=None``: it neither stops nor masks EOS),
  left padding for HF batches. Chunks of one batch alternate between the two sides so both see the
  same machine load. Per-request tokens/s (new tokens over the request's time from the start of its
  batch or slot admission to its last token): mean, p50, p5, p95, the ratio, and how many requests
  produced identical greedy tokens. A differing request is reported with the first position where the
  two differ and HF's logit gap between the two tokens there, from one full forward over the prompt and
  HF's tokens (a gap within bf16 resolution, ~0.1, is a near-tie that rounding can flip either way).
- ``identity_fp32_section``: the requests that differed, again in float32 on both sides, one at a time.
- ``deterministic_section`` (``aurora_rl.bench_deterministic``): the cost of ``engine.deterministic``
  beside the default mode at each batch size, and how many greedy answers equal batch 1 in each mode.
- ``bandwidth_section``: the memory-bandwidth bound of a batch-1 decode step, bytes of weights read per
  step (the tied embedding / lm_head once) over the copy bandwidth measured in this run
  (``copy_bandwidth``: read + written bytes per second of a large tensor copy), and our fraction of it.

``python -m aurora_rl.bench [--quick]`` prints a table and writes ``bench.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.runner import ModelRunner
from aurora_rl.models.dtypes import DTYPES, resolve_dtype
from aurora_rl.models.loader import load_target
from aurora_rl.models.target import TargetModel

log = logging.getLogger(__name__)

ENGINE_DEFAULT_DTYPE = "auto"
"""What a run's ``model.dtype`` defaults to: bfloat16 where the CPU computes it natively, else float32."""


@dataclass
class BenchConfig:
    """What one benchmark run measures."""

    dtype: str = ENGINE_DEFAULT_DTYPE
    """Model dtype on both sides."""
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    """Concurrent requests (engine slots / HF batch rows)."""
    max_tokens: int = 64
    """New tokens per request (EOS ignored)."""
    requests: int = 16
    """Requests per batch size (rounded up to a multiple of it); the same prompts for every size."""
    domain: str = "all"
    """ShareGPT domain of the prompts."""
    seed: int = 0
    """Prompt sample seed."""
    threads: int = 0
    """Torch threads (0 = the cores this process may use)."""
    decode_steps: int = 32
    """Timed decode steps for the bandwidth section."""


@dataclass
class Side:
    """One system's results for one batch size."""

    tokens_per_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0

    def stats(self) -> dict:
        v = np.asarray(self.tokens_per_s)
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p5": float(np.percentile(v, 5)),
                "p95": float(np.percentile(v, 95)),
                "throughput": sum(len(o) for o in self.outputs) / max(self.seconds, 1e-9)}


# ---- setup ----------------------------------------------------------------------------------------

def load_prompts(tokenizer, cfg: BenchConfig, n: int) -> list[list[int]]:
    """Token ids of ``n`` ShareGPT prompts under the chat template (generation prompt added)."""
    from aurora_rl.data.sharegpt import chat_token_ids, sample_prompts

    return [chat_token_ids(tokenizer, p.messages) for p in sample_prompts(cfg.domain, n, cfg.seed)]


def load_hf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


# ---- sections -------------------------------------------------------------------------------------

def copy_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Best copy bandwidth in GB/s of a large tensor, counting the bytes read and the bytes written."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best / 1e9


def _run_ours(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, side: Side) -> None:
    t = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    side.seconds += time.perf_counter() - t
    side.tokens_per_s += [o.tokens_per_s for o in outs]
    side.outputs += [o.output_ids for o in outs]


def _run_hf(hf, tokenizer, prompts: list[list[int]], max_tokens: int, side: Side) -> None:
    enc = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(**enc, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=tokenizer.pad_token_id)
    dt = time.perf_counter() - t
    side.seconds += dt
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    assert all(len(o) == max_tokens for o in new), "HF stopped early: EOS was not ignored"
    side.tokens_per_s += [max_tokens / dt] * len(prompts)
    side.outputs += new


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def logit_gap(hf, prompt: list[int], hf_tokens: list[int], pos: int, our_token: int) -> float:
    """HF's logit of its own token minus its logit of ours at the first differing position."""
    ids = torch.tensor([prompt + hf_tokens[:pos]])
    with torch.inference_mode():
        logits = hf(ids).logits[0, -1].float()
    return float(logits[hf_tokens[pos]] - logits[our_token])


def generate_section(model: TargetModel, hf, tokenizer, prompts: list[list[int]], cfg: BenchConfig) -> dict:
    """Per batch size: tokens/s of both sides, the ratio, and greedy identity per request."""
    results = {}
    max_len = max(len(p) for p in prompts) + cfg.max_tokens + 1
    for batch in cfg.batch_sizes:
        n = -(-cfg.requests // batch) * batch
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        engine = LLMEngine(model, EngineConfig(num_slots=batch, max_len=max_len))
        engine.generate([chosen[0]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        _run_hf(hf, tokenizer, [chosen[0]], 2, Side())
        ours, theirs = Side(), Side()
        for start in tqdm(range(0, n, batch), desc=f"batch {batch}", unit="batch", leave=False):
            chunk = chosen[start:start + batch]
            _run_ours(engine, chunk, cfg.max_tokens, ours)
            _run_hf(hf, tokenizer, chunk, cfg.max_tokens, theirs)
        mismatches = []
        for i, (a, b) in enumerate(zip(ours.outputs, theirs.outputs)):
            pos = _first_difference(a, b)
            if pos is not None:
                gap = logit_gap(hf, chosen[i], b, pos, a[pos]) if pos < min(len(a), len(b)) else None
                mismatches.append({"request": i, "prompt": i % len(prompts), "position": pos, "ours": a[pos],
                                   "hf": b[pos], "hf_logit_gap": gap})
        ours_s, hf_s = ours.stats(), theirs.stats()
        results[str(batch)] = {
            "requests": n, "ours": ours_s, "hf": hf_s,
            "ratio_mean": ours_s["mean"] / hf_s["mean"], "ratio_p50": ours_s["p50"] / hf_s["p50"],
            "ratio_throughput": ours_s["throughput"] / hf_s["throughput"],
            "identical": n - len(mismatches), "mismatches": mismatches,
        }
    return results


def identity_fp32_section(path: Path, tokenizer, prompts: list[list[int]], prompt_ids: list[int],
                          max_tokens: int) -> dict:
    """The given prompts again in float32, batch 1 on both sides: are the greedy tokens identical?"""
    model, hf = load_target(path, torch.float32), load_hf(path, torch.float32)
    engine = LLMEngine(model, EngineConfig(num_slots=1, max_len=max(len(p) for p in prompts) + max_tokens + 1))
    details = []
    for i in tqdm(prompt_ids, desc="fp32 identity", unit="prompt", leave=False):
        ours, theirs = Side(), Side()
        _run_ours(engine, [prompts[i]], max_tokens, ours)
        _run_hf(hf, tokenizer, [prompts[i]], max_tokens, theirs)
        pos = _first_difference(ours.outputs[0], theirs.outputs[0])
        details.append({"prompt": i, "identical": pos is None, "position": pos})
    return {"checked": len(prompt_ids), "identical": sum(d["identical"] for d in details), "prompts": details}


def decode_step_ms(model: TargetModel, prompt: list[int], steps: int) -> tuple[float, float]:
    """Median and fastest time (ms) of one batch-1 decode step (one token through ``ModelRunner.extend``)."""
    runner = ModelRunner(model, 1, len(prompt) + steps + 8)
    runner.extend([0], [prompt], last_only=True)
    times = []
    for _ in range(steps + 3):
        t = time.perf_counter()
        runner.extend([0], [[prompt[-1]]], last_only=True)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[3:]), 1e3 * min(times[3:])


def bandwidth_section(model: TargetModel, prompt: list[int], steps: int) -> dict:
    """Bytes of weights a batch-1 step reads over the copy bandwidth, against our measured step."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    bandwidth = copy_bandwidth()
    step_ms, fastest_ms = decode_step_ms(model, prompt, steps)
    bound_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    return {"weight_bytes": weight_bytes, "copy_bandwidth_gb_s": bandwidth, "bound_ms": bound_ms,
            "decode_step_ms": step_ms, "decode_step_fastest_ms": fastest_ms, "fraction_of_bound": bound_ms / step_ms,
            "effective_gb_s": weight_bytes / step_ms / 1e6}


# ---- command line ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path]:
    p = argparse.ArgumentParser(prog="python -m aurora_rl.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default=ENGINE_DEFAULT_DTYPE, choices=["auto", *sorted(DTYPES)])
    p.add_argument("--batch-sizes", default="1,4,8,16", help="comma separated, e.g. 1,4,8,16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=16, help="requests per batch size")
    p.add_argument("--domain", default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores this process may use)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 requests, batch 1 and 2, 8 tokens")
    p.add_argument("--out", type=Path, default=None, help="output folder (default outputs/bench/<timestamp>)")
    a = p.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in a.batch_sizes.split(",") if s.strip())
    except ValueError:
        p.error(f"--batch-sizes must be comma separated integers, got {a.batch_sizes!r}")
    if not sizes or min(sizes) < 1:
        p.error(f"--batch-sizes must be positive integers, got {a.batch_sizes!r}")
    for name in ("max_tokens", "requests"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    cfg = BenchConfig(dtype=a.dtype, batch_sizes=sizes, max_tokens=a.max_tokens, requests=a.requests,
                      domain=a.domain, seed=a.seed, threads=a.threads)
    if a.quick:
        cfg.batch_sizes, cfg.max_tokens, cfg.requests, cfg.decode_steps = (1, 2), 8, 2, 4
    out = a.out or Path("outputs") / "bench" / time.strftime("%Y%m%d-%H%M%S")
    return cfg, out


def run(cfg: BenchConfig) -> dict:
    """All sections; returns the results that go to ``bench.json``."""
    from transformers import AutoTokenizer

    from aurora_rl.assets import ensure_smollm2

    threads = cfg.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    path = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    dtype = resolve_dtype(cfg.dtype)
    prompts = load_prompts(tokenizer, cfg, cfg.requests)
    model, hf = load_target(path, dtype), load_hf(path, dtype)
    results = {"config": asdict(cfg), "environment": {
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": {"mean": statistics.mean(map(len, prompts)), "max": max(map(len, prompts))}}}
    results["generate"] = generate_section(model, hf, tokenizer, prompts, cfg)
    differing = sorted({m["prompt"] for r in results["generate"].values() for m in r["mismatches"]})
    if differing and dtype != torch.float32:
        del model, hf
        results["identity_fp32"] = identity_fp32_section(path, tokenizer, prompts, differing, cfg.max_tokens)
        model = load_target(path, dtype)
    from aurora_rl.bench_deterministic import deterministic_section

    results["deterministic"] = deterministic_section(model, prompts, cfg.batch_sizes, cfg.max_tokens)
    results["bandwidth"] = bandwidth_section(model, prompts[0], cfg.decode_steps)
    return results


def format_table(results: dict) -> str:
    cfg, gen = results["config"], results["generate"]
    lines = [f"SmolLM2-135M-Instruct, {cfg['dtype']}, {cfg['max_tokens']} new tokens per request, "
             f"{results['environment']['threads']} threads; per-request tokens/s (mean / p50 / p5 / p95)",
             f"{'batch':>5} {'reqs':>4} | {'ours':^27} | {'transformers generate':^27} | {'ratio':>5} {'p50':>5} "
             f"{'thru':>5} | identical"]
    for batch, r in gen.items():
        o, h = r["ours"], r["hf"]
        lines.append(f"{batch:>5} {r['requests']:>4} | {o['mean']:6.1f} {o['p50']:6.1f} {o['p5']:6.1f} {o['p95']:6.1f} "
                     f"| {h['mean']:6.1f} {h['p50']:6.1f} {h['p5']:6.1f} {h['p95']:6.1f} | {r['ratio_mean']:5.2f} "
                     f"{r['ratio_p50']:5.2f} {r['ratio_throughput']:5.2f} | {r['identical']}/{r['requests']}")
    for batch, r in gen.items():
        for m in r["mismatches"]:
            gap = "n/a" if m["hf_logit_gap"] is None else f"{m['hf_logit_gap']:.3f}"
            lines.append(f"  differs: batch {batch} request {m['request']} (prompt {m['prompt']}) from token "
                         f"{m['position']}: ours {m['ours']} vs HF {m['hf']}, HF logit gap {gap}")
    if "identity_fp32" in results:
        f = results["identity_fp32"]
        lines.append(f"  float32 re-check of the differing prompts: {f['identical']}/{f['checked']} identical")
    if "deterministic" in results:
        from aurora_rl.bench_deterministic import format_rows

        lines += format_rows(results["deterministic"])
    b = results["bandwidth"]
    lines.append(f"batch-1 decode step {b['decode_step_ms']:.2f} ms (median; fastest {b['decode_step_fastest_ms']:.2f})"
                 f"; bound {b['bound_ms']:.2f} ms = {b['weight_bytes'] / 1e6:.0f} MB of weights / "
                 f"{b['copy_bandwidth_gb_s']:.1f} GB/s copy bandwidth; {100 * b['fraction_of_bound']:.0f}% of the "
                 f"bound ({b['effective_gb_s']:.1f} GB/s effective)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg, out = parse_args(argv)
    results = run(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
