"""A code-trained draft (session 5's day-0 draft, 120 code requests) keeps learning on another domain's
traces, with and without the online vocabulary refresh (learner.vocab_refresh_every=2), offline.

    .venv/bin/python experiments/results/vocab_refresh_s8/shift_ab.py chat 120
    .venv/bin/python experiments/results/vocab_refresh_s8/shift_ab.py non_english 64

Serves the domain's first N ShareGPT prompts and 16 held-out ones greedily with SmolLM2 (cached in
/tmp/s8/ab_<domain>), then trains two learners on the same traces in the same order (4 per update,
replay 4, 64 prompt rows, depth 4) and prints the held-out teacher-forced accept length at lookahead 4
every 40 traces. Session 8 ran it from /tmp/s8/shiftab.py (this file); its logs are beside it.
"""
import sys, time, json, copy, torch
sys.path.insert(0, "/work/main/experiments"); sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
import learner_ablation as la
from pathlib import Path
from aurora_rl.config import ModelSection, WorkloadSection
from aurora_rl.runtime.factory import load_target_model
from aurora_rl.runtime.traffic import build_traffic
from aurora_rl.models.eagle3_io import load_eagle3
from aurora_rl.training.trace_io import save_traces, load_traces
from aurora_rl.training.learner import Learner, LearnerConfig
dom = sys.argv[1]
ntrain = int(sys.argv[2])
out = Path(f"/tmp/s8/ab_{dom}"); out.mkdir(exist_ok=True)
args = la.parse_args(["--out", str(out)])
model = ModelSection(target="smollm2", dtype="auto", draft_vocab_size=4096)
target, tok = load_target_model(model, 0)
head = target.lm_head.weight.detach().float().clone()
code_draft = load_eagle3("/work/main/experiments/results/day0_s5/aurora/draft", target.embed.weight.detach().float())
f1, f2 = out / "train.safetensors", out / "held.safetensors"
if f1.exists():
    train, held = load_traces(f1), load_traces(f2)
else:
    w = WorkloadSection(source="sharegpt", phases=[{"domain": dom, "requests": ntrain}], max_tokens=128, max_prompt_tokens=1024, held_out=16)
    tr = build_traffic(w, tok, target.config.vocab_size, 0)
    t0 = time.time()
    train = la.serve(target, code_draft, [ids for ids, _ in tr.requests], args)
    held = la.serve(target, code_draft, tr.held_out[dom], args)
    print("served", len(train), len(held), round(time.time() - t0), "s", flush=True)
    save_traces(train, f1); save_traces(held, f2)
res = {}
VARIANTS = [("refresh", {"vocab_refresh_every": 2})] if "--only-refresh" in sys.argv else [("no_refresh", {}), ("refresh", {"vocab_refresh_every": 2})]
for name, extra in VARIANTS:
    cfg = LearnerConfig(algorithm="aurora", lr=3e-3, depth=4, prompt_bases=64, replay_ratio=4, **extra)
    L = Learner(code_draft, head, cfg)
    curve = [(0, la.held_out_accept_length(L.draft, held, head, 4))]
    for i in range(0, len(train), 4):
        m = L.update(train[i:i + 4])
        if "vocab/coverage" in m and (i // 4) % 4 == 1:
            print(name, i + 4, {k: round(v, 3) for k, v in m.items() if k.startswith("vocab")}, flush=True)
        if (i + 4) % 40 == 0:
            curve.append((i + 4, la.held_out_accept_length(L.draft, held, head, 4)))
            print(name, curve[-1], flush=True)
    res[name] = curve
print(json.dumps(res))
json.dump(res, open(out / "result.json", "w"))
