import time, torch, collections
from types import SimpleNamespace
from aurora_rl.bench_spec import load
from aurora_rl.engine import EngineConfig, LLMEngine
from aurora_rl.engine.speculative import SpecDecoder, SpecConfig
from aurora_rl.engine.sampling import SamplingParams
torch.set_num_threads(2)
args=SimpleNamespace(dtype="auto", draft="experiments/results/day0_prompt_r4/aurora/draft", draft_vocab_size=4096,
    exclude_run=[], keep_trained_prompts=False, domain="code", seed=0, prompts=16)
target, tok, draft, prompts, _ = load(args)
traces=[]
dec=SpecDecoder(draft, 4, 2048, SpecConfig(lookahead=1, capture_traces=True), trace_sink=traces.append)
eng=LLMEngine(target, EngineConfig(num_slots=4, max_len=2048), tok, dec)
eng.generate(prompts, SamplingParams(max_tokens=96, ignore_eos=True))
torch.save(traces, "/tmp/traces_k1.pt")
def copy_pred(seq, t, nmax=4):
    # predict seq[t] from seq[:t]: longest suffix (n<=nmax) that occurred earlier; most recent occurrence
    for n in range(nmax,0,-1):
        if t-n<1: continue
        suf=seq[t-n:t]
        for s in range(t-n-1, -1, -1):
            if seq[s:s+n]==suf:
                return seq[s+n], n
    return None, 0
st=collections.Counter()
for tr in traces:
    seq=tr.tokens.tolist()
    for i,(pos,p) in enumerate(zip(tr.step_position.tolist(), tr.proposals[:,0].tolist())):
        if tr.lookahead[i]==0: continue
        t=pos+1+1  # token position predicted at depth 1? check
        if t>=len(seq): continue
        y=seq[t]; d=(p==y); c,n=copy_pred(seq,t)
        st["n"]+=1; st["draft"]+=d; st["copy_has"]+=c is not None; st["copy"]+= (c==y)
        st[f"copy_n{n}"]+=1; st[f"copy_n{n}_ok"]+=(c==y); st[f"draft_when_n{n}_ok"]+=d
        st["union"]+= d or (c==y)
        st["accepted_check"]+= int(tr.accepted[i])==int(d)
print(dict(st))
