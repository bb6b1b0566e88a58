"""Speculation benchmark: the Aurora model-card table for our engine, and the cost of trace capture.

For batch sizes (default 1, 4, 8, 16) x {no speculation, lookahead 3, 4, 5, adaptive}: mean / p50 /
p5 / p95 tokens/s per request, speedup over no speculation measured in the same run, and accept
length. Each configuration is one engine that lives through the run, as a server's would; the prompts
go out in waves of one batch, each wave served by every configuration in turn (ABBA order), and the
speedup is the median over waves of the paired ratio of mean tokens/s, which a shared machine's slow
spells cannot bias toward one configuration. At batch 1 a wave is one request, so that is the median
request's speedup; where the gain is uneven across requests (copies), the plain ratio of mean tokens/s
("ratio of means", ``speedup_of_means`` in the JSON) is higher, and the table gives both.
Tokens/s per request runs from admission to the last token, prefill included; "decode speedup" is the
same paired ratio of the decoding rate after the first token, the part speculation acts on.
A "control" row, a second plain engine served in the same waves, shows how far from 1.00x noise alone
moves a ratio in that run. "No speculation" is the plain engine (no draft at all); "adaptive" is the
serving default, ``AdaptiveLookahead`` choosing k in 0..max(lookaheads) each step. With the default day-0
random draft the table shows what speculating costs; with ``--draft DIR`` (an EAGLE3 folder, e.g. a
run's ``draft/``) it shows the gain. The prompts are ShareGPT first turns of ``--domain``, minus every
prompt that the run which trained the draft served (and any ``--exclude-run``). A second table times lookahead 4 with trace capture on and off.
Figures go to JSON and a plot (speedup vs batch size) in ``--out``.
``python -m aurora_rl.bench_spec [--quick] [--draft outputs/day0/<run>/draft]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from aurora_rl.config import ModelSection
from aurora_rl.models.dtypes import resolve_dtype
from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.adaptive import AdaptiveLookahead
from aurora_rl.engine.adaptive_tree import AdaptiveTreeBudget
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder

ADAPTIVE = "adaptive"
TREE = "tree"
"""Token trees (``SpecConfig.tree_topk``): the draft's top-k expansion under a node budget per row."""
ADAPTIVE_TREE = "adaptive-tree"
"""Token trees with ``AdaptiveTreeBudget`` picking each step's budget among ``--tree-budgets`` (0 included)."""
CONTROL = "control"
COPY = "+copy"
"""Suffix of a lookahead item ("4+copy", "adaptive+copy"): proposals copied from the context where it
repeats itself (``SpecConfig.context_copy``), the draft's elsewhere."""
"""A second plain engine in the same waves: its "speedup" over the first is the noise floor of the run."""
TRAFFIC = "+traffic"
"""Suffix like ``+copy`` ("adaptive+traffic", "tree+traffic"): context copies and, where the context offers
none, traffic copies (``SpecConfig.traffic_copy``) from an index filled with the greedy outputs of
``--traffic-warmup`` other prompts, then frozen so that repeated passes do not copy their own answers."""


def split_suffix(item: str) -> tuple[str, bool, bool]:
    """(base, context copies, traffic copies) of a lookahead item."""
    for suffix, traffic in ((TRAFFIC, True), (COPY, False)):
        if item.endswith(suffix):
            return item.removesuffix(suffix), True, traffic
    return item, False, False


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Cell:
    """One (batch, lookahead) configuration: an engine that lives for the whole benchmark, like a
    server's, fed wave after wave of requests (so the adaptive controller keeps what it learned)."""

    def __init__(self, target, tokenizer, draft, batch: int, lookahead: int | str | None, capture: bool = True,
                 max_lookahead: int = 5, tree: dict | None = None) -> None:
        self.batch, self.lookahead, self.capture = batch, lookahead, capture
        self.decoder, self.controller = None, None
        if lookahead not in (None, CONTROL):
            k, copy, traffic = split_suffix(lookahead) if isinstance(lookahead, str) else (lookahead, False, False)
            k = k if k in (ADAPTIVE, TREE, ADAPTIVE_TREE) or not isinstance(k, str) else int(k)
            tree = tree or {}
            trees = k in (TREE, ADAPTIVE_TREE)
            fixed = max_lookahead if k in (ADAPTIVE, TREE, ADAPTIVE_TREE) else k
            cfg = SpecConfig(lookahead=fixed, capture_traces=capture, context_copy=copy, traffic_copy=traffic,
                             tree_topk=tree.get("topk", 4) if trees else 0, tree_budget=tree.get("budget", 12),
                             tree_depth=tree.get("depth", 5), copy_max_tokens=tree.get("copy_max_tokens", 0))
            self.decoder = SpecDecoder(draft, batch, 2048, cfg, trace_sink=lambda t: None)
            if k == ADAPTIVE:
                self.controller = AdaptiveLookahead(max_lookahead).attach(self.decoder)
            elif k == ADAPTIVE_TREE:
                self.controller = AdaptiveTreeBudget(tree.get("budgets", [0, 4, 8, 12])).attach(self.decoder)
        self.engine = LLMEngine(target, EngineConfig(num_slots=batch, max_len=2048), tokenizer, self.decoder)
        self.outs: list = []
        self.wave_means: list[float] = []
        self.wave_decode_means: list[float] = []
        self.wall = 0.0

    def serve(self, prompts: list[list[int]], max_tokens: int, record: bool = True) -> None:
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        if not record:
            return
        record_wave(self, outs, time.perf_counter() - t0)

    def row(self) -> dict:
        outs, tps = self.outs, [o.tokens_per_s for o in self.outs]
        return {"batch": self.batch, "lookahead": self.lookahead, "capture": self.capture, "requests": len(outs),
                "mean": statistics.mean(tps), "p50": percentile(tps, 50), "p5": percentile(tps, 5),
                "p95": percentile(tps, 95), "decode_mean": statistics.mean(o.decode_tokens_per_s for o in outs),
                "accept_length": statistics.mean(o.accept_length for o in outs),
                "aggregate_tokens_per_s": sum(o.num_output_tokens for o in outs) / self.wall,
                "mean_lookahead": (sum(o.draft_tokens for o in outs) / max(sum(o.verify_steps for o in outs), 1)
                                   if self.decoder is not None else 0.0),
                "explored_steps": getattr(self.controller, "explored", 0),
                "probe_steps": getattr(self.controller, "probes", 0),
                "tree_nodes_per_step": (getattr(self.decoder, "tree_nodes", 0) / max(sum(o.verify_steps for o in outs), 1)),
                "budget_histogram": ({str(n): self.controller.chosen.count(n) for n in self.controller.budgets}
                                     if isinstance(self.controller, AdaptiveTreeBudget) else None),
                "copy_steps": getattr(self.decoder, "copy_steps", 0),
                "copy_accepted": getattr(self.decoder, "copy_accepted", 0),
                "copy_proposed": getattr(self.decoder, "copy_proposed", 0),
                "traffic_copy_steps": getattr(getattr(self.decoder, "proposer", None), "traffic_copies", 0),
                "outputs": [o.output_ids for o in outs]}


def record_wave(cell, outs: list, seconds: float) -> None:
    """Add one served wave to a cell's figures (``Cell`` and the benchmark peers share them)."""
    cell.wall += seconds
    cell.outs += outs
    cell.wave_means.append(statistics.mean(o.tokens_per_s for o in outs))
    cell.wave_decode_means.append(statistics.mean(o.decode_tokens_per_s for o in outs))


def run_cells(cells: list[Cell], prompts: list[list[int]], max_tokens: int, repeats: int,
              warmup_tokens: int = 8) -> None:
    """Serve ``repeats`` passes over ``prompts`` in waves of one batch; every cell serves each wave
    before the next wave starts, in the order A B .. then .. B A (ABBA), so that a slow spell or a drift
    of a shared machine hits all cells alike and each wave gives a paired comparison.

    First every cell serves the first wave for ``warmup_tokens`` tokens, unrecorded: the first pass at a
    new batch size pays one-time costs (kernel set-up for new shapes, first touch of a fresh KV cache)
    that would otherwise land on whichever cell serves first (measured: up to 1.7x on that one wave)."""
    batch = cells[0].batch
    waves = [prompts[i:i + batch] for _ in range(repeats) for i in range(0, len(prompts), batch)]
    if warmup_tokens > 0:
        for cell in cells:
            cell.serve(waves[0], warmup_tokens, record=False)
    for w, wave in enumerate(waves):
        for cell in (cells if w % 2 == 0 else cells[::-1]):
            cell.serve(wave, max_tokens)


def paired_speedup(cell: Cell, base: Cell, decode: bool = False) -> tuple[float, list[float]]:
    """Median over waves of the ratio of mean tokens/s per request (``decode``: of the decoding rate after
    the first token), and the per-wave ratios."""
    a, b = (cell.wave_decode_means, base.wave_decode_means) if decode else (cell.wave_means, base.wave_means)
    ratios = [x / y for x, y in zip(a, b)]
    return statistics.median(ratios), ratios


def parse_lookaheads(text: str) -> list[int | str]:
    out: list[int | str] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        base = split_suffix(item)[0]
        if base in (ADAPTIVE, TREE, ADAPTIVE_TREE):
            out.append(item)
        elif base.isdigit():  # 0: the speculative path that never proposes (what its fixed work costs)
            out.append(int(item) if base == item else item)
        else:
            raise ValueError(f"--lookaheads item {item!r}: use integers >= 0, 'adaptive', '{TREE}' and/or "
                             f"'{ADAPTIVE_TREE}', each optionally followed by '{COPY}' or '{TRAFFIC}'")
    return out


def markdown_table(rows: list[dict]) -> str:
    """The model-card table: one line per (batch, lookahead), tokens/s per request."""
    lines = ["| batch | lookahead | mean tok/s | p50 | p5 | p95 | speedup | ratio of means | decode tok/s "
             "| decode speedup | accept length | mean k or nodes |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = "none" if r["lookahead"] is None else r["lookahead"]
        lines.append(f"| {r['batch']} | {k} | {r['mean']:.1f} | {r['p50']:.1f} | {r['p5']:.1f} | {r['p95']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['speedup_of_means']:.2f}x | {r['decode_mean']:.1f} | "
                     f"{r['decode_speedup']:.2f}x | {r['accept_length']:.2f} | {r['mean_lookahead']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in result["table"]:
        if r["lookahead"] is not None:
            series.setdefault(str(r["lookahead"]), []).append((r["batch"], r["speedup"]))
    for name, pts in series.items():
        labels = {ADAPTIVE: "adaptive", CONTROL: "control: plain vs plain (noise)"}
        ax.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=labels.get(name, f"lookahead {name}"),
                **({"color": "grey", "ls": ":"} if name == CONTROL else {}))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="no speculation")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (slots)")
    ax.set_ylabel("speedup of mean tokens/s per request")
    ax.set_title(f"draft: {result['draft']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(args):
    from aurora_rl.data.sharegpt import chat_token_ids, domain_counts, sample_prompts
    from aurora_rl.runtime.factory import initial_draft, load_target_model

    section = ModelSection(dtype=args.dtype, quant=args.quant, draft=args.draft or "random",
                           draft_vocab_size=args.draft_vocab_size)
    target, tokenizer = load_target_model(section)
    seen: set[tuple[int, ...]] = set()
    run_of_draft = Path(args.draft).resolve().parent if args.draft else None
    args.run_prompts = []
    if run_of_draft and (run_of_draft / "requests.jsonl").is_file():
        # the traffic that trained the draft: what a server that ran it has seen (a '+traffic' warm-up)
        args.run_prompts = served_prompts(run_of_draft, tokenizer, target.config.vocab_size)
        if not args.keep_trained_prompts:
            args.exclude_run = [*args.exclude_run, str(run_of_draft)]  # a run's draft: measure on prompts it never saw
    for run in args.exclude_run:
        seen |= trained_prompts(run, tokenizer, target.config.vocab_size)
    ids, excluded = [], 0
    for p in sample_prompts(args.domain, domain_counts()[args.domain], seed=args.seed):
        i = chat_token_ids(tokenizer, p.messages)
        if tuple(i) in seen:
            excluded += 1
        elif len(i) <= args.max_prompt_tokens:
            ids.append(i)
        if len(ids) == args.prompts + 64 + getattr(args, "traffic_warmup", 0):
            break
    if len(ids) < args.prompts:
        raise SystemExit(f"only {len(ids)} {args.domain!r} prompts of at most {args.max_prompt_tokens} tokens are left after excluding "
                         f"{excluded} that {args.exclude_run} trained on; --prompts asks for {args.prompts}")
    prompts, vocab_sample = ids[: args.prompts], ids[args.prompts:args.prompts + 64]
    args.spare_prompts = ids[args.prompts:]  # never measured: a '+traffic' warm-up takes its own from here
    args.measured_prompts = prompts
    draft = initial_draft(section, target, vocab_sample).to_dtype(target.dtype).eval()
    return target, tokenizer, draft, prompts, excluded


def traffic_warmup(target, tokenizer, args) -> list[list[int]]:
    """Greedy outputs of ``--traffic-warmup`` prompts, served by a plain engine: the traffic a '+traffic'
    cell has seen before. With a run's ``--draft``, the first requests that run served (the traffic a
    server that ran it would have indexed, as its draft learned from them), else prompts of the domain
    that are not measured (``load`` keeps them aside). The measured prompts are never among them."""
    measured = {tuple(p) for p in args.measured_prompts}
    pool = args.run_prompts if args.run_prompts else args.spare_prompts
    warm = [p for p in pool if tuple(p) not in measured][: args.traffic_warmup]
    source = "the draft's run" if args.run_prompts else f"unmeasured {args.domain} prompts"
    print(f"traffic warm-up: {len(warm)} prompts from {source} (asked for {args.traffic_warmup}), "
          f"{args.traffic_warmup_tokens} greedy tokens each")
    if not warm:
        return []
    engine = LLMEngine(target, EngineConfig(num_slots=8, max_len=2048), tokenizer)
    outs = engine.generate(warm, SamplingParams(max_tokens=args.traffic_warmup_tokens))
    return [o.output_ids for o in outs]


def fill_traffic(cell: "Cell", outputs: list[list[int]]) -> None:
    """Teach a '+traffic' cell's index the warm-up outputs, then freeze it (a no-op for other cells)."""
    traffic = getattr(cell.decoder, "traffic", None)
    if traffic is None:
        return
    for out in outputs:
        traffic.add(out)
    traffic.frozen = True


def trained_prompts(run_dir: str | Path, tokenizer, vocab_size: int) -> set[tuple[int, ...]]:
    """Prompt ids a run's learner may have trained on (``served_prompts``, as a set)."""
    return {tuple(ids) for ids in served_prompts(run_dir, tokenizer, vocab_size)}


def served_prompts(run_dir: str | Path, tokenizer, vocab_size: int) -> list[list[int]]:
    """A run's traffic in the order it was served, rebuilt from the run's config (Hydra's
    ``.hydra/config.yaml``, or the ``overrides.txt`` an experiment script writes), up to the last request
    in its ``requests.jsonl``."""
    from omegaconf import OmegaConf

    from aurora_rl.cli import compose
    from aurora_rl.config import WorkloadSection
    from aurora_rl.runtime.traffic import build_traffic

    run = Path(run_dir)
    hydra_cfg, overrides, log_path = run / ".hydra" / "config.yaml", run / "overrides.txt", run / "requests.jsonl"
    if not log_path.is_file() or not (hydra_cfg.is_file() or overrides.is_file()):
        raise SystemExit(f"--exclude-run {run}: needs requests.jsonl and .hydra/config.yaml or overrides.txt there "
                         f"(a run directory of aurora-rl or of an experiment script)")
    if hydra_cfg.is_file():
        cfg = OmegaConf.load(hydra_cfg)
        section, seed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WorkloadSection), cfg.workload)), cfg.seed
    else:
        run_cfg = compose(overrides.read_text().split(), run)
        section, seed = run_cfg.workload, run_cfg.seed
    served = 1 + max((json.loads(line)["index"] for line in log_path.read_text().splitlines() if line.strip()),
                     default=-1)
    traffic = build_traffic(section, tokenizer, vocab_size, int(seed))
    return [list(ids) for ids, _ in traffic.requests[:served]]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--lookaheads", default="3,4,5,adaptive",
                   help="comma list of fixed lookaheads and/or 'adaptive' (over 0..the largest fixed one); "
                        "a '+copy' suffix (4+copy, adaptive+copy) adds context-copy proposals, '+traffic' "
                        "context and traffic copies")
    p.add_argument("--traffic-warmup", type=int, default=128,
                   help="prompts (none of the measured ones) whose greedy outputs fill the '+traffic' cells' index")
    p.add_argument("--traffic-warmup-tokens", type=int, default=128, help="tokens of each warm-up output")
    p.add_argument("--tree-topk", type=int, default=4, help="children per expanded node of a tree")
    p.add_argument("--tree-budget", type=int, default=12, help=f"proposed nodes per row and step of '{TREE}'")
    p.add_argument("--tree-depth", type=int, default=5, help="deepest draft expansion of a tree")
    p.add_argument("--tree-budgets", default="0,4,8,12", help=f"budgets '{ADAPTIVE_TREE}' chooses among")
    p.add_argument("--copy-max-tokens", type=int, default=0,
                   help="most tokens a copy proposes (0: the lookahead; in a tree, copies may go deeper than --tree-depth)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=1024,
                   help="longest prompt taken (the code workload's limit: its held-out prompts are the bench's)")
    p.add_argument("--domain", default="code", choices=["code", "chat", "non_english", "all"],
                   help="ShareGPT domain of the prompts")
    p.add_argument("--seed", type=int, default=1, help="order in which the domain's prompts are taken")
    p.add_argument("--exclude-run", action="append", default=[], metavar="RUN_DIR",
                   help="leave out every prompt this aurora-rl run served (its learner trained on them); repeatable. "
                        "A --draft inside a run directory (RUN_DIR/draft) excludes its own run by default")
    p.add_argument("--keep-trained-prompts", action="store_true",
                   help="do not leave out the prompts of the run that trained --draft")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: bfloat16 where the CPU computes it natively, else float32")
    p.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"],
                   help="target weights (auto: the shipped GGUF's Q4_1 blocks; none: float)")
    p.add_argument("--draft", default=None, help="EAGLE3 draft folder (default: a day-0 random draft)")
    p.add_argument("--draft-vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over the prompts; each pass is served in waves of one batch, every cell in turn")
    p.add_argument("--no-control", action="store_true",
                   help="leave out the control row (a second plain engine, whose ratio is the noise floor)")
    p.add_argument("--skip-capture", action="store_true", help="leave out the trace-capture cost table")
    p.add_argument("--quick", action="store_true", help="batch 1 and 4, lookahead 4, 4 prompts, 16 tokens")
    p.add_argument("--out", default=f"outputs/bench_spec/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args = p.parse_args(argv)
    if args.repeats < 1:  # before the model loads
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.copy_max_tokens < 0:
        p.error(f"--copy-max-tokens must be >= 0, got {args.copy_max_tokens}")
    if args.quick:
        args.batch_sizes, args.lookaheads, args.prompts, args.max_tokens = "1,4", "4,adaptive", 4, 16
    torch.set_num_threads(args.threads)
    target, tokenizer, draft, prompts, excluded = load(args)
    rows, identical = [], True
    lookaheads = parse_lookaheads(args.lookaheads)
    max_k = max([int(split_suffix(str(k))[0]) for k in lookaheads if split_suffix(str(k))[0].isdigit()], default=5)
    warm_outputs = traffic_warmup(target, tokenizer, args) if any(split_suffix(str(k))[2] for k in lookaheads) else []
    tree = {"topk": args.tree_topk, "budget": args.tree_budget, "depth": args.tree_depth,
            "copy_max_tokens": args.copy_max_tokens,
            "budgets": [int(x) for x in args.tree_budgets.split(",") if x.strip()]}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        extra = [] if args.no_control else [CONTROL]
        cells = [Cell(target, tokenizer, draft, batch, k, max_lookahead=max_k, tree=tree)
                 for k in [None, *extra, *lookaheads]]
        for cell in cells:
            fill_traffic(cell, warm_outputs)
        run_cells(cells, prompts, args.max_tokens, args.repeats)
        base = cells[0].row()
        base["speedup"] = base["decode_speedup"] = base["speedup_of_means"] = 1.0
        rows.append(base)
        for cell in cells[1:]:
            r = cell.row()
            r["speedup"], r["speedup_per_wave"] = paired_speedup(cell, cells[0])
            r["decode_speedup"], r["decode_speedup_per_wave"] = paired_speedup(cell, cells[0], decode=True)
            r["speedup_of_means"] = r["mean"] / base["mean"]
            r["differing_outputs"] = sum(a != b for a, b in zip(r["outputs"], base["outputs"]))
            identical &= r["differing_outputs"] == 0
            rows.append(r)
        # Each batch size as soon as it is measured: a long run cut short still leaves its figures.
        print(markdown_table([r for r in rows if r["batch"] == batch]), flush=True)
        del cells
    b = int(args.batch_sizes.split(",")[-1]) if args.quick else 4
    capture_cells = [] if args.skip_capture else [Cell(target, tokenizer, draft, b, 4, capture=c) for c in (False, True)]
    if capture_cells:
        run_cells(capture_cells, prompts, args.max_tokens, args.repeats)
    capture = [c.row() for c in capture_cells]
    result = {"dtype": str(resolve_dtype(args.dtype)).removeprefix("torch."), "quant": args.quant, "draft": args.draft or "day-0 random", "max_tokens": args.max_tokens,
              "prompts": len(prompts), "domain": args.domain, "prompt_seed": args.seed,
              "excluded_runs": args.exclude_run, "prompts_excluded": excluded, "greedy_outputs_identical": identical,
              "repeats": args.repeats, "traffic_warmup_outputs": len(warm_outputs),
              "traffic_warmup_tokens": sum(map(len, warm_outputs)),
              "table": [{k: v for k, v in r.items() if k != "outputs"} for r in rows],
              "capture": [{k: v for k, v in r.items() if k != "outputs"} for r in capture],
              "capture_cost": 1 - paired_speedup(*capture_cells[::-1])[0] if capture_cells else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_spec.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bench_spec.png")
    print(f"draft: {result['draft']}, {result['dtype']}, {len(prompts)} ShareGPT {args.domain} prompts, {args.max_tokens} "
          f"tokens each ({excluded} left out as trained on)")
    print(markdown_table(result["table"]))
    if capture:
        off, on = result["capture"]
        print(f"trace capture at batch {off['batch']}, lookahead 4: {off['mean']:.1f} tok/s off, {on['mean']:.1f} on "
              f"(cost {100 * result['capture_cost']:.1f}%)")
    print(f"greedy outputs identical to no speculation: {identical}; JSON: {out / 'bench_spec.json'}")
    return result


if __name__ == "__main__":
    main()
