"""Speculative decoding with an EAGLE3 draft: propose k tokens, verify k+1 in one target pass, roll back.

Per engine step and running request: the draft proposes a chain of k tokens (k per request, 0 means
plain decoding), the target verifies the k+1 positions of all rows in one batched forward, the
accept rule (greedy or lossless rejection sampling) keeps a prefix plus one target token, and the
target and draft caches roll back past the first rejection by a length reset. The draft is then fed
the target's features of the kept positions (EAGLE3: target features for accepted positions, its own
hidden state for deeper ones), which also yields its depth-1 proposal for the next step.

The draft is fed lazily: a row that does not speculate this step (k = 0, and every row right after
its prefill) only queues its kept positions, and the queue is fed to the draft in one call the next
time that row proposes. A step where no row speculates therefore runs no draft work at all and costs
what plain decoding costs (plus trace capture), which is what lets an adaptive lookahead fall back to
k = 0 for free.

Invariant between steps: draft cache length + queued positions == target cache length == tokens - 1
for every slot; the slot's depth-1 draft output is current only when nothing is queued.
Traces (``aurora_rl.engine.trace``) are recorded here and handed to ``trace_sink`` on finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from aurora_rl.engine.context_copy import ContextIndex
from aurora_rl.engine.sampling import processed_probs, sample_from, sample_tokens
from aurora_rl.engine.sequence import Sequence, Status
from aurora_rl.engine.spec_math import Verdict
from aurora_rl.engine.token_tree import MAX_TREE_NODES
from aurora_rl.engine.trace import Trace, TraceRecorder, TraceStatus
from aurora_rl.engine.tree_proposer import TreeProposer
from aurora_rl.engine.tree_step import decode_trees
from aurora_rl.engine.verify import verify_chains
from aurora_rl.models.draft import Eagle3Draft

_TRACE_STATUS = {Status.FINISHED: TraceStatus.FINISHED, Status.ABORTED: TraceStatus.ABORTED,
                 Status.ERROR: TraceStatus.ERROR}


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
        if self.trace_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"trace_dtype={self.trace_dtype!r}; choose bfloat16, float16 or float32")


@dataclass
class _SlotState:
    """The draft's depth-1 output for a slot's next step: logits over the draft vocab and hidden."""

    logits: torch.Tensor
    hidden: torch.Tensor


@dataclass
class _Pending:
    """Kept positions of a slot not yet fed to the draft: tokens from ``start`` on, and their taps."""

    start: int
    tokens: list[int]
    taps: list[torch.Tensor]


class SpecDecoder:
    """The engine's speculative ``Decoder`` (see ``aurora_rl.engine.engine.Decoder``)."""

    def __init__(self, draft: Eagle3Draft, num_slots: int, max_len: int, config: SpecConfig | None = None,
                 trace_sink: Callable[[Trace], None] | None = None, policy_version: int = 0) -> None:
        self.config = config or SpecConfig()
        self.draft = draft.eval()
        self.cache = draft.new_cache(num_slots, max_len)
        self.trace_sink = trace_sink
        self.policy_version = policy_version
        self.lookahead_fn: Callable[[list[Sequence]], list[int]] | None = None
        self._state: dict[int, _SlotState] = {}
        self._pending: dict[int, _Pending] = {}
        self.draft_calls = 0
        """Draft forward passes (extends and chain steps) over the decoder's life."""
        self.catch_up_s = 0.0
        """Seconds spent feeding queued positions to the draft (the deferred cost of k = 0 steps)."""
        self._recorders: dict[str, TraceRecorder] = {}
        self._trace_dtype = getattr(torch, self.config.trace_dtype)
        self.depth_proposed: list[int] = []
        """Proposals made at depth j (index j-1), over the decoder's life."""
        self.depth_accepted: list[int] = []
        """Proposals accepted at depth j (index j-1)."""
        self._copy: dict[int, ContextIndex] = {}
        self.copy_steps = 0
        """Row-steps whose proposals were copied from the context rather than drafted."""
        self.copy_proposed = 0
        self.copy_accepted = 0
        self.copy_depth_proposed: list[int] = []
        """Of ``depth_proposed``, the copied proposals (the draft's are the difference)."""
        self.copy_depth_accepted: list[int] = []
        self.tree_proposer = (TreeProposer(self.draft, self.cache, self.config.tree_topk, self.config.tree_depth)
                              if self.config.tree_topk > 0 else None)
        self.tree_nodes = 0
        """Tree nodes proposed (verified) over the decoder's life, roots excluded."""

    # ---- hot swap -------------------------------------------------------------------------------
    def load_draft_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Swap in new draft weights at a step boundary; slots in flight keep their caches.

        Keys/values already cached were computed by the old weights; they are rebuilt as positions are
        re-fed after the next rejection, and losslessness never depends on the draft. A state may carry a
        new vocabulary (``d2t``/``t2d``, from a learner that refreshes it): the depth-1 logits held for
        slots in flight move to the new rows (a token new to the vocabulary gets -inf until the slot's
        next feed, or all get 0 when no token stays), so their next proposals mean the same tokens.
        """
        with torch.no_grad():
            old_vocab = self.draft.draft_to_target.clone() if "d2t" in state else None
            for name, t in state.items():
                self._draft_tensor(name).copy_(t)
            if old_vocab is not None and not torch.equal(old_vocab, self.draft.draft_to_target):
                self._remap_slot_logits(old_vocab)
        self.policy_version = version

    def swap_draft(self, draft: Eagle3Draft, version: int) -> Eagle3Draft:
        """Serve ``draft`` (built and validated off the engine thread, ``aurora_rl.engine.hot_swap``) from
        the next step on: a reference swap at a step boundary, so no step ever sees two versions' weights.
        Caches and held logits stay, as in ``load_draft_state``. Returns the old draft: the caller frees
        it elsewhere (freeing its tensors here took ~20 ms for the SmolLM2 draft)."""
        old = self.draft
        old_vocab = old.draft_to_target
        self.draft = draft.eval()
        if not torch.equal(old_vocab, draft.draft_to_target):
            self._remap_slot_logits(old_vocab)
        self.policy_version = version
        return old

    def _draft_tensor(self, name: str) -> torch.Tensor:
        try:
            return self.draft.get_parameter(name)
        except AttributeError:
            pass
        try:
            return self.draft.get_buffer(name)
        except AttributeError:
            raise KeyError(f"published draft state has {name!r}, which the serving draft does not have") from None

    def _remap_slot_logits(self, old_vocab: torch.Tensor) -> None:
        row_of = torch.full((self.draft.config.vocab_size,), -1, dtype=torch.long)
        row_of[old_vocab] = torch.arange(old_vocab.numel())
        old_rows = row_of[self.draft.draft_to_target]
        kept = old_rows >= 0
        # With no token kept there is nothing to move: flat logits (every -inf would sample NaN).
        fill = float("-inf") if bool(kept.any()) else 0.0
        for st in self._state.values():
            moved = torch.full_like(st.logits, fill)
            moved[..., kept] = st.logits[..., old_rows[kept]]
            st.logits = moved

    # ---- Decoder protocol -----------------------------------------------------------------------
    def prefill(self, engine, seqs: list[Sequence]) -> None:
        for seq in seqs:
            out = engine.runner.extend([seq.slot], [seq.prompt_ids], last_only=True, with_taps=True)
            (tok,) = sample_tokens(out.logits, [seq.params], [seq.generator])
            if self.config.capture_traces:
                rec = self._recorders[seq.request_id] = TraceRecorder(self._trace_dtype, seq.params)
                rec.add_positions(out.taps[0], out.hidden[0], out.logits[:1])
            self._defer(seq.slot, 0, seq.prompt_ids[1:] + [tok], out.taps[0, : len(seq.prompt_ids)])
            engine.append_tokens(seq, [tok])

    def decode(self, engine, seqs: list[Sequence]) -> None:
        if self.tree_proposer is not None:
            return decode_trees(self, engine, seqs)
        t0 = time.perf_counter()
        cands = self._copies(seqs)
        ks = self._lookaheads(engine, seqs, [bool(c) for c in cands])
        copies = [c[:k] for c, k in zip(cands, ks)]
        drafted = [k if not c else 0 for k, c in zip(ks, copies)]
        self._catch_up([s for s, k in zip(seqs, drafted) if k > 0 and s.slot in self._pending])
        props, logps, qs = self._propose(seqs, drafted)
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
        fed = [b for b, k in enumerate(drafted) if k > 0]
        for b in (b for b, k in enumerate(drafted) if k == 0):  # no draft pass this step: queue for the next
            self._defer(seqs[b].slot, starts[b], new_tokens[b], kept_taps[b])
        if fed:
            self._draft_extend([seqs[b] for b in fed], [new_tokens[b] for b in fed], [kept_taps[b] for b in fed],
                               [starts[b] for b in fed])
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
            rec = self._recorders.get(seq.request_id)
            if rec is not None:
                rec.add_positions(out.taps[b, : v.accepted + 1], out.hidden[b, : v.accepted + 1],
                                  out.logits[b, : v.accepted + 1])
                rec.add_step(starts[b] - 1, props[b], logps[b], v.accepted, self.policy_version, dt,
                             copied=bool(copies[b]))
            engine.append_tokens(seq, new_tokens[b])

    def _copies(self, seqs: list[Sequence]) -> list[list[int]]:
        """Per row, the longest proposal chain its context offers (``copy_max_tokens`` at most; [] where
        nothing matches or copies are off): the step uses its first k tokens, k chosen for copying rows."""
        if not self.config.context_copy:
            return [[] for _ in seqs]
        cfg, out = self.config, []
        for seq in seqs:
            index = self._copy.get(seq.slot)
            if index is None:
                index = self._copy[seq.slot] = ContextIndex(cfg.copy_min_match, cfg.copy_max_match)
            index.sync(seq.prompt_ids, seq.output_ids)
            out.append(index.propose(cfg.copy_max_tokens))
        return out

    def release(self, engine, seq: Sequence) -> None:
        self._state.pop(seq.slot, None)
        self._pending.pop(seq.slot, None)
        self._copy.pop(seq.slot, None)
        self.cache.lengths[seq.slot] = 0
        rec = self._recorders.pop(seq.request_id, None)
        if rec is not None and self.trace_sink is not None:
            status = _TRACE_STATUS.get(seq.status, TraceStatus.FINISHED)
            self.trace_sink(rec.finish(seq.request_id, seq.prompt_ids, seq.output_ids, status,
                                       seq.finish_reason, seq.params.greedy))

    # ---- internals ------------------------------------------------------------------------------
    def _defer(self, slot: int, start: int, tokens: list[int], taps: torch.Tensor) -> None:
        """Queue kept positions (``tokens`` from ``start`` on, with their target taps) for the draft."""
        pending = self._pending.get(slot)
        if pending is None:
            pending = self._pending[slot] = _Pending(start, [], [])
        elif start != pending.start + len(pending.tokens):
            raise RuntimeError(f"slot {slot}: queued draft positions end at {pending.start + len(pending.tokens)}, "
                               f"new ones start at {start}")
        pending.tokens += tokens
        pending.taps.append(taps[: len(tokens)].clone())
        self._state.pop(slot, None)

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Feed the queued positions of ``seqs`` to the draft in one batched call."""
        if not seqs:
            return
        t0 = time.perf_counter()
        queued = [self._pending.pop(s.slot) for s in seqs]
        self._draft_extend(seqs, [q.tokens for q in queued], [torch.cat(q.taps) for q in queued],
                           [q.start for q in queued])
        self.catch_up_s += time.perf_counter() - t0

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

    def _tree_budgets(self, engine, seqs: list[Sequence]) -> list[int]:
        """Per row, the step's node budget: the controller's (one that ``picks_tree_budget``), else the
        config's; a request's ``lookahead`` = 0 turns it off. Capped by the cache room and ``room``."""
        fn = self.lookahead_fn
        if fn is not None and getattr(fn, "picks_tree_budget", False):
            wanted = fn(seqs)
        else:
            wanted = [0 if s.params.lookahead == 0 else self.config.tree_budget for s in seqs]
        max_len = engine.config.max_len
        return [0 if seq.room(max_len) <= 0 else max(0, min(n, max_len - int(engine.runner.lengths[seq.slot]) - 1))
                for seq, n in zip(seqs, wanted)]

    def _draft_probs(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """The distribution a token tree is expanded by: the request's processed distribution, or the
        draft's softmax at temperature 1 for greedy requests (a ranking only: greedy tree nodes are chosen
        deterministically, not drawn, so they are no behaviour distribution for an importance ratio)."""
        if seq.params.greedy:
            return torch.softmax(logits.float(), -1)
        return processed_probs(logits, seq.params)

    def _propose(self, seqs: list[Sequence], ks: list[int]):
        """Chains of proposals (target ids), their behaviour log-probs, and q over the target vocab."""
        props: list[list[int]] = [[] for _ in seqs]
        logps: list[list[float]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        if not any(ks):
            return props, logps, qs
        d2t = self.draft.draft_to_target
        logits = {b: self._state[s.slot].logits for b, s in enumerate(seqs) if ks[b] > 0}
        hidden = {b: self._state[s.slot].hidden for b, s in enumerate(seqs) if ks[b] > 0}
        for depth in range(1, max(ks, default=0) + 1):
            rows = [b for b, k in enumerate(ks) if k >= depth]
            for b in rows:
                seq = seqs[b]
                if seq.params.greedy:  # a point mass at the argmax: its behaviour log-prob is log 1
                    d, logp = int(logits[b].argmax()), 0.0
                else:  # drawn from the draft's distribution under the request's temperature, top-k, top-p
                    probs = processed_probs(logits[b], seq.params)
                    d = int(sample_from(probs, seq.generator))
                    logp = float(torch.log(probs[d].clamp_min(1e-30)))
                    qs[b].append(probs)
                props[b].append(int(d2t[d]))
                logps[b].append(logp)
            rows = [b for b in rows if ks[b] > depth]
            if not rows:
                continue
            slots = torch.tensor([seqs[b].slot for b in rows])
            # The base is the last fed position i = length - 1; depth d + 1 runs at rope position
            # i + d, in a fresh cache entry (as training's TTT unroll and vLLM's EAGLE3 proposer do).
            # i + d - 1 here overwrote the target-feature key of the base with a chain key.
            pos = torch.tensor([[int(self.cache.lengths[seqs[b].slot]) + depth - 1] for b in rows])
            toks = torch.tensor([[props[b][-1]] for b in rows])
            h = torch.stack([hidden[b] for b in rows]).unsqueeze(1)
            with torch.inference_mode():
                out = self.draft(toks, h, pos, self.cache, slots)
            self.draft_calls += 1
            for i, b in enumerate(rows):
                logits[b], hidden[b] = out.logits[i, 0], out.hidden[i, 0]
        return props, logps, qs

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

    def _draft_extend(self, seqs: list[Sequence], tokens: list[list[int]], taps, starts: list[int]) -> None:
        """Feed kept positions (target features) to the draft; keep its depth-1 output per slot."""
        T = max(len(t) for t in tokens)
        H = self.draft.config.num_taps * self.draft.config.target_hidden_size
        feats = torch.zeros(len(seqs), T, H, dtype=self.draft.dtype)
        for b, t in enumerate(tokens):
            feats[b, : len(t)] = taps[b][: len(t)].to(self.draft.dtype)
        ids = torch.tensor([t + [t[-1]] * (T - len(t)) for t in tokens], dtype=torch.long)
        pos = (torch.tensor(starts).unsqueeze(1) + torch.arange(T)).clamp(max=self.cache.max_len - 1)
        slots = torch.tensor([s.slot for s in seqs])
        with torch.inference_mode():
            out = self.draft(ids, self.draft.fuse(feats), pos, self.cache, slots,
                             logit_index=torch.tensor([len(t) - 1 for t in tokens]))
        self.draft_calls += 1
        for b, (seq, t) in enumerate(zip(seqs, tokens)):
            self.cache.lengths[seq.slot] = starts[b] + len(t)
            self._state[seq.slot] = _SlotState(out.logits[b], out.hidden[b])
