"""The verifier: accept rules over one verify pass's target logits, per row, for chains and for trees.

Chains (``verify_chains``): greedy rows in one batched call, sampled rows by rejection sampling against
the draft's distribution (``aurora_rl.engine.spec_math``). Trees (``verify_trees``): the longest root
path matching the argmax, or recursive rejection sampling over siblings (``aurora_rl.engine.token_tree``).
Neither looks at the draft or the caches: the decoder proposes, this decides, the runner keeps.
"""

from __future__ import annotations

from typing import Callable

import torch

from aurora_rl.engine.sampling import processed_probs, sample_tokens
from aurora_rl.engine.sequence import Sequence
from aurora_rl.engine.spec_math import Verdict, greedy_verify_batch, rejection_verify
from aurora_rl.engine.token_tree import TokenTree, TreeVerdict, greedy_tree_verify, rejection_tree_verify
from aurora_rl.models import cpu_kernels


def verify_chains(seqs: list[Sequence], props: list[list[int]], target_logits: torch.Tensor,
                  draft_q: Callable[[int, int], torch.Tensor]) -> list[Verdict]:
    """The accept rule for each row: greedy rows in one batched call, sampled rows by rejection sampling.

    ``target_logits`` [B, >=K+1, V] come from the verify pass; ``draft_q(b, V)`` gives row b's draft
    distribution [k, V] over the target vocabulary (only called for sampled rows).
    """
    K = max((len(p) for p in props), default=0)
    if K == 0:  # nothing proposed (a k = 0 step): plain sampling, as a decode step without a draft does
        tokens = sample_tokens(target_logits[:, 0], [s.params for s in seqs], [s.generator for s in seqs])
        return [Verdict(0, t) for t in tokens]
    verdicts: list[Verdict | None] = [None] * len(seqs)
    greedy = [b for b, s in enumerate(seqs) if s.params.greedy]
    if greedy:
        prop = torch.tensor([props[b] + [-1] * (K - len(props[b])) for b in greedy], dtype=torch.long)
        acc, nxt = greedy_verify_batch(prop.view(len(greedy), K), torch.tensor([len(props[b]) for b in greedy]),
                                       cpu_kernels.argmax(target_logits[greedy, : K + 1]))
        for i, b in enumerate(greedy):
            verdicts[b] = Verdict(int(acc[i]), int(nxt[i]))
    for b, seq in enumerate(seqs):
        if verdicts[b] is None:
            p = processed_probs(target_logits[b, : len(props[b]) + 1], seq.params)
            verdicts[b] = rejection_verify(torch.tensor(props[b], dtype=torch.long), draft_q(b, p.shape[-1]), p,
                                           seq.generator)
    return verdicts  # type: ignore[return-value]


def verify_trees(seqs: list[Sequence], trees: list[TokenTree], target_logits: torch.Tensor) -> list[TreeVerdict]:
    """The accept rule per row over the verify pass's logits [B, T, V] (node order)."""
    argmax = cpu_kernels.argmax(target_logits).tolist()
    out = []
    for b, (seq, tree) in enumerate(zip(seqs, trees)):
        if seq.params.greedy:
            out.append(greedy_tree_verify(tree, argmax[b]))
        else:
            p = processed_probs(target_logits[b, : len(tree)], seq.params)
            out.append(rejection_tree_verify(tree, p, seq.generator))
    return out
