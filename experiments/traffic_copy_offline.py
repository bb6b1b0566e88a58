"""How much copying from earlier requests' outputs could give, without a draft: the target answers
``--prompts`` ShareGPT prompts greedily, in order, and the copy rules are replayed over the answers.

For each answer after the first ``--warm`` (whose outputs only fill the index), a chain policy walks its
tokens: each step proposes up to ``--k`` tokens, the matching prefix is accepted plus one target token.
Policies: no proposal; the request's own context (``ContextIndex``, matches of 2-4 tokens); the
traffic index (``TrafficIndex`` over the earlier answers, matches of 2-``--max-match``); the context
first, then the traffic (what ``engine.traffic_copy`` does). Printed: tokens per step of each policy,
and for the traffic copies made where the context had none, how often the first copied token was the
target's and the mean accepted run, by the length of the match. No timing: these figures do not
depend on the machine.

    python experiments/traffic_copy_offline.py [--prompts 190] [--tokens 64] [--warm 130] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aurora_rl.bench_spec import load  # noqa: E402
from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from aurora_rl.engine.context_copy import ContextIndex  # noqa: E402
from aurora_rl.engine.traffic_copy import TrafficIndex  # noqa: E402

POLICIES = ("none", "context", "traffic", "context, then traffic")


def accepted(proposal: list[int], truth: list[int]) -> int:
    a = 0
    while a < len(proposal) and a < len(truth) and proposal[a] == truth[a]:
        a += 1
    return a


def replay(answers: list[tuple[list[int], list[int]]], warm: int, k: int, max_match: int) -> dict:
    """Tokens per step per policy over answers[warm:], and the traffic copies' hit rate by match length."""
    steps = dict.fromkeys(POLICIES, 0)
    tokens = 0
    by_len: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0, 0])  # steps, first right, accepted
    index = TrafficIndex(2, max_match, window=10 ** 9)
    for r, (prompt, out) in enumerate(answers):
        if r >= warm:
            tokens += len(out)
            for policy in POLICIES:
                ctx, t = ContextIndex(2, 4), 0
                while t < len(out):
                    ctx.sync(prompt, out[:t])
                    own = ctx.propose(k) if policy != "traffic" else []
                    p = [] if policy == "none" else own
                    if policy in ("traffic", "context, then traffic") and not own:
                        p = index.propose(ctx.tokens, k)
                        if p and policy == "context, then traffic":
                            n = _match_length(index, ctx.tokens)
                            row = by_len[n]
                            a = accepted(p, out[t:])
                            row[0] += 1
                            row[1] += a > 0
                            row[2] += a
                    t += accepted(p, out[t:]) + 1
                    steps[policy] += 1
        index.add(out)
    return {"tokens_per_step": {p: tokens / s for p, s in steps.items()},
            "by_match_length": {n: {"steps": c, "first_right": f / c, "mean_accepted": a / c}
                                for n, (c, f, a) in sorted(by_len.items())}}


def _match_length(index: TrafficIndex, context: list[int]) -> int:
    """The length of the suffix ``index.propose`` matched (the longest that the index holds)."""
    for size in range(min(index.max_match, len(context)), index.min_match - 1, -1):
        key = tuple(context[len(context) - size:])
        if any(key in gen.after for gen in (index._current, index._previous)):
            return size
    return 0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=190)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warm", type=int, default=130, help="answers that only fill the index")
    ap.add_argument("--k", type=int, default=5, help="most tokens a step proposes")
    ap.add_argument("--max-match", type=int, default=8)
    ap.add_argument("--domain", default="code")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    args = argparse.Namespace(dtype="auto", quant="auto", draft=None, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain=a.domain, seed=1, prompts=a.prompts,
                              max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, tokenizer, _, prompts, _ = load(args)
    outs = LLMEngine(target, EngineConfig(num_slots=8, max_len=2048), tokenizer).generate(
        prompts, SamplingParams(max_tokens=a.tokens))
    result = replay([(p, o.output_ids) for p, o in zip(prompts, outs)], a.warm, a.k, a.max_match)
    result.update(prompts=len(prompts), warm=a.warm, tokens=a.tokens, k=a.k, domain=a.domain)
    lines = [f"{len(prompts) - a.warm} {a.domain} answers replayed after {a.warm} that fill the index "
             f"(greedy, {a.tokens} tokens, up to {a.k} proposed a step)", "",
             "| policy | tokens per step |", "|---|---:|"]
    lines += [f"| {p} | {v:.3f} |" for p, v in result["tokens_per_step"].items()]
    lines += ["", "| traffic match length | steps | first copied token right | mean accepted |", "|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['steps']} | {r['first_right']:.2f} | {r['mean_accepted']:.2f} |"
              for n, r in result["by_match_length"].items()]
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "traffic_copy_offline.json").write_text(json.dumps(result, indent=1))
        (out / "traffic_copy_offline.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
