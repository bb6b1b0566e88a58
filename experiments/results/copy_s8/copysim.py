"""Offline: copy proposals (ContextIndex, as served) over greedy code outputs, capped at K tokens.
Policy: copy where the context matches (k = min(K, len(copy))), plain step (k = 0) elsewhere."""
import sys
sys.path.insert(0, "/work/main")
from aurora_rl.training.trace_io import load_traces
from aurora_rl.engine.context_copy import ContextIndex
tr = load_traces("/work/main/experiments/results/learner_ablation/traces_held_out.safetensors") + \
     load_traces("/work/main/experiments/results/learner_ablation/traces_train.safetensors")[:64]
for K in (4, 5, 6, 8, 10, 12, 16):
    steps = copy_steps = tokens = 0
    hist = {}
    for t in tr:
        P = len(t.prompt_ids); toks = t.tokens[: t.num_positions + 1].tolist(); out = toks[P:]
        idx = ContextIndex(2, 4)
        n = 0  # output tokens committed
        # the first output token comes from prefill
        n = 1
        while n < len(out):
            idx.sync(toks[:P], out[:n])
            prop = idx.propose(K)
            acc = 0
            for j, x in enumerate(prop):
                if n + j < len(out) and out[n + j] == x:
                    acc += 1
                else:
                    break
            gained = min(acc + 1, len(out) - n)
            steps += 1; tokens += gained
            if prop:
                copy_steps += 1
                hist.setdefault(len(prop), [0, 0]); hist[len(prop)][0] += 1; hist[len(prop)][1] += gained
            n += gained
    print(f"K={K}: steps {steps}, tokens/step {tokens/steps:.3f}, copy steps {copy_steps/steps:.3f}, "
          f"tokens per copy step {sum(v[1] for v in hist.values())/max(copy_steps,1):.3f}")
