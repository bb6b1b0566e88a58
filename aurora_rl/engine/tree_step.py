"""One speculative step with token trees: propose trees, verify them in one target pass, keep one path.

Per running row: the tree proposer (``aurora_rl.engine.tree_proposer``) builds a tree under the row's
node budget (0: the root alone, a plain decoding row); ``ModelRunner.extend_tree`` runs every node of
every row in one target pass; the accept rule of ``aurora_rl.engine.token_tree`` picks a root path and
the next token; ``ModelRunner.keep_path`` moves the path's cache entries into place. The draft is then
fed the kept positions exactly as after a chain step (``ChainProposer.extend``), lazily for rows that
did not draft.

The trace records the whole tree (every node's token, parent, behaviour log-prob and source) and the
accepted path, beside the chain columns older learners read: the chain of a tree step is its
accepted path continued, below the point where it stopped, by the first child at each node (the
proposal that was rejected there), so ``proposals[:accepted]`` are the kept tokens as for a chain.
"""

from __future__ import annotations

import time

from aurora_rl.engine.sequence import Sequence
from aurora_rl.engine.token_tree import COPY, TokenTree
from aurora_rl.engine.verify import verify_trees


def chain_of(tree: TokenTree, path: list[int]) -> list[int]:
    """The accepted path continued by first children: the chain view of a tree step (module docstring)."""
    chain = list(path)
    node = path[-1] if path else 0
    while True:
        kids = tree.children(node)
        if not kids:
            return chain
        node = kids[0]
        chain.append(node)


def decode_trees(dec, engine, seqs: list[Sequence]) -> None:
    """``SpecDecoder.decode`` when the decoder proposes trees (``SpecConfig.tree_topk`` > 0)."""
    t0 = time.perf_counter()
    proposer = dec.proposer
    copies = proposer.copies(seqs)
    budgets = dec._tree_budgets(engine, seqs, copies)
    if not any(budgets):  # budget 0 everywhere: a plain step, with no tree pass to build or verify
        return dec.plain_step(engine, seqs, t0)
    # A row whose copy chain fills its budget has no room for draft nodes: it skips the draft's expansion
    # and is fed to the draft later, as a budget-0 row is (a copy costs no draft pass, as in a chain step).
    drafting = [b for b, n in enumerate(budgets) if n > min(len(copies[b]), seqs[b].room(engine.config.max_len))]
    proposer.catch_up([seqs[b] for b in drafting])
    states = {b: (proposer.state[seqs[b].slot].logits, proposer.state[seqs[b].slot].hidden) for b in drafting}
    trees = dec.tree_proposer.propose(seqs, budgets, [c if n > 0 else [] for c, n in zip(copies, budgets)],
                                      states, proposer.draft_probs, [s.room(engine.config.max_len) for s in seqs])
    starts = [int(engine.runner.lengths[s.slot]) for s in seqs]
    out = engine.runner.extend_tree([s.slot for s in seqs], trees)
    verdicts = verify_trees(seqs, trees, out.logits)
    new_tokens, kept_taps = [], []
    for b, (seq, tree, v) in enumerate(zip(seqs, trees, verdicts)):
        engine.runner.keep_path(seq.slot, v.path)
        new_tokens.append([tree.tokens[i] for i in v.path] + [v.next_token])
        kept_taps.append(out.taps[b, [0] + v.path])
    drafted = set(drafting)
    dec._feed_draft(seqs, [b in drafted for b in range(len(seqs))], starts, new_tokens, kept_taps)
    dt = time.perf_counter() - t0
    _record(dec, seqs, trees, verdicts, out, starts, dt)
    for seq, toks in zip(seqs, new_tokens):
        engine.append_tokens(seq, toks)


def _record(dec, seqs, trees, verdicts, out, starts, dt: float) -> None:
    chains = [chain_of(t, v.path) for t, v in zip(trees, verdicts)]
    copied = [[1] if c and t.source[c[0]] == COPY else [] for t, c in zip(trees, chains)]
    dec._count_depths([len(c) for c in chains], verdicts, copied)
    for b, (seq, tree, v) in enumerate(zip(seqs, trees, verdicts)):
        chain = chains[b]
        seq.verify_steps += 1
        seq.draft_tokens += tree.num_proposals
        seq.accepted_tokens += v.accepted
        dec.tree_nodes += tree.num_proposals
        if copied[b]:
            dec.copy_steps += 1
            dec.copy_proposed += len(chain)
            dec.copy_accepted += v.accepted
        dec.traces.tree_step(seq, out, b, starts[b], tree, v.path, chain, v.accepted, dec.policy_version, dt,
                             copied=bool(copied[b]))
