"""Quantized-target benchmark: our engine per weight format against llama.cpp on the shipped GGUF, the
speculation speedup per format, and each format's perplexity on held-out ShareGPT text, in one run.

- Formats: ``bfloat16`` (the GGUF's values in float, as ``model.quant=none`` serves them), ``q8_0``
  (the q4_1 values requantized), ``q4_1`` (the shipped file's blocks as stored, ``model.quant=auto``).
- Peer: llama.cpp through ``llama-cpp-python`` (the ``bench`` extra) on the same file, same prompt token
  ids, greedy, EOS ignored, ``--threads`` threads, at every batch size: a wave is one llama.cpp batch of
  sequences (``bench_llamacpp``). Without the package the peer rows are left out, and said so.
- Every configuration serves the same waves of prompts, ABBA-interleaved (``bench_spec.run_cells``); the
  ratios are medians over waves of paired ratios of mean tokens/s, so a shared machine's slow spells hit
  all alike. "decode" rates count the tokens after the first over the time after it.
- Speculation: per format, a plain engine and one speculating as ``--spec`` says (a ``bench_spec``
  lookahead item; default ``adaptive+copy``, the serving default: the adaptive controller picks k per
  step, copies from the context where it repeats, the draft elsewhere) over ``--draft`` (default: the draft ``make demo`` trained, else
  a day-0 random one), on ShareGPT ``--domain`` prompts (default code, the traffic that draft learned
  from; prompts its run served are left out). The controller times its own steps, so it prices each
  format's verify passes itself.
- Perplexity: per format, next-token NLL over the first ``--ppl-tokens`` tokens of ``--ppl-texts``
  ShareGPT conversations from the end of the file (never sampled as prompts by the demo's workload).

``python -m aurora_rl.bench_quant [--quick]``; figures go to ``--out``/bench_quant.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from aurora_rl.bench_llamacpp import LlamaCppCell, LlamaCppModel
from aurora_rl.bench_spec import Cell, paired_speedup, parse_lookaheads, run_cells, trained_prompts

log = logging.getLogger(__name__)

FORMATS = {"bfloat16": "none", "q8_0": "q8_0", "q4_1": "auto"}
"""Row label -> ``model.quant`` on the shipped GGUF."""


def load_models(gguf: Path) -> dict:
    from aurora_rl.models.gguf_weights import load_gguf_target

    return {label: load_gguf_target(gguf, torch.bfloat16, quant).eval() for label, quant in FORMATS.items()}


def load_draft(path: str | None, target, vocab_sample: list[list[int]]):
    from aurora_rl.config import ModelSection
    from aurora_rl.runtime.factory import initial_draft

    section = ModelSection(draft=path or "random", draft_vocab_size=4096)
    return initial_draft(section, target, vocab_sample).to_dtype(torch.bfloat16).eval()


def default_draft() -> str | None:
    """The newest draft ``make demo`` wrote (``outputs/day0/*/draft``), if any."""
    runs = sorted(Path("outputs/day0").glob("*/draft/config.json"))
    return str(runs[-1].parent) if runs else None


def prompts_and_texts(tokenizer, n_prompts: int, n_texts: int, seed: int, domain: str = "chat",
                      seen: set[tuple[int, ...]] = frozenset()) -> tuple[list, list, list]:
    """ShareGPT ``domain`` prompts (template applied, none of ``seen``), a vocabulary sample for a day-0
    draft, and held-out texts."""
    from aurora_rl.data.sharegpt import chat_token_ids, domain_counts, load_conversations, sample_prompts

    ids = []
    for p in sample_prompts(domain, domain_counts()[domain], seed=seed):
        i = chat_token_ids(tokenizer, p.messages)
        if len(i) <= 768 and tuple(i) not in seen:
            ids.append(i)
        if len(ids) == n_prompts + 32:
            break
    raw = load_conversations()
    texts = []
    for conv in reversed(raw):  # the file's tail: held out from the prompts taken above (sampled by seed)
        turns = [t.get("value", "") for t in conv.get("conversations", [])]
        text = "\n".join(turns[:2])
        if len(text) > 2000:
            texts.append(text)
        if len(texts) == n_texts:
            break
    return ids[:n_prompts], ids[n_prompts:], texts


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], max_tokens: int) -> float:
    """exp(mean next-token NLL) over the first ``max_tokens`` tokens of each text (one pass per text)."""
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_tokens]])
        T = ids.shape[1]
        cache = model.new_cache(1, T + 1)
        logits = model(ids, torch.arange(T)[None], cache, torch.tensor([0]), with_taps=False).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += T - 1
    return math.exp(nll / count)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_batch(models: dict, tokenizer, draft, prompts: list, batch: int, args, peer: LlamaCppModel | None) -> dict:
    cells = {}
    for label, model in models.items():
        cells[label] = Cell(model, tokenizer, draft, batch, None)
        if not args.no_spec:
            cells[label + " +spec"] = Cell(model, tokenizer, draft, batch, args.spec, max_lookahead=5,
                                           tree={"topk": 4, "budget": 12, "depth": 5, "budgets": [0, 4, 8, 12]})
    if peer is not None:
        cells["llama.cpp q4_1"] = LlamaCppCell(peer, batch, flash_attn=args.llama_flash_attn)
    try:
        run_cells(list(cells.values()), prompts, args.max_tokens, args.repeats)
    finally:
        if peer is not None:
            cells["llama.cpp q4_1"].close()
    base = cells["q4_1"]
    rows = []
    for name, cell in cells.items():
        outs = cell.outs
        row = {"config": name, "batch": batch, "requests": len(outs),
               "tokens_per_s": statistics.median(o.tokens_per_s for o in outs),
               "decode_tokens_per_s": statistics.median(o.decode_tokens_per_s for o in outs),
               "ttft_ms": 1e3 * statistics.median(getattr(o, "ttft_s", 0.0) for o in outs),
               "vs_q4_1": paired_speedup(cell, base)[0], "decode_vs_q4_1": paired_speedup(cell, base, decode=True)[0]}
        plain = cells.get(name.removesuffix(" +spec"))
        if name.endswith(" +spec"):
            row["spec_speedup"] = paired_speedup(cell, plain)[0]
            row["spec_decode_speedup"] = paired_speedup(cell, plain, decode=True)[0]
            row["accept_length"] = statistics.mean(o.accept_length for o in outs)
            row["mean_lookahead"] = sum(o.draft_tokens for o in outs) / max(sum(o.verify_steps for o in outs), 1)
            if hasattr(cell.controller, "costs"):  # AdaptiveLookahead: its step cost by k
                row["controller_costs_ms"] = [round(1e3 * c, 2) for c in cell.controller.costs(batch)]
            if hasattr(cell.controller, "chosen"):  # AdaptiveTreeBudget: the budgets it chose
                row["budget_histogram"] = {n: cell.controller.chosen.count(n) for n in cell.controller.budgets}
            row["greedy_identical_to_plain"] = sum(a.output_ids == b.output_ids for a, b in zip(outs, plain.outs))
        if peer is not None and name in ("q4_1", "llama.cpp q4_1"):
            other = cells["llama.cpp q4_1" if name == "q4_1" else "q4_1"]
            row["same_tokens_as_other_q4_1"] = [first_difference(a.output_ids, b.output_ids)
                                                for a, b in zip(outs, other.outs)]
        rows.append(row)
    return {"batch": batch, "rows": rows}


def table(result: dict) -> str:
    lines = ["| batch | config | tok/s (median) | decode tok/s | TTFT ms | vs ours q4_1 | decode vs ours q4_1 |"
             " spec speedup (decode) | accept len | mean k |", "|" + "---|" * 10]
    for b in result["batches"]:
        for r in b["rows"]:
            spec = (f"{r['spec_speedup']:.2f}x ({r['spec_decode_speedup']:.2f}x)" if "spec_speedup" in r else "")
            lines.append(f"| {r['batch']} | {r['config']} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{r['ttft_ms']:.0f} | {r['vs_q4_1']:.2f}x | {r['decode_vs_q4_1']:.2f}x | {spec} | "
                         f"{r.get('accept_length', 1.0):.2f} | {r.get('mean_lookahead', 0.0):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--draft", default=None, help="EAGLE3 draft folder (default: the newest make-demo draft)")
    p.add_argument("--no-spec", action="store_true", help="leave out the speculation rows")
    p.add_argument("--spec", default="adaptive+copy",
                   help="how the +spec rows speculate: one bench_spec lookahead item (4, adaptive+copy, tree+copy, ...)")
    p.add_argument("--domain", default="code", choices=["code", "chat", "non_english", "all"],
                   help="ShareGPT domain of the prompts (the demo's draft learned from code)")
    p.add_argument("--no-peer", action="store_true", help="leave out llama.cpp")
    p.add_argument("--llama-flash-attn", action="store_true",
                   help="llama.cpp with flash attention (faster; its greedy tokens then move with the batch size)")
    p.add_argument("--ppl-texts", type=int, default=24)
    p.add_argument("--ppl-tokens", type=int, default=256)
    p.add_argument("--sections", default="speed,ppl", help="comma list of speed, ppl")
    p.add_argument("--quick", action="store_true", help="batch 1, 2 prompts, 32 tokens, 4 texts")
    p.add_argument("--out", default=f"outputs/bench_quant/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args = p.parse_args(argv)
    try:
        (args.spec,) = parse_lookaheads(args.spec)
    except ValueError as e:
        p.error(f"--spec: {e}")
    if args.quick:
        args.batch_sizes, args.prompts, args.max_tokens, args.ppl_texts, args.ppl_tokens = "1", 2, 32, 4, 128
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from aurora_rl.assets import ensure_smollm2, smollm2_gguf_path
    from aurora_rl.models import quant

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    models = load_models(gguf)
    draft_path = args.draft or default_draft()
    run_of_draft = Path(draft_path).resolve().parent if draft_path else None
    seen = (trained_prompts(run_of_draft, tokenizer, models["q4_1"].config.vocab_size)
            if run_of_draft and (run_of_draft / "requests.jsonl").is_file() else set())
    prompts, vocab_sample, texts = prompts_and_texts(tokenizer, args.prompts, args.ppl_texts, args.seed, args.domain,
                                                     seen)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {"cpu": cpu, "machine": platform.machine(), "threads": args.threads, "quant_body": quant.body(),
              "domain": args.domain, "spec": str(args.spec),
              "gguf": gguf.name, "max_tokens": args.max_tokens, "prompts": len(prompts), "batches": []}
    sections = set(args.sections.split(","))
    if "speed" in sections:
        peer = None
        if not args.no_peer:
            try:
                peer = LlamaCppModel(gguf, args.threads)
            except ImportError:
                print("llama-cpp-python is not installed (pip install '.[bench]'): no llama.cpp column")
        draft = load_draft(draft_path, models["q4_1"], vocab_sample)
        result["draft"] = draft_path or "day-0 random"
        for b in (int(x) for x in args.batch_sizes.split(",")):
            result["batches"].append(run_batch(models, tokenizer, draft, prompts, b, args, peer))
        if peer is not None:
            peer.close()
        print(f"{cpu}, {args.threads} threads, kernels: {quant.body()}; {len(prompts)} ShareGPT {args.domain} prompts "
              f"({len(seen)} the draft's run served left out), {args.max_tokens} greedy tokens, draft {result['draft']}, "
              f"+spec = {args.spec}")
        print(table(result))
        for b in result["batches"]:
            for r in b["rows"]:
                if "greedy_identical_to_plain" in r:
                    chose = (f"controller's step cost by k (ms) {r['controller_costs_ms']}" if "controller_costs_ms" in r
                             else f"budgets chosen {r.get('budget_histogram')}")
                    print(f"batch {b['batch']} {r['config']}: {chose}; "
                          f"greedy outputs identical to plain: {r['greedy_identical_to_plain']}/{r['requests']}")
                if "same_tokens_as_other_q4_1" in r and r["config"] == "q4_1":
                    print(f"batch {b['batch']} ours q4_1 vs llama.cpp q4_1: first differing token per request "
                          f"{r['same_tokens_as_other_q4_1']}")
    if "ppl" in sections:
        result["perplexity"] = {label: perplexity(m, tokenizer, texts, args.ppl_tokens) for label, m in models.items()}
        print(f"perplexity, {len(texts)} held-out ShareGPT texts x {args.ppl_tokens} tokens: "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["perplexity"].items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quant.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
