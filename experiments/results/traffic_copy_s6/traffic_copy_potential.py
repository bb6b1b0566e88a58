"""How often would copying from earlier requests' tokens (not just the request's own context) propose
the target's next tokens? Offline, on greedy target outputs for ShareGPT code prompts served in order.

For request i, the traffic store holds the prompts and outputs of requests 0..i-1. At every output
step t the request's own context (prompt + output[:t]) is tried first (the engine's context copy, 2-4
token suffix); where it has no match, the store is tried with a 3-4 token suffix (its most recent
occurrence). For each source: the steps it covers, and how many of its (up to 4) proposed tokens equal
the target's next ones (the accepted run under greedy verification).

    .venv/bin/python experiments/results/traffic_copy_s6/traffic_copy_potential.py
"""
import json
import sys
from pathlib import Path

import torch

from aurora_rl.assets import ensure_smollm2
from aurora_rl.data.sharegpt import chat_token_ids, domain_counts, sample_prompts
from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from aurora_rl.engine.context_copy import ContextIndex
from aurora_rl.models.loader import load_target

torch.set_num_threads(2)
N, TOKENS, K = int(sys.argv[1]) if len(sys.argv) > 1 else 48, 96, 4
path = ensure_smollm2()
from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(path)
model = load_target(path, torch.float32)
prompts = []
for p in sample_prompts("code", domain_counts()["code"], seed=5):
    ids = chat_token_ids(tok, p.messages)
    if len(ids) <= 768:
        prompts.append(ids)
    if len(prompts) == N:
        break
engine = LLMEngine(model, EngineConfig(num_slots=4, max_len=1024))
outs = [o.output_ids for o in engine.generate(prompts, SamplingParams(max_tokens=TOKENS, ignore_eos=True))]

store = ContextIndex(3, 4)  # the traffic store: every earlier request's prompt and output, concatenated
stats = {"steps": 0, "own": [0, 0, 0], "store": [0, 0, 0]}  # [steps covered, first token right, tokens accepted]
for prompt, out in zip(prompts, outs):
    own = ContextIndex(2, 4)
    for t in range(len(out) - 1):
        own.sync(prompt, out[:t + 1])
        truth = out[t + 1:t + 1 + K]
        prop, src = own.propose(K), "own"
        if not prop and store.tokens:
            # the store's suffix lookup: the request's last tokens against the store's index
            tail = own.tokens[-4:]
            for size in (4, 3):
                start = store._after.get(tuple(tail[-size:]))
                if start is not None:
                    prop, src = store.tokens[start:start + K], "store"
                    break
        stats["steps"] += 1
        if prop:
            run = 0
            while run < min(len(prop), len(truth)) and prop[run] == truth[run]:
                run += 1
            s = stats[src]
            s[0] += 1
            s[1] += run > 0
            s[2] += run
    store.sync(store.tokens + prompt + out, [])
steps = stats["steps"]
result = {"requests": N, "tokens": TOKENS, "steps": steps}
for src in ("own", "store"):
    covered, first, acc = stats[src]
    result[src] = {"coverage": covered / steps, "first_token_right": first / max(covered, 1),
                   "accepted_per_covered_step": acc / max(covered, 1)}
    print(f"{src:5s}: covers {100 * covered / steps:.1f}% of steps; first token right {100 * first / max(covered, 1):.1f}%; "
          f"{acc / max(covered, 1):.2f} of up to {K} tokens accepted per covered step")
Path(__file__).with_suffix(".json").write_text(json.dumps(result, indent=2))
