"""Trace: everything a learner needs from one served request, and the recorder that builds it.

A trace holds the prompt and completion ids; the target's tapped features (three layers,
concatenated) and final-norm hidden state for every position the target computed and kept; and one
row per verify step: the base position, the proposals, the behaviour draft's log-probabilities, the
accepted count, the draft policy version, and timings. Stored dtype is configurable (bf16 default).
It also carries how the request was sampled (temperature, top-p, top-k) and, per position where the
target's full logits were at hand, the normalisers of the distribution it was verified under
(``served_stats``), so the learner can compute every term at that distribution over the full vocabulary.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from aurora_rl.engine.sampling import SamplingParams, served_stats
from aurora_rl.engine.token_tree import COPY


class TraceStatus(enum.Enum):
    FINISHED = "finished"
    ABORTED = "aborted"
    ERROR = "error"


@dataclass
class Trace:
    request_id: str
    prompt_ids: torch.Tensor
    """[P] long."""
    output_ids: torch.Tensor
    """[C] long."""
    taps: torch.Tensor
    """[L, num_taps * H]: target features at positions 0..L-1, L = P + C - 1."""
    hidden: torch.Tensor
    """[L, H]: final-norm hidden state (the learner applies the target's lm_head to it)."""
    step_position: torch.Tensor
    """[S] long: base position i of each verify step; depth j proposes the token at i + j + 1."""
    proposals: torch.Tensor
    """[S, K] long target ids, -1 past the step's lookahead."""
    behaviour_logp: torch.Tensor
    """[S, K] float: log-probability of each proposal under the draft that made it."""
    accepted: torch.Tensor
    """[S] long: proposals the target kept."""
    lookahead: torch.Tensor
    """[S] long: proposals made (0 = no speculation in that step)."""
    policy_version: torch.Tensor
    """[S] long: draft version that proposed."""
    step_time_s: torch.Tensor
    """[S] float: wall time of each verify step (draft + verify) for this batch."""
    status: TraceStatus = TraceStatus.FINISHED
    finish_reason: str | None = None
    greedy: bool = True
    copied: torch.Tensor | None = None
    """[S] bool: the step's proposals were copied from the context (``engine.context_copy``), not drawn
    from the draft; their behaviour log-probs are 0 and the learner's proposal terms skip them. None
    (traces from before the field, or from an engine without copies) means all False."""
    temperature: float = 0.0
    """Sampling temperature the request was served and verified at (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus mass of the request (1 = no nucleus truncation)."""
    top_k: int = 0
    """Top-k of the request (0 = none)."""
    served_stats: torch.Tensor | None = None
    """[L, 3] float32, row i for the distribution of token i+1 (``engine.sampling.served_stats``): the
    log-normaliser of logits/T over the full vocabulary (T = 1 for greedy requests), the smallest kept
    logit/T of the top-k/top-p set (-inf when nothing is cut) and the log-normaliser of the kept set.
    NaN rows where the engine had no full logits (prompt positions but the last); None (older traces,
    SGLang's) means all NaN: the learner recomputes what it needs there."""

    tree_offsets: torch.Tensor | None = None
    """[S + 1] long, token-tree steps (``SpecConfig.tree_topk`` > 0): step s's tree is nodes
    ``tree_offsets[s]:tree_offsets[s + 1]`` of the ``tree_*`` columns, its root (the step's last committed
    token) first. None: a chain-only trace. The chain columns above stay filled for tree steps: the
    accepted path continued by first children (``aurora_rl.engine.tree_step``)."""
    tree_tokens: torch.Tensor | None = None
    """[N] long: every node's target token id (every branch, the rejected siblings included)."""
    tree_parents: torch.Tensor | None = None
    """[N] long: each node's parent within its step's tree (-1 for the root)."""
    tree_logp: torch.Tensor | None = None
    """[N] float: behaviour log-prob of each node under the draft at its parent (0: root, copied nodes the
    draft did not score)."""
    tree_copied: torch.Tensor | None = None
    """[N] bool: the node came from the context's copy chain."""
    tree_accepted: torch.Tensor | None = None
    """[N] bool: the node is on its step's accepted path (the root counts as kept)."""

    def __post_init__(self) -> None:
        if (self.temperature == 0.0) != bool(self.greedy):
            raise ValueError(f"Trace {self.request_id!r}: greedy={self.greedy} with temperature={self.temperature} "
                             "(a greedy trace has temperature 0, a sampled one > 0)")
        if self.copied is None:
            self.copied = torch.zeros(self.accepted.shape[0], dtype=torch.bool)
        if self.served_stats is None:
            self.served_stats = torch.full((self.taps.shape[0], 3), float("nan"))

    @property
    def sampling(self) -> SamplingParams:
        """The sampling parameters the request was verified under (stop conditions not kept)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    @property
    def verify_steps(self) -> int:
        return int(self.accepted.numel())

    @property
    def accepted_tokens(self) -> int:
        return int(self.accepted.sum())

    @property
    def accept_length(self) -> float:
        return 1.0 + self.accepted_tokens / max(self.verify_steps, 1)

    @property
    def num_positions(self) -> int:
        return int(self.taps.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    @property
    def tokens(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.output_ids])


@dataclass
class TraceRecorder:
    """Accumulates one request's features and verify steps while it is served."""

    dtype: torch.dtype = torch.bfloat16
    params: SamplingParams = field(default_factory=SamplingParams)
    """How the request samples: its traces say so, and the served stats are computed under it."""
    taps: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    stats: list[torch.Tensor] = field(default_factory=list)
    steps: list[tuple] = field(default_factory=list)
    t_step: float = field(default_factory=time.perf_counter)

    def add_positions(self, taps: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor | None = None,
                      stats: torch.Tensor | None = None) -> None:
        """Kept positions' features; ``logits`` [R, V] are the target's full logits of the last R of them
        (or ``stats`` [R, 3], their ``served_stats`` computed already: a batch's in one call)."""
        self.taps.append(taps if taps.dtype == self.dtype else taps.to(self.dtype))
        self.hidden.append(hidden if hidden.dtype == self.dtype else hidden.to(self.dtype))
        if stats is None and logits is not None and logits.shape[0]:
            stats = served_stats(logits, self.params)
        if stats is not None and stats.shape[0] == taps.shape[0]:
            self.stats.append(stats)
            return
        full = torch.full((taps.shape[0], 3), float("nan"))
        if stats is not None and stats.shape[0]:
            full[taps.shape[0] - stats.shape[0]:] = stats
        self.stats.append(full)

    trees: list[tuple] = field(default_factory=list)
    """Per step (tree steps only): (tokens, parents, logp, copied, on the accepted path)."""

    def add_step(self, position: int, proposals: list[int], logp: list[float], accepted: int, version: int,
                 seconds: float, copied: bool = False, tree=None, path: list[int] | None = None) -> None:
        """One verify step; ``tree`` (a ``TokenTree``) and ``path`` (its accepted nodes) for tree steps."""
        self.steps.append((position, proposals, logp, accepted, version, seconds, copied))
        if tree is not None:
            kept = set(path or []) | {0}
            self.trees.append((list(tree.tokens), list(tree.parents), list(tree.logp),
                               [src == COPY for src in tree.source], [i in kept for i in range(len(tree))]))

    def add_plain_step(self, position: int, version: int, seconds: float, root: int | None = None) -> None:
        """A step that proposed nothing: ``add_step`` with no proposals (and, for a tree decoder's trace,
        whose steps each carry a tree, the root-only tree of ``root``), built without a ``TokenTree``."""
        self.steps.append((position, [], [], 0, version, seconds, False))
        if root is not None:
            self.trees.append(([root], [-1], [0.0], [False], [True]))

    def finish(self, request_id: str, prompt_ids: list[int], output_ids: list[int], status: TraceStatus,
               finish_reason: str | None, greedy: bool) -> Trace:
        L = len(prompt_ids) + len(output_ids) - 1
        taps = torch.cat(self.taps)[:L] if self.taps else torch.zeros(0, 0, dtype=self.dtype)
        hidden = torch.cat(self.hidden)[:L] if self.hidden else torch.zeros(0, 0, dtype=self.dtype)
        stats = torch.cat(self.stats)[:L] if self.stats else torch.zeros(0, 3)
        K = max((len(s[1]) for s in self.steps), default=0)
        S = len(self.steps)
        proposals = torch.full((S, K), -1, dtype=torch.long)
        logp = torch.zeros(S, K)
        for i, (_, props, lp, *_rest) in enumerate(self.steps):
            proposals[i, :len(props)] = torch.tensor(props, dtype=torch.long)
            logp[i, :len(lp)] = torch.tensor(lp)
        col = lambda j, dt: torch.tensor([s[j] for s in self.steps], dtype=dt)  # noqa: E731
        tree = {}
        if self.trees:
            sizes = torch.tensor([len(t[0]) for t in self.trees], dtype=torch.long)
            flat = lambda j, dt: torch.tensor([x for t in self.trees for x in t[j]], dtype=dt)  # noqa: E731
            tree = dict(tree_offsets=torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
                        tree_tokens=flat(0, torch.long), tree_parents=flat(1, torch.long),
                        tree_logp=flat(2, torch.float32), tree_copied=flat(3, torch.bool),
                        tree_accepted=flat(4, torch.bool))
        return Trace(
            request_id=request_id, prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
            output_ids=torch.tensor(output_ids, dtype=torch.long), taps=taps, hidden=hidden,
            step_position=col(0, torch.long), proposals=proposals, behaviour_logp=logp,
            accepted=col(3, torch.long), lookahead=torch.tensor([len(s[1]) for s in self.steps], dtype=torch.long),
            policy_version=col(4, torch.long), step_time_s=col(5, torch.float32), copied=col(6, torch.bool),
            status=status, finish_reason=finish_reason, greedy=greedy, served_stats=stats,
            temperature=float(self.params.temperature), top_p=float(self.params.top_p), top_k=int(self.params.top_k), **tree,
        )
