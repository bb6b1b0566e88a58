"""Chain proposer: the draft's side of a step, per slot: depth-1 outputs, lazy feeding, chains, copies.

The proposer owns the EAGLE3 draft and its KV cache. After each verify step the draft is fed the
target's features of the kept positions (EAGLE3: target features for accepted positions, its own
hidden state for deeper ones), which also yields its depth-1 output for the slot's next step; a chain
of k proposals then runs k - 1 more draft passes from it (``propose``).

The draft is fed lazily: a row that does not draft this step (k = 0, a copying row, and every row
right after its prefill) only queues its kept positions (``defer``), and the queue is fed to the draft
in one call the next time that row drafts (``catch_up``). A step where no row drafts therefore runs no
draft work at all and costs what plain decoding costs (plus trace capture), which is what lets an
adaptive lookahead fall back to k = 0 for free.

Invariant between steps: draft cache length + queued positions == target cache length == tokens - 1
for every slot; the slot's depth-1 draft output is current only when nothing is queued.

Copy proposals (``aurora_rl.engine.context_copy``) are here too: one context index per slot, kept in
step with the request's committed tokens, and, where the context offers none, the engine's traffic index
of earlier outputs (``aurora_rl.engine.traffic_copy``). The proposer never looks at the target or decides what is
accepted: the decoder (``aurora_rl.engine.speculative``) does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from aurora_rl.engine.context_copy import ContextIndex
from aurora_rl.engine.traffic_copy import TrafficIndex
from aurora_rl.engine.sampling import processed_probs, sample_from
from aurora_rl.engine.sequence import Sequence
from aurora_rl.models import cpu_kernels
from aurora_rl.models.draft import Eagle3Draft


@dataclass
class SlotState:
    """The draft's depth-1 output for a slot's next step: logits over the draft vocab and hidden."""

    logits: torch.Tensor
    hidden: torch.Tensor


@dataclass
class Pending:
    """Kept positions of a slot not yet fed to the draft: tokens from ``start`` on, and their taps."""

    start: int
    tokens: list[int]
    taps: list[torch.Tensor]


@dataclass
class Chains:
    """One step's drafted chains, per row: target ids, behaviour log-probs, and the sampled rows' q.

    ``qs[b]`` holds the draft-vocab distribution each of row b's proposals was drawn from (empty for
    greedy rows, whose proposals are argmaxes)."""

    proposals: list[list[int]]
    logp: list[list[float]]
    qs: list[list[torch.Tensor]]


class ChainProposer:
    """The draft, its cache and its per-slot state; chains and copies on request (module docstring)."""

    def __init__(self, draft: Eagle3Draft, num_slots: int, max_len: int, context_copy: bool = False,
                 copy_min_match: int = 2, copy_max_match: int = 4, copy_max_tokens: int = 0,
                 traffic: TrafficIndex | None = None) -> None:
        self.draft = draft.eval()
        self.traffic = traffic
        """Earlier requests' outputs, asked where a row's own context offers no copy (None: off)."""
        self.traffic_copies = 0
        """Row-steps whose copy came from the traffic index, over the proposer's life."""
        self.cache = draft.new_cache(num_slots, max_len)
        self.context_copy = context_copy
        self.copy_min_match, self.copy_max_match, self.copy_max_tokens = copy_min_match, copy_max_match, copy_max_tokens
        self.state: dict[int, SlotState] = {}
        self.pending: dict[int, Pending] = {}
        self._copy: dict[int, ContextIndex] = {}
        self.draft_calls = 0
        """Draft forward passes (extends and chain steps) over the proposer's life."""
        self.catch_up_s = 0.0
        """Seconds spent feeding queued positions to the draft (the deferred cost of k = 0 steps)."""

    # ---- hot swap -------------------------------------------------------------------------------
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the serving draft's tensors; held logits follow a new vocabulary."""
        with torch.no_grad():
            old_vocab = self.draft.draft_to_target.clone() if "d2t" in state else None
            for name, t in state.items():
                self._draft_tensor(name).copy_(t)
            if old_vocab is not None and not torch.equal(old_vocab, self.draft.draft_to_target):
                self._remap_slot_logits(old_vocab)

    def swap(self, draft: Eagle3Draft) -> Eagle3Draft:
        """Serve ``draft`` from now on (a reference swap); held logits follow a new vocabulary. Returns
        the old draft."""
        old = self.draft
        old_vocab = old.draft_to_target
        self.draft = draft.eval()
        if not torch.equal(old_vocab, draft.draft_to_target):
            self._remap_slot_logits(old_vocab)
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
        for st in self.state.values():
            moved = torch.full_like(st.logits, fill)
            moved[..., kept] = st.logits[..., old_rows[kept]]
            st.logits = moved

    # ---- per slot -------------------------------------------------------------------------------
    def release(self, slot: int) -> None:
        """Forget a finished slot: its held output, its queue, its context index, its draft cache."""
        self.state.pop(slot, None)
        self.pending.pop(slot, None)
        self._copy.pop(slot, None)
        self.cache.lengths[slot] = 0

    def copies(self, seqs: list[Sequence]) -> list[list[int]]:
        """Per row, the longest proposal chain its context offers (``copy_max_tokens`` at most), else the
        traffic index's where one is attached ([] where nothing matches or copies are off): the step uses
        its first k tokens, k chosen for copying rows."""
        if not self.context_copy:
            return [[] for _ in seqs]
        out = []
        for seq in seqs:
            index = self._copy.get(seq.slot)
            if index is None:
                index = self._copy[seq.slot] = ContextIndex(self.copy_min_match, self.copy_max_match)
            index.sync(seq.prompt_ids, seq.output_ids)
            chain = index.propose(self.copy_max_tokens)
            if not chain and self.traffic is not None:
                chain = self.traffic.propose(index.tokens, self.copy_max_tokens)
                self.traffic_copies += bool(chain)
            out.append(chain)
        return out

    def defer(self, slot: int, start: int, tokens: list[int], taps: torch.Tensor, copy: bool = True) -> None:
        """Queue kept positions (``tokens`` from ``start`` on, with their target taps) for the draft. The taps
        are copied, so that a verify pass's rejected positions are not kept alive, unless ``copy`` is false
        (a prefill's or a plain step's: every position of the pass is queued, nothing would be freed)."""
        pending = self.pending.get(slot)
        if pending is None:
            pending = self.pending[slot] = Pending(start, [], [])
        elif start != pending.start + len(pending.tokens):
            raise RuntimeError(f"slot {slot}: queued draft positions end at {pending.start + len(pending.tokens)}, "
                               f"new ones start at {start}")
        pending.tokens += tokens
        if copy or taps.shape[0] != len(tokens):
            taps = taps[: len(tokens)].clone() if copy else taps[: len(tokens)]
        pending.taps.append(taps)
        self.state.pop(slot, None)

    def catch_up(self, seqs: list[Sequence]) -> None:
        """Feed the queued positions of those of ``seqs`` that have any to the draft in one batched call."""
        seqs = [s for s in seqs if s.slot in self.pending]
        if not seqs:
            return
        t0 = time.perf_counter()
        queued = [self.pending.pop(s.slot) for s in seqs]
        self.extend(seqs, [q.tokens for q in queued], [torch.cat(q.taps) for q in queued], [q.start for q in queued])
        self.catch_up_s += time.perf_counter() - t0

    def extend(self, seqs: list[Sequence], tokens: list[list[int]], taps, starts: list[int]) -> None:
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
            self.state[seq.slot] = SlotState(out.logits[b], out.hidden[b])

    # ---- proposals ------------------------------------------------------------------------------
    def draft_probs(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """The distribution a token tree is expanded by: the request's processed distribution, or the
        draft's softmax at temperature 1 for greedy requests (a ranking only: greedy tree nodes are chosen
        deterministically, not drawn, so they are no behaviour distribution for an importance ratio)."""
        if seq.params.greedy:
            return torch.softmax(logits.float(), -1)
        return processed_probs(logits, seq.params)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Chains:
        """Chains of ``ks[b]`` proposals from each row's depth-1 output (rows with k > 0 caught up)."""
        chains = Chains([[] for _ in seqs], [[] for _ in seqs], [[] for _ in seqs])
        if not any(ks):
            return chains
        props, logps, qs = chains.proposals, chains.logp, chains.qs
        d2t = self.draft.draft_to_target
        logits = {b: self.state[s.slot].logits for b, s in enumerate(seqs) if ks[b] > 0}
        hidden = {b: self.state[s.slot].hidden for b, s in enumerate(seqs) if ks[b] > 0}
        for depth in range(1, max(ks, default=0) + 1):
            rows = [b for b, k in enumerate(ks) if k >= depth]
            for b in rows:
                seq = seqs[b]
                if seq.params.greedy:  # a point mass at the argmax: its behaviour log-prob is log 1
                    d, logp = int(cpu_kernels.argmax(logits[b])), 0.0
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
        return chains
