import time, torch, statistics
from types import SimpleNamespace
from aurora_rl.bench_spec import load, Cell, run_cells, paired_speedup
torch.set_num_threads(2)
args=SimpleNamespace(dtype="auto", draft="experiments/results/day0_s5/aurora/draft", draft_vocab_size=4096,
    exclude_run=[], keep_trained_prompts=False, domain="code", seed=0, prompts=16)
target, tok, draft, prompts, _ = load(args)
B=4
cells=[Cell(target, tok, draft, B, None), Cell(target, tok, draft, B, None), Cell(target, tok, draft, B, 0), Cell(target, tok, draft, B, 0, capture=False), Cell(target, tok, draft, B, "adaptive", max_lookahead=4)]
steps={}
for i,c in enumerate(cells):
    f=c.engine.step; st=steps.setdefault(i,[])
    def g(f=f, st=st):
        t=time.perf_counter(); r=f(); st.append(time.perf_counter()-t); return r
    c.engine.step=g
run_cells(cells, prompts, 64, 1)
for i,c in enumerate(cells[1:],1):
    print(i, c.lookahead, c.capture, round(paired_speedup(c, cells[0])[0],3), [round(x,2) for x in paired_speedup(c, cells[0])[1]], "median step ms", round(statistics.median(steps[i])*1e3,1), "vs", round(statistics.median(steps[0])*1e3,1))
print("probes", cells[-1].controller.probes, "explored", cells[-1].controller.explored, "catch", cells[-1].decoder.catch_up_s)
