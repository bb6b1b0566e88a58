"""What speculation could give on this CPU if every proposal were right: the ceiling of a draft chain, a
draft tree and a copy chain, each step paying its real cost.

An oracle knows the target's greedy answer to every prompt (served first by a plain engine) and, in
each step, replaces what the proposer proposed with the answer's next tokens, after the proposer ran,
so the step pays everything a real one pays:

- ``oracle chain k``: the draft drafts k tokens (its passes timed as usual) and the oracle's k tokens are
  verified in their place;
- ``oracle tree``: the draft builds its token tree (top-K, budget N, depth D, timed as usual); the
  oracle's tokens become the tree's first branch, D deep (where an always-right draft's best nodes would
  be), and the draft's own nodes fill the rest of the tree up to its size: the target verifies as many
  nodes as it would have;
- ``oracle copy k``: the oracle's k tokens as each row's copy chain, verified with no draft pass, as a
  context copy is (what prompt-lookup decoding would give if the context always held the answer).

Each oracle cell is served in waves against plain decoding in the same run (``bench_spec.run_cells``,
ABBA order) and the speedup is the median of the paired per-wave ratios, as in ``bench_spec``. Greedy
speculation is lossless, so the outputs must be the plain ones (counted in the table). "Step cost" is
what one speculative step costs in plain steps: accept length / decode speedup.

    python experiments/oracle_draft_ceiling.py [--batch-sizes 1,4,8,16] [--prompts 16] [--max-tokens 48]
        [--repeats 3] [--draft DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import write_result  # noqa: E402
from aurora_rl.bench_spec import Cell, load, paired_speedup, run_cells  # noqa: E402
from aurora_rl.engine import SamplingParams  # noqa: E402
from aurora_rl.engine.token_tree import DRAFT, TokenTree  # noqa: E402


class Oracle:
    """The target's greedy answers, by request: the tokens after a row's committed ones."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]]) -> None:
        self.answers = answers
        self._by_request: dict[str, list[int]] = {}

    def next_tokens(self, seq, k: int) -> list[int]:
        ans = self._by_request.get(seq.request_id)
        if ans is None:
            ans = self._by_request[seq.request_id] = self.answers[tuple(seq.prompt_ids)]
        n = len(seq.output_ids)
        return ans[n:n + k]


def oracle_chains(decoder, oracle: Oracle) -> None:
    """The decoder's draft chains, once drafted, replaced by the oracle's tokens (module docstring)."""
    inner = decoder.proposer.propose

    def propose(seqs, ks):
        chains = inner(seqs, ks)
        for b, (seq, k) in enumerate(zip(seqs, ks)):
            if k > 0:
                right = oracle.next_tokens(seq, k)
                chains.proposals[b] = right + chains.proposals[b][len(right):k]
        return chains

    decoder.proposer.propose = propose


def oracle_copies(decoder, oracle: Oracle) -> None:
    """Every row's copy chain is the oracle's next ``copy_max_tokens`` (or lookahead) tokens."""
    inner, k = decoder.proposer.copies, decoder.config.copy_max_tokens or decoder.config.lookahead

    def copies(seqs):
        inner(seqs)  # the index's own upkeep, as a real copy step pays it
        return [oracle.next_tokens(seq, k) for seq in seqs]

    decoder.proposer.copies = copies


def with_right_branch(tree: TokenTree, right: list[int]) -> TokenTree:
    """A tree of ``tree``'s size whose first branch is ``right`` and whose other nodes are ``tree``'s own,
    in its order, as far as they fit (a node whose parent did not fit is left out)."""
    out = TokenTree.rooted(tree.tokens[0])
    node = 0
    for tok in right:
        node = out.add(node, tok, 0.0, DRAFT)
    placed = {0: 0}
    for i in range(1, len(tree)):
        parent = placed.get(tree.parents[i])
        if parent is None or (len(out) >= len(tree) and out.child(parent, tree.tokens[i]) is None):
            continue
        placed[i] = out.add(parent, tree.tokens[i], tree.logp[i], DRAFT)
    return out


def oracle_trees(decoder, oracle: Oracle) -> None:
    """The decoder's draft trees, once built, given the oracle's tokens as their first branch."""
    inner = decoder.tree_proposer.propose

    def propose(seqs, budgets, copies, states, probs_fn, max_depths=None):
        trees = inner(seqs, budgets, copies, states, probs_fn, max_depths)
        # as deep as the tree may go (an always-right draft's best nodes are its right branch)
        depths = [min(decoder.tree_proposer.max_depth, n, m) for n, m in zip(budgets, max_depths or budgets)]
        return [with_right_branch(t, oracle.next_tokens(s, d)) if len(t) > 1 else t
                for s, t, d in zip(seqs, trees, depths)]

    decoder.tree_proposer.propose = propose


CELLS = {  # name -> (bench_spec lookahead, how the oracle enters)
    "oracle copy 4 (no draft pass)": ("4+copy", oracle_copies),
    "oracle chain 4 (the draft's passes paid)": (4, oracle_chains),
    "oracle tree (top-4, budget 12, depth 5; the draft's passes paid)": ("tree", oracle_trees),
}


def oracle_cell(target, tokenizer, draft, batch: int, name: str, oracle: Oracle) -> Cell:
    lookahead, hook = CELLS[name]
    cell = Cell(target, tokenizer, draft, batch, lookahead, capture=True)
    hook(cell.decoder, oracle)
    cell.name = name
    return cell


def answers_of(target, tokenizer, prompts: list[list[int]], max_tokens: int, batch: int) -> dict:
    plain = Cell(target, tokenizer, None, batch, None, capture=False)
    outs = plain.engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return {tuple(p): list(o.output_ids) for p, o in zip(prompts, outs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "q8_0", "q4_1"])
    ap.add_argument("--draft", default=None, help="the draft whose passes are paid (default: a random one)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    args = argparse.Namespace(dtype="auto", quant=a.quant, draft=a.draft, draft_vocab_size=4096, exclude_run=[],
                              keep_trained_prompts=False, domain="code", seed=1, prompts=a.prompts,
                              max_prompt_tokens=1024)
    torch.set_num_threads(2)
    target, tokenizer, draft, prompts, _ = load(args)
    result = {"draft": a.draft, "prompts": a.prompts, "max_tokens": a.max_tokens, "repeats": a.repeats,
              "quant": target.quant_summary(), "rows": []}
    lines = ["| batch | configuration | mean tok/s | speedup (median of paired waves) | decode speedup "
             "| accept length | step cost, plain steps | outputs = plain |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for batch in batches:
        # the answers at this batch size: the oracle's tokens are exactly what plain decoding emits here
        oracle = Oracle(answers_of(target, tokenizer, prompts, a.max_tokens, batch))
        base = Cell(target, tokenizer, None, batch, None, capture=False)
        cells = [oracle_cell(target, tokenizer, draft, batch, n, oracle) for n in CELLS]
        run_cells([base, *cells], prompts, a.max_tokens, a.repeats)
        lines.append(f"| {batch} | none | {statistics.mean(o.tokens_per_s for o in base.outs):.1f} | 1.00x | 1.00x "
                     f"| 1.00 | 1.00 | - |")
        for c in cells:
            speedup, waves = paired_speedup(c, base)
            decode, _ = paired_speedup(c, base, decode=True)
            acc = statistics.mean(o.accept_length for o in c.outs)
            same = sum(o.output_ids == p.output_ids for o, p in zip(c.outs, base.outs))
            row = {"batch": batch, "config": c.name, "mean": statistics.mean(o.tokens_per_s for o in c.outs),
                   "speedup": speedup, "wave_ratios": waves, "decode_speedup": decode, "accept_length": acc,
                   "step_cost_plain_steps": acc / decode, "identical_outputs": same, "outputs": len(c.outs)}
            result["rows"].append(row)
            lines.append(f"| {batch} | {c.name} | {row['mean']:.1f} | {speedup:.2f}x | {decode:.2f}x | {acc:.2f} | "
                         f"{row['step_cost_plain_steps']:.2f} | {same} of {len(c.outs)} |")
    table = "\n".join(lines)
    print(table)
    write_result(a.out, "oracle_draft_ceiling", result, table)
    return result


if __name__ == "__main__":
    main()
