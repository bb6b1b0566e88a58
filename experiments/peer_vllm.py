"""Peer table: our engine against vLLM CPU, each with and without EAGLE3 speculation, batch 1/4/8.

Same target weights (the embedded SmolLM2-135M folder), same draft (an EAGLE3 folder, by default the
newest one ``make demo`` exported), same prompts (held-out ShareGPT prompts of ``--domain``), greedy,
``--max-tokens`` tokens per request with EOS ignored, in one run. Each batch size serves the same waves
of ``batch`` prompts through all four cells, in ABBA order per wave, so a slow spell of the shared
machine hits all cells alike; the table gives aggregate tokens/s (output tokens / wall time of the
waves) and each cell's ratio to our engine without speculation at the same batch, plus accept length
(tokens per verify step after the first token; vLLM's counted by our backend's step loop). Our engine
runs with copies off and a fixed lookahead, so both speculate the same way.

    python experiments/peer_vllm.py [--dtype bfloat16] [--prompts 8] [--max-tokens 64] [--batches 1,4,8]

Writes ``experiments/results/peer_vllm/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aurora_rl.vllm_engine.backend import VLLMBackend, configure_environment  # noqa: E402


class OursCell:
    def __init__(self, target, draft, batch: int, lookahead: int) -> None:
        from aurora_rl.engine import EngineConfig, LLMEngine
        from aurora_rl.engine.speculative import SpecConfig, SpecDecoder

        self.name = f"ours, {'k=%d' % lookahead if lookahead else 'no spec'}"
        dec = SpecDecoder(draft, batch, 2048, SpecConfig(lookahead=lookahead, capture_traces=False,
                                                         context_copy=False)) if lookahead else None
        self.engine = LLMEngine(target, EngineConfig(num_slots=batch, max_len=2048), None, dec)
        self.tokens, self.wall, self.steps, self.verify_tokens = 0, 0.0, 0, 0

    def serve(self, wave: list[list[int]], max_tokens: int, record: bool = True) -> None:
        from aurora_rl.engine import SamplingParams

        t0 = time.perf_counter()
        outs = self.engine.generate(wave, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        if record:
            self.wall += time.perf_counter() - t0
            self.tokens += sum(o.num_output_tokens for o in outs)
            if self.engine.decoder is not None and self.name != "ours, no spec":
                self.steps += sum(o.verify_steps for o in outs)
                self.verify_tokens += sum(o.num_output_tokens - 1 for o in outs)


class VLLMCell:
    def __init__(self, backend: VLLMBackend, name: str) -> None:
        self.backend, self.name = backend, name
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.tokens, self.wall, self.steps, self.verify_tokens = 0, 0.0, 0, 0

    def serve(self, wave: list[list[int]], max_tokens: int, record: bool = True) -> None:
        sp = self.backend.sampling({"max_tokens": max_tokens, "ignore_eos": True})
        t0 = time.perf_counter()
        outs = list(self.pool.map(lambda a: self.backend.generate(f"w{time.monotonic_ns()}-{a[0]}", a[1], sp),
                                  enumerate(wave)))
        if record:
            self.wall += time.perf_counter() - t0
            self.tokens += sum(len(o.output_ids) for o in outs)
            if self.backend.lookahead:  # without a draft every step is a plain decode step
                self.steps += sum(o.verify_steps for o in outs)
                self.verify_tokens += sum(len(o.output_ids) - 1 for o in outs)


def load(args):
    import torch
    from transformers import AutoTokenizer

    from aurora_rl.assets import ensure_smollm2
    from aurora_rl.data.sharegpt import chat_token_ids, domain_counts, sample_prompts
    from aurora_rl.models.eagle3_io import load_eagle3
    from aurora_rl.models.loader import load_target

    folder = ensure_smollm2()
    dtype = getattr(torch, args.dtype)
    target = load_target(folder, dtype)
    tok = AutoTokenizer.from_pretrained(str(folder))
    found = sorted(ROOT.glob("outputs/day0/*/draft"))
    if not args.draft and not found:
        raise SystemExit(f"no --draft given and no {ROOT}/outputs/day0/*/draft (run `make demo` first)")
    draft_dir = Path(args.draft) if args.draft else found[-1]
    draft = load_eagle3(draft_dir, target_embedding=target.embed.weight.detach().float()).to_dtype(dtype).eval()
    prompts = []
    for p in sample_prompts(args.domain, domain_counts()[args.domain], seed=args.seed):
        ids = chat_token_ids(tok, p.messages)
        if len(ids) <= 512:
            prompts.append(ids)
        if len(prompts) == args.prompts:
            break
    return folder, target, draft_dir, draft, prompts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--draft", default=None, help="EAGLE3 folder (default: the newest outputs/day0/*/draft)")
    p.add_argument("--domain", default="code")
    p.add_argument("--seed", type=int, default=7, help="prompt sample seed (day0 trains on seed 0's order)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "peer_vllm"))
    args = p.parse_args(argv)
    configure_environment(2.0, args.threads)
    import torch

    torch.set_num_threads(args.threads)
    folder, target, draft_dir, draft, prompts = load(args)
    batches = [int(b) for b in args.batches.split(",")]
    common = {"model": str(folder), "dtype": args.dtype, "max_num_seqs": max(batches), "max_model_len": 2048,
              "seed": 0, "enforce_eager": True}
    t0 = time.perf_counter()
    plain = VLLMBackend(dict(common), None)
    plain.start()
    spec = VLLMBackend({**common, "speculative_config": {"method": "eagle3", "model": str(draft_dir),
                                                         "num_speculative_tokens": args.lookahead}}, draft_dir)
    spec.start()
    start_s = time.perf_counter() - t0
    rows = []
    for batch in batches:
        cells = [OursCell(target, draft, batch, 0), OursCell(target, draft, batch, args.lookahead),
                 VLLMCell(plain, "vLLM, no spec"), VLLMCell(spec, f"vLLM, k={args.lookahead}")]
        waves = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        for cell in cells:  # first touch of new shapes, unrecorded
            cell.serve(waves[0], 4, record=False)
        for w, wave in enumerate(waves):
            for cell in cells if w % 2 == 0 else cells[::-1]:
                cell.serve(wave, args.max_tokens)
        base = cells[0].tokens / cells[0].wall
        for cell in cells:
            tps = cell.tokens / cell.wall
            rows.append({"batch": batch, "cell": cell.name, "tokens_per_s": tps, "ratio_to_ours_plain": tps / base,
                         "accept_length": cell.verify_tokens / cell.steps if cell.steps else None,
                         "requests": len(prompts)})
            print(f"batch {batch}  {cell.name:16s} {tps:7.1f} tok/s  {tps / base:5.2f}x  "
                  f"accept {rows[-1]['accept_length']}", flush=True)
    result = {"rows": rows, "args": vars(args), "draft": str(draft_dir), "vllm_start_s": start_s,
              "cpu": cpu_name()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    plain.close()
    spec.close()
    return result


def markdown(rows: list[dict], args) -> str:
    lines = [f"dtype {args.dtype}, {args.prompts} prompts x {args.max_tokens} tokens, lookahead {args.lookahead}", "",
             "| batch | engine | tokens/s | vs ours, no spec | accept length |", "|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accept_length']:.2f}" if r["accept_length"] is not None else "-"
        lines.append(f"| {r['batch']} | {r['cell']} | {r['tokens_per_s']:.1f} | {r['ratio_to_ours_plain']:.2f}x | {acc} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
