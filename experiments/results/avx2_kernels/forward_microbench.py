import os, sys, time, torch
mode=sys.argv[1]
os.environ["AURORA_RL_NATIVE_KERNELS"]= "1" if mode=="native" else "0"
torch.set_num_threads(int(os.environ.get("T","1")))
from aurora_rl.assets import ensure_smollm2
from aurora_rl.models.loader import load_target
m=load_target(ensure_smollm2(), torch.float32)
cache=m.new_cache(4, 512)
L=int(os.environ.get("L","200"))
ids=torch.randint(0,40000,(4,L))
pos=torch.arange(L).expand(4,L)
m(ids, pos, cache, torch.arange(4), with_taps=False)
def bench(B,T,n=10):
    ts=[]
    for r in range(n):
        p=torch.arange(L,L+T).expand(B,T)
        t=time.perf_counter(); m(ids[:B,:T], p, cache, torch.arange(B), with_taps=True); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
for B,T in [(1,1),(1,2),(1,3),(1,5),(1,6),(4,1),(4,5)]:
    print(mode,B,T,f"{bench(B,T):.1f} ms")
