# Session 8, run from /tmp/s8 as .venv/bin/python <this file> in the repo root: share of the target's greedy
# tokens inside a 4096-token draft vocabulary picked from code prompts, against vocabularies picked from the traffic.
import sys, time, torch
sys.path.insert(0, "/work/main/experiments"); sys.path.insert(0, "/work/main")
torch.set_num_threads(2)
import learner_ablation as la
from pathlib import Path
from aurora_rl.config import ModelSection, WorkloadSection
from aurora_rl.runtime.factory import load_target_model, initial_draft
from aurora_rl.runtime.traffic import build_traffic
from aurora_rl.models.draft import Eagle3Draft, select_draft_vocab, token_frequencies
from aurora_rl.training.trace_io import save_traces
from collections import Counter
args = la.parse_args(["--out", "/tmp/s8/chat"])
model = ModelSection(target="smollm2", dtype="auto", draft_vocab_size=4096)
target, tok = load_target_model(model, 0)
out = {}
for dom, n in (("chat", 40), ("non_english", 24)):
    w = WorkloadSection(source="sharegpt", phases=[{"domain": dom, "requests": n}], max_tokens=128, max_prompt_tokens=1024, held_out=8)
    tr = build_traffic(w, tok, target.config.vocab_size, 0)
    out[dom] = tr
code = build_traffic(WorkloadSection(source="sharegpt", phases=[{"domain": "code", "requests": 64}], max_tokens=128, max_prompt_tokens=1024, held_out=16), tok, target.config.vocab_size, 0)
day0 = initial_draft(model, target, [ids for ids, _ in code.requests[:64]], 0)
codevocab = set((torch.arange(4096) + day0.d2t).tolist())
for dom, tr in out.items():
    prompts = [ids for ids, _ in tr.requests]
    t0 = time.time()
    traces = la.serve(target, day0, prompts, args)
    print(dom, "served", len(traces), "in", round(time.time() - t0), "s", flush=True)
    save_traces(traces, Path(f"/tmp/s8/{dom}_traces.safetensors"))
    half = len(prompts) // 2
    refresh_counts = token_frequencies(prompts[:half], target.config.vocab_size)
    ref = select_draft_vocab(refresh_counts, 4096, always=tuple(target.config.eos_token_ids))
    refvocab = set(ref.tolist())
    # vocab from the first half's emitted tokens too
    emitted = Counter()
    for t in traces[:half]:
        emitted.update(t.tokens[len(t.prompt_ids):].tolist())
    for name, test in (("all", traces), ("second half", traces[half:])):
        toks = [x for t in test for x in t.tokens[len(t.prompt_ids):].tolist()]
        print(f"  {dom} {name}: {len(toks)} emitted tokens; in code vocab {sum(x in codevocab for x in toks)/len(toks):.3f}; "
              f"in vocab from first-half prompts {sum(x in refvocab for x in toks)/len(toks):.3f}")
