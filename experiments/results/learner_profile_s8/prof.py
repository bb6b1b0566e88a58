import sys, time, torch
sys.argv = ["x", "--out", "/work/main/experiments/results/learner_ablation"]
sys.path.insert(0, "/work/main/experiments"); sys.path.insert(0, "/work/main")
import learner_ablation as la
from aurora_rl.training.learner import Learner, LearnerConfig
torch.set_num_threads(1)
args = la.parse_args(["--out", "/work/main/experiments/results/learner_ablation"])
from pathlib import Path
head, day0, train, held = la.data(args, Path(args.out))
print("traces", len(train), "positions", sum(t.num_positions for t in train[:8]) / 8, "prompt", sum(len(t.prompt_ids) for t in train[:8]) / 8)
cfg = LearnerConfig(algorithm="aurora", lr=3e-3, depth=4, prompt_bases=64, replay_ratio=4)
L = Learner(day0, head, cfg)
L.update(train[:4])
t0 = time.perf_counter(); L.update(train[4:8]); print("update s", time.perf_counter() - t0)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    L.update(train[8:12])
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
    L.update(train[12:16])
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=20, max_shapes_column_width=70))
tot = sum(e.flops for e in prof.key_averages() if e.flops)
print("GFLOP", tot / 1e9)
