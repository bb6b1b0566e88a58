"""Ad-hoc: batch 1, plain vs 4+copy vs adaptive+copy vs a copy-only policy (copy rows speculate their copy
(up to 4), other rows k = 0), paired waves, same prompts as the table (session-5 draft)."""
import sys, argparse, torch
sys.path.insert(0, "/work/main")
from aurora_rl import bench_spec as bs
torch.set_num_threads(2)
args = argparse.Namespace(dtype="auto", draft="/work/main/experiments/results/day0_s5/aurora/draft", draft_vocab_size=4096,
                          exclude_run=[], keep_trained_prompts=False, domain="code", seed=1, prompts=int(sys.argv[1]) if len(sys.argv) > 1 else 16)
target, tok, draft, prompts, excl = bs.load(args)
B = 1
cells = [bs.Cell(target, tok, draft, B, k, max_lookahead=4) for k in (None, "4+copy", "adaptive+copy", "4+copy")]
def copy_only(seqs, copyable):
    return [4 if c else 0 for c in copyable]
copy_only.splits_copies = True
cells[3].decoder.lookahead_fn = copy_only
bs.run_cells(cells, prompts, 64, 1)
names = ["plain", "4+copy", "adaptive+copy", "copy-only"]
for n, c in zip(names, cells):
    r = c.row()
    s, _ = bs.paired_speedup(c, cells[0]); d, _ = bs.paired_speedup(c, cells[0], decode=True)
    print(f"{n:14s} tok/s {r['mean']:.1f} decode {r['decode_mean']:.1f} speedup {s:.2f}x decode {d:.2f}x accept {r['accept_length']:.2f} mean k {r['mean_lookahead']:.2f} copy steps {r['copy_steps']}")
# --- step timing by kind in the copy-only cell
import time, statistics
dec = cells[3].decoder
orig = dec.decode
log = []
def timed(engine, seqs):
    before = dec.copy_steps
    ctx = int(engine.runner.lengths[seqs[0].slot])
    t0 = time.perf_counter(); orig(engine, seqs); dt = time.perf_counter() - t0
    log.append((dec.copy_steps > before, ctx, dt))
dec.decode = timed
cells[3].serve(prompts, 64, record=False)
cp = [d for c, _, d in log if c]; pl = [d for c, _, d in log if not c]
print("copy steps", len(cp), "median ms", round(statistics.median(cp) * 1e3, 2), "plain steps", len(pl), "median ms", round(statistics.median(pl) * 1e3, 2))
