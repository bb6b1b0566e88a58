import os, torch, time
os.environ["AURORA_RL_NATIVE_KERNELS"]="1"
from aurora_rl.models import cpu_kernels as ck
torch.set_num_threads(int(os.environ.get("T","1")))
def bench(f, n=20):
    for _ in range(3): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e3
with torch.inference_mode():
  for (i,o) in [(576,49152),(576,3072),(1536,576),(576,960)]:
    W=torch.randn(o,i); P=ck.pack(W)
    for m in [1,2,4,5,8,10,20]:
        x=torch.randn(m,i)
        a=bench(lambda: x@W.t()); b=bench(lambda: ck.matmul(x,P,o))
        print(i,o,m,f"torch {a:.2f}  native {b:.2f}  GB/s native {o*i*4/b/1e6:.1f}")
