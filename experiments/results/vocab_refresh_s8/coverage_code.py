# Session 8, run from /tmp/s8 as .venv/bin/python <this file> in the repo root: share of the target's greedy
# tokens inside a 4096-token draft vocabulary picked from code prompts, against vocabularies picked from the traffic.
import sys, torch
sys.path.insert(0, "/work/main/experiments"); sys.path.insert(0, "/work/main")
from collections import Counter
from aurora_rl.training.trace_io import load_traces
from aurora_rl.models.draft import select_draft_vocab, token_frequencies
tr = load_traces("/work/main/experiments/results/learner_ablation/traces_train.safetensors")
ho = load_traces("/work/main/experiments/results/learner_ablation/traces_held_out.safetensors")
V = 49152
pv = set(select_draft_vocab(token_frequencies([t.prompt_ids.tolist() for t in tr[:64]], V), 4096).tolist())
def emitted(ts): return [x for t in ts for x in t.tokens[len(t.prompt_ids):].tolist()]
for n in (16, 32, 64, 128, 192):
    c = Counter(emitted(tr[:n]))
    pc = token_frequencies([t.prompt_ids.tolist() for t in tr[:n]], V)
    mix = pc.clone().float()
    for k, v in c.items(): mix[k] += 4 * v
    ev = set(select_draft_vocab(torch.tensor([c.get(i, 0) for i in range(V)]), 4096).tolist())
    mv = set(select_draft_vocab(mix, 4096).tolist())
    toks = emitted(ho)
    print(n, "held-out emitted", len(toks), "prompt-vocab(64) %.3f" % (sum(x in pv for x in toks)/len(toks)),
          "emitted-vocab %.3f" % (sum(x in ev for x in toks)/len(toks)), "mix %.3f" % (sum(x in mv for x in toks)/len(toks)))
