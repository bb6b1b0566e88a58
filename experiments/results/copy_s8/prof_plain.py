import sys, argparse, torch, cProfile, pstats, time
sys.path.insert(0, "/work/main")
from aurora_rl import bench_spec as bs
from aurora_rl.engine import SamplingParams
torch.set_num_threads(2)
args = argparse.Namespace(dtype="auto", draft="/work/main/experiments/results/day0_s5/aurora/draft", draft_vocab_size=4096,
                          exclude_run=[], keep_trained_prompts=False, domain="code", seed=1, prompts=8)
target, tok, draft, prompts, excl = bs.load(args)
cell = bs.Cell(target, tok, draft, 1, None)
cell.serve(prompts[:1], 8, record=False)
runner = cell.engine.runner
orig = runner.extend
acc = []
def ext(*a, **k):
    t0 = time.perf_counter(); r = orig(*a, **k); acc.append(time.perf_counter() - t0); return r
runner.extend = ext
pr = cProfile.Profile(); pr.enable()
t0 = time.perf_counter()
outs = cell.engine.generate(prompts[:4], SamplingParams(max_tokens=64, ignore_eos=True))
wall = time.perf_counter() - t0
pr.disable()
print("wall", round(wall, 2), "extend calls", len(acc), "extend total", round(sum(acc), 2), "median decode extend ms", round(sorted(acc)[len(acc)//2]*1e3, 2))
print("prompt lens", [len(p) for p in prompts[:4]])
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
