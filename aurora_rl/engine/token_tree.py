"""Token trees: several proposals per step in one structure, their attention masks, and the accept rules.

A row's tree has the row's last committed token as its root (node 0); every other node is a proposed
token whose parent has a smaller index, so nodes laid out in index order put each ancestor before its
descendants. Siblings are distinct tokens (a trie): the draft's top-k expansion and the context's copy
chain merge where they agree. The target verifies every node in one pass: node i takes RoPE position
``base + depth(i)`` and cache entry ``base + i``, and sees the row's cache before ``base`` plus its own
ancestors (``mask_bits``).

Accept rules, both lossless for any tree built from the draft alone (never from the target's outputs):

- greedy: walk from the root to the child whose token is the target's argmax at the current node; the
  path ends where no child matches, and the target's argmax there is the next token. The result is what
  plain greedy decoding gives.
- sampling (recursive rejection sampling, as SpecInfer and EAGLE-2 verify multiple candidates): at the
  current node with target distribution p, try the children in order; a child with token x is a
  deterministic candidate (q one-hot at x), so it is accepted with probability r(x) / sum(r), r starting
  at p; on rejection r(x) is set to 0 (the residual max(r - q, 0) renormalised) and the next sibling is
  tried. When all are rejected the token comes from r / sum(r). This samples exactly from p at every
  node, so outputs are distributed as plain sampling's (a chi-square test in ``tests/test_token_tree.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_TREE_NODES = 64
"""Nodes per tree, root included: the width of the native kernels' tree mask."""

DRAFT, COPY = 0, 1
"""Where a node came from: the draft's top-k expansion or the context's copy chain."""


@dataclass
class TokenTree:
    """One row's proposals for one verify step."""

    tokens: list[int]
    """Target token ids; ``tokens[0]`` is the root (the last committed token, not a proposal)."""
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    logp: list[float] = field(default_factory=lambda: [0.0])
    """Behaviour log-probability of each node's token under the draft at its parent (0 where the draft did
    not score it: the root, and copied nodes past the draft's expansion)."""
    source: list[int] = field(default_factory=lambda: [DRAFT])
    _children: dict[int, dict[int, int]] = field(default_factory=dict)

    @classmethod
    def rooted(cls, token: int) -> "TokenTree":
        return cls([token])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_proposals(self) -> int:
        return len(self.tokens) - 1

    def child(self, node: int, token: int) -> int | None:
        return self._children.get(node, {}).get(token)

    def children(self, node: int) -> list[int]:
        """Children in insertion order (the order the sampling rule tries them)."""
        return list(self._children.get(node, {}).values())

    def add(self, parent: int, token: int, logp: float = 0.0, source: int = DRAFT) -> int:
        """The node for ``token`` under ``parent``: an existing sibling with that token, else a new node."""
        existing = self.child(parent, token)
        if existing is not None:
            if source == DRAFT and self.source[existing] == COPY:  # the draft scored it too: keep its prob
                self.logp[existing] = logp
            return existing
        if len(self.tokens) >= MAX_TREE_NODES:
            raise ValueError(f"a token tree holds at most {MAX_TREE_NODES} nodes")
        index = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.logp.append(logp)
        self.source.append(source)
        self._children.setdefault(parent, {})[token] = index
        return index

    def path(self, node: int) -> list[int]:
        """Nodes from the root's first child down to ``node`` (empty for the root)."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def mask_bits(self) -> list[int]:
        """Per node, its ``TreeAttention`` mask (nodes at consecutive cache entries from the root's)."""
        return ancestor_bits(self.parents)


def ancestor_bits(parents: list[int]) -> list[int]:
    """Masks for nodes at consecutive cache entries (``parents[i] < i``, -1 for none), in the signed 64-bit
    layout ``TreeAttention`` takes: bit k = the entry k before the node's own is visible. Bits reaching
    past the first node cover the cache before the tree: all set."""
    if len(parents) > MAX_TREE_NODES:
        raise ValueError(f"{len(parents)} tree nodes; the mask holds at most {MAX_TREE_NODES}")
    out, full = [], (1 << 64) - 1
    for i in range(len(parents)):
        bits = full & ~((1 << (i + 1)) - 1)
        a = i
        while a >= 0:
            bits |= 1 << (i - a)
            a = parents[a]
        out.append(bits - (1 << 64) if bits >= 1 << 63 else bits)
    return out


@dataclass(frozen=True, slots=True)
class TreeVerdict:
    path: list[int]
    """Accepted nodes, root's child first (their tokens are kept in this order)."""
    next_token: int
    """The target's token after the accepted path (a correction, or a bonus at a leaf)."""

    @property
    def accepted(self) -> int:
        return len(self.path)


def greedy_tree_verify(tree: TokenTree, target_argmax: list[int]) -> TreeVerdict:
    """The longest root path whose tokens are the target's argmax (``target_argmax[i]`` at node i)."""
    node, path = 0, []
    while True:
        nxt = tree.child(node, target_argmax[node])
        if nxt is None:
            return TreeVerdict(path, target_argmax[node])
        path.append(nxt)
        node = nxt


def rejection_tree_verify(tree: TokenTree, p: torch.Tensor, generator: torch.Generator | None) -> TreeVerdict:
    """Recursive rejection sampling over deterministic siblings; ``p`` [nodes, V] is the target's processed
    distribution at each node."""
    node, path = 0, []
    while True:
        residual = p[node].clone()
        accepted = None
        for c in tree.children(node):
            x = tree.tokens[c]
            mass = float(residual.sum())
            u = float(torch.rand((), generator=generator))
            if mass > 0 and u * mass < float(residual[x]):
                accepted = c
                break
            residual[x] = 0.0
        if accepted is None:
            total = float(residual.sum())
            # All of p's mass sat on rejected siblings only if one of them had probability 1: impossible.
            dist = residual / total if total > 0 else p[node]
            return TreeVerdict(path, int(torch.multinomial(dist, 1, generator=generator)))
        path.append(accepted)
        node = accepted


def select_nodes(scores: list[float], parents: list[int], budget: int) -> list[int]:
    """The ``budget`` best candidates by score whose parents are also chosen (or are the root, -1).

    Scores are cumulative log-probabilities, so a child never outscores its parent; ties go to the
    shallower (earlier) candidate, which keeps the chosen set closed under ancestors."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen: set[int] = set()
    out = []
    for i in order:
        if len(out) >= budget:
            break
        if parents[i] < 0 or parents[i] in chosen:
            chosen.add(i)
            out.append(i)
    return out
