"""vLLM against our engine with the same exported draft: proposals step by step and accept length.

Both serve the same held-out prompts greedily with the same target weights and the same draft (an
EAGLE3 folder, by default the newest one ``make demo`` exported), a chain of ``--lookahead`` proposals
per step, our engine with copies off, in ``--dtype`` (float32: the two should agree step for step; the
test suite checks that on a day-0 draft). Prompts are ShareGPT ``--domain`` prompts the draft's run did
not serve (``bench_spec.trained_prompts``). Prints and writes the agreement and both accept lengths.

    python experiments/vllm_fidelity.py [--draft DIR] [--prompts 8] [--max-tokens 64] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aurora_rl.vllm_engine.backend import configure_environment  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draft", default=None)
    p.add_argument("--domain", default="code")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "vllm_fidelity"))
    args = p.parse_args(argv)
    configure_environment(1.0, 2)
    import torch
    from transformers import AutoTokenizer

    from aurora_rl.assets import ensure_smollm2
    from aurora_rl.bench_spec import trained_prompts
    from aurora_rl.data.sharegpt import chat_token_ids, domain_counts, sample_prompts
    from aurora_rl.models.eagle3_io import load_eagle3
    from aurora_rl.models.loader import load_target
    from aurora_rl.vllm_engine.fidelity import accept_length, compare, ours, vllm_steps

    torch.set_num_threads(2)
    found = sorted(ROOT.glob("outputs/day0/*/draft"))
    if not args.draft and not found:
        raise SystemExit(f"no --draft given and no {ROOT}/outputs/day0/*/draft (run `make demo` first)")
    draft_dir = Path(args.draft) if args.draft else found[-1]
    folder = ensure_smollm2()
    dtype = getattr(torch, args.dtype)
    target = load_target(folder, dtype)
    tok = AutoTokenizer.from_pretrained(str(folder))
    run = draft_dir.resolve().parent
    seen = trained_prompts(run, tok, target.config.vocab_size) if (run / "requests.jsonl").is_file() else set()
    prompts = []
    for s in sample_prompts(args.domain, domain_counts()[args.domain], seed=args.seed):
        ids = chat_token_ids(tok, s.messages)
        if tuple(ids) not in seen and len(ids) <= 512:
            prompts.append(ids)
        if len(prompts) == args.prompts:
            break
    draft = load_eagle3(draft_dir, target_embedding=target.embed.weight.detach().float()).to_dtype(dtype).eval()
    a = ours(target, draft, prompts, args.lookahead, args.max_tokens)
    from vllm import LLM

    llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=2048, max_num_seqs=len(prompts), enforce_eager=True,
              seed=0, speculative_config={"method": "eagle3", "model": str(draft_dir),
                                          "num_speculative_tokens": args.lookahead})
    b = vllm_steps(llm, prompts, args.max_tokens)
    agg = compare(a, b)
    result = {"draft": str(draft_dir), "excluded_trained_prompts": len(seen), "args": vars(args),
              "requests": agg.requests, "outputs_equal": agg.outputs_equal, "steps_compared": agg.steps_compared,
              "steps_equal": agg.steps_equal, "tokens_compared": agg.tokens_compared, "tokens_equal": agg.tokens_equal,
              "first_divergence": agg.first_divergence, "accept_length_ours": accept_length(a),
              "accept_length_vllm": accept_length(b),
              "per_request": [{"ours": (len(x.output_ids) - 1) / max(len(x.proposals), 1),
                               "vllm": (len(y.output_ids) - 1) / max(len(y.proposals), 1)} for x, y in zip(a, b)]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results_{args.dtype}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_request"}, indent=1))
    return result


if __name__ == "__main__":
    main()
