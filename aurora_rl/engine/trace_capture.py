"""Trace capture: one ``TraceRecorder`` per request in flight, fed after every verify step, sunk on release.

The decoder opens a request's recorder at prefill (its prompt positions), adds each verify step's kept
positions and step row (``chain_step`` or ``tree_step``), and closes it when the request leaves its
slot, handing the finished ``Trace`` (``aurora_rl.engine.trace``) to the sink. With capture off nothing
is opened and every call is a dictionary miss.
"""

from __future__ import annotations

from typing import Callable

import torch

from aurora_rl.engine.sequence import Sequence, Status
from aurora_rl.engine.token_tree import TokenTree
from aurora_rl.engine.trace import Trace, TraceRecorder, TraceStatus

_TRACE_STATUS = {Status.FINISHED: TraceStatus.FINISHED, Status.ABORTED: TraceStatus.ABORTED,
                 Status.ERROR: TraceStatus.ERROR}


class TraceCapture:
    """The open traces of one decoder (module docstring)."""

    def __init__(self, enabled: bool, dtype: torch.dtype, sink: Callable[[Trace], None] | None = None) -> None:
        self.enabled, self.dtype, self.sink = enabled, dtype, sink
        self._open: dict[str, TraceRecorder] = {}

    def open(self, seq: Sequence, taps: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Start ``seq``'s trace with its prefill positions (``logits``: the last position's)."""
        if not self.enabled:
            return
        rec = self._open[seq.request_id] = TraceRecorder(self.dtype, seq.params)
        rec.add_positions(taps, hidden, logits)

    def records_any(self, seqs: list[Sequence]) -> bool:
        """Whether any of ``seqs`` has an open trace (a plain step then computes its rows' served stats in
        one batched call, ``sampling.sample_with_stats``)."""
        return self.enabled and any(s.request_id in self._open for s in seqs)

    def chain_step(self, seq: Sequence, out, b: int, start: int, proposals: list[int], logp: list[float],
                   accepted: int, version: int, seconds: float, copied: bool,
                   stats: torch.Tensor | None = None) -> None:
        """Row ``b`` of a chain verify pass ``out`` that started at target position ``start`` (``stats``:
        the kept positions' served stats, when the caller computed a batch's at once)."""
        rec = self._open.get(seq.request_id)
        if rec is None:
            return
        kept = accepted + 1
        rec.add_positions(out.taps[b, :kept], out.hidden[b, :kept], None if stats is not None else out.logits[b, :kept],
                          stats)
        rec.add_step(start - 1, proposals, logp, accepted, version, seconds, copied=copied)

    def plain_row(self, seq: Sequence, taps: torch.Tensor, hidden: torch.Tensor, stats: torch.Tensor | None,
                  start: int, version: int, seconds: float, tree: bool = False) -> None:
        """A plain step (no proposal) for ``seq``: its one kept position's ``taps`` [1, F], ``hidden`` [1, H]
        and served ``stats`` [1, 3], the step row with nothing proposed; with ``tree`` (a tree decoder's
        trace) the step's root-only tree too, as ``tree_step`` records it for a tree of one node."""
        rec = self._open.get(seq.request_id)
        if rec is None:
            return
        rec.add_positions(taps, hidden, None, stats)
        rec.add_plain_step(start - 1, version, seconds, seq.last_token if tree else None)

    def tree_step(self, seq: Sequence, out, b: int, start: int, tree: TokenTree, path: list[int], chain: list[int],
                  accepted: int, version: int, seconds: float, copied: bool, stats: torch.Tensor | None = None) -> None:
        """Row ``b`` of a tree verify pass: the kept ``path``, the whole tree, and its chain view ``chain``
        (``aurora_rl.engine.tree_step.chain_of``) in the chain columns; ``stats`` as in ``chain_step``."""
        rec = self._open.get(seq.request_id)
        if rec is None:
            return
        keep = [0] + path
        logits = None if out.logits is None or stats is not None else out.logits[b, keep]
        rec.add_positions(out.taps[b, keep], out.hidden[b, keep], logits, stats)
        # A greedy request's nodes are picked, not drawn: the chain columns log the point mass (0), as the
        # chain path does; tree_logp keeps the draft's scores the tree was ranked by.
        logp = [0.0] * len(chain) if seq.params.greedy else [tree.logp[i] for i in chain]
        rec.add_step(start - 1, [tree.tokens[i] for i in chain], logp, accepted, version, seconds, copied=copied,
                     tree=tree, path=path)

    def close(self, seq: Sequence) -> None:
        """Finish ``seq``'s trace, if one is open, and hand it to the sink."""
        rec = self._open.pop(seq.request_id, None)
        if rec is not None and self.sink is not None:
            status = _TRACE_STATUS.get(seq.status, TraceStatus.FINISHED)
            self.sink(rec.finish(seq.request_id, seq.prompt_ids, seq.output_ids, status, seq.finish_reason,
                                 seq.params.greedy))
