"""Speculative decoding with an EAGLE3 draft: propose k tokens, verify k+1 in one target pass, roll back.

``SpecDecoder`` is the engine's speculative ``Decoder`` and coordinates one step per running row:
choose the row's lookahead k (or, with token trees, its node budget), ask the proposer for k tokens
(``aurora_rl.engine.chain_proposer``: a draft chain, or a copy from the context or from earlier
requests' outputs, ``aurora_rl.engine.traffic_copy``; trees in
``aurora_rl.engine.tree_step``), run the k+1 positions of all rows in one batched target pass, let the
verifier's accept rule (``aurora_rl.engine.verify``: greedy or lossless rejection sampling) keep a
prefix plus one target token, roll the target cache back past the first rejection by a length reset,
feed (or queue) the kept positions to the draft, count, record the trace row
(``aurora_rl.engine.trace_capture``) and commit the tokens.

A row at k = 0 runs no draft work: its kept positions wait in the proposer's queue until it drafts
again, so an adaptive lookahead can fall back to plain decoding for free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from aurora_rl.engine.chain_proposer import ChainProposer
from aurora_rl.engine.sampling import sample_tokens, sample_with_stats
from aurora_rl.engine.sequence import Sequence
from aurora_rl.engine.spec_math import Verdict
from aurora_rl.engine.token_tree import MAX_TREE_NODES
from aurora_rl.engine.trace import Trace
from aurora_rl.engine.trace_capture import TraceCapture
from aurora_rl.engine.traffic_copy import TrafficIndex
from aurora_rl.engine.tree_proposer import TreeProposer
from aurora_rl.engine.tree_step import decode_trees
from aurora_rl.engine.verify import verify_chains
from aurora_rl.models.draft import Eagle3Draft
from aurora_rl.models.kv_cache import SlotKVCache


@dataclass(slots=True)
class SpecConfig:
    """Speculation settings of one engine."""

    lookahead: int = 4
    """Default draft tokens per step (a request's ``lookahead`` overrides it; 0 disables)."""
    capture_traces: bool = True
    """Record traces (features, proposals, acceptances) for the learner."""
    trace_dtype: str = "bfloat16"
    """Dtype of stored features in traces."""
    context_copy: bool = False
    """Propose by copying from the request's own context where its last tokens occurred before
    (``aurora_rl.engine.context_copy``); the draft proposes where they did not."""
    copy_min_match: int = 2
    """Shortest suffix that may be matched for a copy."""
    copy_max_match: int = 4
    """Longest suffix tried first."""
    copy_max_tokens: int = 0
    """Most tokens a copy may propose (0: ``lookahead``). A copy's k comes from the lookahead controller
    (an adaptive one picks it apart from the draft's) or, without one, is ``lookahead``."""
    traffic_copy: bool = False
    """Where the context offers no copy, copy from the traffic: what the target wrote after the row's last
    tokens in earlier requests' outputs (``aurora_rl.engine.traffic_copy``, learned as requests finish).
    Needs ``context_copy``; the same ``copy_max_tokens``."""
    traffic_min_match: int = 2
    """Shortest suffix that may be matched for a traffic copy. Short matches are right less often (below),
    but served they still add accepted tokens: with 4 instead of 2, the ``make demo`` draft's accept length
    on held-out code fell from 1.79 to 1.75 (tree + traffic), 1.50 to 1.49 (chain 4) and 1.28 to 1.16
    (adaptive chain), at no measurable change in speed (``experiments/results/traffic_s16_gate4``)."""
    traffic_max_match: int = 8
    """Longest suffix looked up in the traffic index (tried first). Longer matches are right more often:
    on greedy SmolLM2 code traffic the first copied token was the target's 29% of the time after a
    2-token match and 73% after 6 or more (session 15, offline)."""
    traffic_window: int = 50_000
    """Output tokens the traffic index keeps (the most recent ones; at most about 1 KB each with match lengths 2-8)."""
    tree_topk: int = 0
    """Token trees (``aurora_rl.engine.tree_step``): children per expanded draft node, EAGLE-2's top-k
    (SGLang's ``--speculative-eagle-topk``). 0 proposes one chain per row (``lookahead`` tokens)."""
    tree_budget: int = 8
    """Proposed nodes per row and step in a tree, copies included (SGLang's
    ``--speculative-num-draft-tokens`` is this plus the root). A lookahead controller that picks budgets
    overrides it per step; 0 is plain decoding."""
    tree_depth: int = 5
    """Deepest draft expansion of a tree (SGLang's ``--speculative-num-steps``); copies may go deeper."""

    def __post_init__(self) -> None:
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")
        if self.copy_max_tokens < 0:
            raise ValueError(f"copy_max_tokens must be >= 0, got {self.copy_max_tokens}")
        if self.copy_max_tokens == 0:
            self.copy_max_tokens = self.lookahead
        if not 1 <= self.copy_min_match <= self.copy_max_match:
            raise ValueError(f"need 1 <= copy_min_match <= copy_max_match, got copy_min_match={self.copy_min_match}, "
                             f"copy_max_match={self.copy_max_match}")
        if self.tree_topk < 0 or self.tree_budget < 0 or self.tree_depth < 1:
            raise ValueError(f"need tree_topk >= 0, tree_budget >= 0 and tree_depth >= 1, got tree_topk="
                             f"{self.tree_topk}, tree_budget={self.tree_budget}, tree_depth={self.tree_depth}")
        if self.tree_budget > MAX_TREE_NODES - 1:
            raise ValueError(f"tree_budget={self.tree_budget}: a tree holds at most {MAX_TREE_NODES - 1} proposals")
        if self.traffic_copy and not self.context_copy:
            raise ValueError("traffic_copy needs context_copy: traffic copies are tried where the row's own context "
                             "offers none (set context_copy=true, or traffic_copy=false)")
        if not 1 <= self.traffic_min_match <= self.traffic_max_match:
            raise ValueError(f"need 1 <= traffic_min_match <= traffic_max_match, got traffic_min_match="
                             f"{self.traffic_min_match}, traffic_max_match={self.traffic_max_match}")
        if self.traffic_window < 2:
            raise ValueError(f"traffic_window must be >= 2 tokens, got {self.traffic_window}")
        if self.trace_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"trace_dtype={self.trace_dtype!r}; choose bfloat16, float16 or float32")



class SpecDecoder:
    """The engine's speculative ``Decoder`` (see ``aurora_rl.engine.engine.Decoder``)."""

    proposer_type: type[ChainProposer] = ChainProposer
    """The chain proposer a decoder builds (tests put an oracle in its place)."""

    def __init__(self, draft: Eagle3Draft, num_slots: int, max_len: int, config: SpecConfig | None = None,
                 trace_sink: Callable[[Trace], None] | None = None, policy_version: int = 0) -> None:
        self.config = cfg = config or SpecConfig()
        self.traffic = (TrafficIndex(cfg.traffic_min_match, cfg.traffic_max_match, cfg.traffic_window)
                        if cfg.traffic_copy else None)
        self.proposer = self.proposer_type(draft, num_slots, max_len, cfg.context_copy, cfg.copy_min_match,
                                           cfg.copy_max_match, cfg.copy_max_tokens, traffic=self.traffic)
        self.traces = TraceCapture(cfg.capture_traces, getattr(torch, cfg.trace_dtype), trace_sink)
        self.policy_version = policy_version
        self.lookahead_fn: Callable[[list[Sequence]], list[int]] | None = None
        self.depth_proposed: list[int] = []
        """Proposals made at depth j (index j-1), over the decoder's life."""
        self.depth_accepted: list[int] = []
        """Proposals accepted at depth j (index j-1)."""
        self.copy_steps = 0
        """Row-steps whose proposals were copied from the context rather than drafted."""
        self.copy_proposed = 0
        self.copy_accepted = 0
        self.copy_depth_proposed: list[int] = []
        """Of ``depth_proposed``, the copied proposals (the draft's are the difference)."""
        self.copy_depth_accepted: list[int] = []
        self.tree_proposer = (TreeProposer(self.draft, self.cache, cfg.tree_topk, cfg.tree_depth)
                              if cfg.tree_topk > 0 else None)
        self.tree_nodes = 0
        """Tree nodes proposed (verified) over the decoder's life, roots excluded."""

    @property
    def draft(self) -> Eagle3Draft:
        """The serving draft."""
        return self.proposer.draft

    @property
    def cache(self) -> SlotKVCache:
        """The draft's KV cache."""
        return self.proposer.cache

    @property
    def draft_calls(self) -> int:
        """Draft forward passes (extends, chain steps and tree expansions) over the decoder's life."""
        return self.proposer.draft_calls + (self.tree_proposer.draft_calls if self.tree_proposer else 0)

    @property
    def catch_up_s(self) -> float:
        """Seconds spent feeding queued positions to the draft (the deferred cost of k = 0 steps)."""
        return self.proposer.catch_up_s

    # ---- hot swap -------------------------------------------------------------------------------
    def load_draft_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Swap in new draft weights at a step boundary; slots in flight keep their caches.

        Keys/values already cached were computed by the old weights; they are rebuilt as positions are
        re-fed after the next rejection, and losslessness never depends on the draft. A state may carry a
        new vocabulary (``d2t``/``t2d``, from a learner that refreshes it): the depth-1 logits held for
        slots in flight move to the new rows (a token new to the vocabulary gets -inf until the slot's
        next feed, or all get 0 when no token stays), so their next proposals mean the same tokens.
        """
        self.proposer.load_state(state)
        self.policy_version = version

    def swap_draft(self, draft: Eagle3Draft, version: int) -> Eagle3Draft:
        """Serve ``draft`` (built and validated off the engine thread, ``aurora_rl.engine.hot_swap``) from
        the next step on: a reference swap at a step boundary, so no step ever sees two versions' weights.
        Caches and held logits stay, as in ``load_draft_state``. Returns the old draft: the caller frees
        it elsewhere (freeing its tensors here took ~20 ms for the SmolLM2 draft)."""
        old = self.proposer.swap(draft)
        if self.tree_proposer is not None:  # trees are expanded by the same draft that is fed
            self.tree_proposer.draft = draft
        self.policy_version = version
        return old

    # ---- Decoder protocol -----------------------------------------------------------------------
    def prefill(self, engine, seqs: list[Sequence]) -> None:
        for seq in seqs:
            out = engine.runner.extend([seq.slot], [seq.prompt_ids], last_only=True, with_taps=True)
            (tok,) = sample_tokens(out.logits, [seq.params], [seq.generator])
            self.traces.open(seq, out.taps[0], out.hidden[0], out.logits[:1])
            self.proposer.defer(seq.slot, 0, seq.prompt_ids[1:] + [tok], out.taps[0, : len(seq.prompt_ids)],
                               copy=False)
            engine.append_tokens(seq, [tok])

    def decode(self, engine, seqs: list[Sequence]) -> None:
        if self.tree_proposer is not None:
            return decode_trees(self, engine, seqs)
        t0 = time.perf_counter()
        cands = self.proposer.copies(seqs)
        ks = self._lookaheads(engine, seqs, [bool(c) for c in cands])
        if not any(ks):
            return self.plain_step(engine, seqs, t0)
        copies = [c[:k] for c, k in zip(cands, ks)]
        drafted = [k if not c else 0 for k, c in zip(ks, copies)]
        self.proposer.catch_up([s for s, k in zip(seqs, drafted) if k > 0])
        chains = self.proposer.propose(seqs, drafted)
        props, logps, qs = chains.proposals, chains.logp, chains.qs
        for b, c in enumerate(copies):
            if c:  # a deterministic proposal: behaviour log-prob 0, q one-hot (see _verify)
                props[b], logps[b], ks[b] = c, [0.0] * len(c), len(c)
        starts = [int(engine.runner.lengths[s.slot]) for s in seqs]
        out = engine.runner.extend([s.slot for s in seqs], [[s.last_token] + p for s, p in zip(seqs, props)],
                                   with_taps=True)
        verdicts = self._verify(seqs, ks, props, qs, out.logits, copies)
        new_tokens, kept_taps = [], []
        for b, (seq, v) in enumerate(zip(seqs, verdicts)):
            engine.runner.truncate(seq.slot, starts[b] + 1 + v.accepted)
            new_tokens.append(props[b][: v.accepted] + [v.next_token])
            kept_taps.append(out.taps[b, : v.accepted + 1])
        self._feed_draft(seqs, [k > 0 for k in drafted], starts, new_tokens, kept_taps)
        dt = time.perf_counter() - t0
        self._count_depths(ks, verdicts, copies)
        for b, (seq, v) in enumerate(zip(seqs, verdicts)):
            seq.verify_steps += 1
            seq.draft_tokens += ks[b]
            seq.accepted_tokens += v.accepted
            if copies[b]:
                self.copy_steps += 1
                self.copy_proposed += ks[b]
                self.copy_accepted += v.accepted
            self.traces.chain_step(seq, out, b, starts[b], props[b], logps[b], v.accepted, self.policy_version, dt,
                                   copied=bool(copies[b]))
            engine.append_tokens(seq, new_tokens[b])

    def plain_step(self, engine, seqs: list[Sequence], t0: float) -> None:
        """A step in which no row proposes (k = 0, or tree budget 0, for every row): one target token per
        row as ``PlainDecoder`` makes it, plus only what the learner and a later drafting step need (the
        kept position's taps queued for the draft, the trace row; a tree decoder's trace gets the step's
        root-only tree, one tree per step as its other steps have). No verify bookkeeping, no tree pass."""
        lengths = engine.runner.lengths.tolist()
        starts = [lengths[s.slot] for s in seqs]
        out = engine.runner.extend([s.slot for s in seqs], [[s.last_token] for s in seqs], with_taps=True)
        logits, params, generators = out.logits[:, 0], [s.params for s in seqs], [s.generator for s in seqs]
        if self.traces.records_any(seqs):  # tokens and every row's served stats from one read of the logits
            tokens, stats = sample_with_stats(logits, params, generators)
        else:
            tokens, stats = sample_tokens(logits, params, generators), None
        dt = time.perf_counter() - t0
        # Per-row views in one call per tensor: a step's per-row work is list indexing, not tensor indexing.
        taps, hidden = out.taps.unbind(0), out.hidden.unbind(0)
        rows = [None] * len(seqs) if stats is None else stats.view(len(seqs), 1, 3).unbind(0)
        for b, (seq, tok) in enumerate(zip(seqs, tokens)):
            self.proposer.defer(seq.slot, starts[b], [tok], taps[b], copy=False)
            seq.verify_steps += 1
            self.traces.plain_row(seq, taps[b], hidden[b], rows[b], starts[b], self.policy_version, dt,
                                  tree=self.tree_proposer is not None)
            engine.append_tokens(seq, [tok])

    def release(self, engine, seq: Sequence) -> None:
        self.proposer.release(seq.slot)
        self.traces.close(seq)
        if self.traffic is not None:  # what the target wrote: later requests may copy from it
            self.traffic.add(seq.output_ids)

    # ---- internals ------------------------------------------------------------------------------
    def _feed_draft(self, seqs: list[Sequence], drafted: list[bool], starts: list[int], new_tokens: list[list[int]],
                    kept_taps: list) -> None:
        """Rows that drafted this step feed their kept positions to the draft in one call; the others
        queue them for the next step they draft."""
        fed = [b for b, d in enumerate(drafted) if d]
        for b in (b for b, d in enumerate(drafted) if not d):
            self.proposer.defer(seqs[b].slot, starts[b], new_tokens[b], kept_taps[b])
        if fed:
            self.proposer.extend([seqs[b] for b in fed], [new_tokens[b] for b in fed], [kept_taps[b] for b in fed],
                                 [starts[b] for b in fed])

    def _count_depths(self, ks: list[int], verdicts: list[Verdict], copies: list[list[int]]) -> None:
        grow = max(ks, default=0) - len(self.depth_proposed)
        if grow > 0:
            for counts in (self.depth_proposed, self.depth_accepted, self.copy_depth_proposed,
                           self.copy_depth_accepted):
                counts += [0] * grow
        for k, v, c in zip(ks, verdicts, copies):
            for j in range(k):
                self.depth_proposed[j] += 1
                self.depth_accepted[j] += j < v.accepted
                if c:
                    self.copy_depth_proposed[j] += 1
                    self.copy_depth_accepted[j] += j < v.accepted

    def _lookaheads(self, engine, seqs: list[Sequence], copyable: list[bool]) -> list[int]:
        fn = self.lookahead_fn
        if fn is None:
            wanted = [self.config.lookahead if s.params.lookahead is None else s.params.lookahead for s in seqs]
        elif getattr(fn, "splits_copies", False):  # a controller that picks k apart for rows that copy
            wanted = fn(seqs, copyable)
        else:
            wanted = fn(seqs)
        # Never draft past max_tokens or the context: those proposals could not be kept.
        return [max(0, min(k, seq.room(engine.config.max_len))) for seq, k in zip(seqs, wanted)]

    def _tree_budgets(self, engine, seqs: list[Sequence], copies: list[list[int]] | None = None) -> list[int]:
        """Per row, the step's node budget: the controller's (one that ``picks_tree_budget``; one that
        ``splits_copies`` is told each row's copy length), else the config's; a request's ``lookahead`` = 0
        turns it off. Capped by the cache room and ``room``."""
        fn = self.lookahead_fn
        if fn is not None and getattr(fn, "picks_tree_budget", False):
            wanted = (fn(seqs, [len(c) for c in copies]) if copies is not None and getattr(fn, "splits_copies", False)
                      else fn(seqs))
        else:
            wanted = [0 if s.params.lookahead == 0 else self.config.tree_budget for s in seqs]
        max_len, lengths = engine.config.max_len, engine.runner.lengths.tolist()
        return [0 if seq.room(max_len) <= 0 else max(0, min(n, max_len - lengths[seq.slot] - 1))
                for seq, n in zip(seqs, wanted)]

    def _verify(self, seqs, ks, props, qs, target_logits: torch.Tensor,
                copies: list[list[int]] | None = None) -> list[Verdict]:
        def draft_q(b: int, vocab: int) -> torch.Tensor:
            q = torch.zeros(ks[b], vocab)
            if copies and copies[b]:  # copied tokens were proposed with certainty
                q[torch.arange(ks[b]), torch.tensor(props[b])] = 1.0
            elif ks[b]:
                q[:, self.draft.draft_to_target] = torch.stack(qs[b])
            return q

        return verify_chains(seqs, props, target_logits, draft_q)
