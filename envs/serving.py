"""The engine side of the token-level envs: a Decoder whose draft tokens come from outside, and spaces.

``ProposalDecoder`` plugs into ``LLMEngine`` (``aurora_rl.engine.engine.Decoder``) in place of the
EAGLE3 ``SpecDecoder``: before ``engine.step()`` the env puts each slot's proposed tokens in
``proposals``; ``decode`` verifies all rows in one batched target forward
(``ModelRunner.extend``), applies the accept rule (``greedy_verify_batch`` for greedy requests,
``rejection_verify`` with a point-mass draft q = one-hot(proposal) for sampled ones, which keeps the
output distribution exact), rolls rejected positions back with ``ModelRunner.truncate`` and records a
``SlotStep`` per slot. Proposals are clipped to the room a request has left (max_tokens, context), as
the SpecDecoder does. Scheduling, admission (continuous batching) and stopping stay the engine's.

Per slot it keeps what a draft policy observes next: the last token, its position (= the target's cache
length) and the tapped target features (low/middle/high layers concatenated, [3H]) of the last kept
position, i.e. the features whose next-token prediction is the last token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces

from aurora_rl.engine.sampling import sample_tokens
from aurora_rl.engine.sequence import Sequence
from aurora_rl.engine.spec_math import Verdict
from aurora_rl.engine.speculative import verify_chains
from envs.workloads import Request, as_request


@dataclass(slots=True)
class SlotView:
    """What a draft policy observes for one slot."""

    last_token: int
    position: int
    """Index of ``last_token`` in the request's tokens (= tokens in the target's cache)."""
    features: torch.Tensor
    """Target taps [3H] at ``position - 1``: the features that predicted ``last_token``."""
    kept_features: torch.Tensor
    """Taps [n, 3H] of every position the last step kept (the whole prompt after prefill): a view."""


@dataclass(slots=True)
class SlotStep:
    """What one verify step did for one slot."""

    request_id: str
    lookahead: int
    """Proposals verified (the action's count, clipped to the room the request has left)."""
    accepted: int
    """Proposals the target kept: the reward."""
    emitted: int
    """Tokens appended to the output (accepted + 1, fewer when the request stopped inside them)."""
    view: SlotView
    """The slot after the step (the terminal view when the request finished)."""


def room_left(seq: Sequence, max_len: int) -> int:
    """Most proposals a step can keep (``Sequence.room``)."""
    return seq.room(max_len)


class ProposalDecoder:
    """The engine's Decoder for envs: verifies externally proposed tokens (see the module docstring)."""

    def __init__(self) -> None:
        self.proposals: dict[int, list[int]] = {}
        """slot -> proposed target token ids for the next ``decode``; set by the env before each step."""
        self.views: dict[int, SlotView] = {}
        self.steps: dict[int, SlotStep] = {}
        """slot -> what the last ``decode`` did; the env clears it before each step."""

    def prefill(self, engine, seqs: list[Sequence]) -> None:
        for seq in seqs:
            out = engine.runner.extend([seq.slot], [seq.prompt_ids], last_only=True, with_taps=True)
            (tok,) = sample_tokens(out.logits, [seq.params], [seq.generator])
            taps = out.taps[0]
            self.views[seq.slot] = SlotView(tok, len(seq.prompt_ids), taps[-1].clone(), taps)
            engine.append_tokens(seq, [tok])

    def decode(self, engine, seqs: list[Sequence]) -> None:
        props = []
        for seq in seqs:
            k = max(0, min(len(self.proposals.get(seq.slot, ())), room_left(seq, engine.config.max_len)))
            props.append([int(t) for t in self.proposals.get(seq.slot, ())[:k]])
        starts = [int(engine.runner.lengths[s.slot]) for s in seqs]
        out = engine.runner.extend([s.slot for s in seqs], [[s.last_token] + p for s, p in zip(seqs, props)],
                                   with_taps=True)
        verdicts = verify(seqs, props, out.logits)
        for b, (seq, v) in enumerate(zip(seqs, verdicts)):
            engine.runner.truncate(seq.slot, starts[b] + 1 + v.accepted)
            seq.verify_steps += 1
            seq.draft_tokens += len(props[b])
            seq.accepted_tokens += v.accepted
            before = len(seq.output_ids)
            engine.append_tokens(seq, props[b][: v.accepted] + [v.next_token])
            view = SlotView(seq.last_token, starts[b] + 1 + v.accepted, out.taps[b, v.accepted].clone(),
                            out.taps[b, : v.accepted + 1])
            self.views[seq.slot] = view
            self.steps[seq.slot] = SlotStep(seq.request_id, len(props[b]), v.accepted,
                                            len(seq.output_ids) - before, view)

    def release(self, engine, seq: Sequence) -> None:
        self.views.pop(seq.slot, None)


def verify(seqs: list[Sequence], props: list[list[int]], logits: torch.Tensor) -> list[Verdict]:
    """The engine's accept rule; the policy's proposals are deterministic, so a sampled row's q is one-hot."""
    def point_mass(b: int, vocab: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(props[b], dtype=torch.long), vocab).float()

    return verify_chains(seqs, props, logits, point_mass)


class WorkloadExhausted(RuntimeError):
    """The workload has no request left where the env needs one."""


class RequestFeed:
    """Requests pulled lazily from a workload, with ids that restart with it.

    ``restart()`` calls ``iter(workload)`` again: a list or a workload from ``envs.workloads`` starts
    over, a plain iterator or generator simply continues.
    """

    def __init__(self, workload: Iterable[Request | tuple], prefix: str = "req-") -> None:
        self.workload = workload
        self.prefix = prefix
        self.pulled = 0
        self.exhausted = False
        self._it = None

    def restart(self) -> None:
        self._it, self.pulled, self.exhausted = iter(self.workload), 0, False

    def submit(self, engine, n: int) -> int:
        """Queue up to ``n`` requests in ``engine``; returns how many were queued."""
        if self._it is None:
            self.restart()
        added = 0
        while added < n and not self.exhausted:
            item = next(self._it, None)
            if item is None:
                self.exhausted = True
                break
            req = as_request(item)
            engine.add_request(list(req.prompt_ids), req.params, request_id=f"{self.prefix}{self.pulled}")
            self.pulled += 1
            added += 1
        return added


def abort_all(engine) -> int:
    """Abort every waiting and running request of ``engine``; returns how many."""
    ids = [s.request_id for s in engine.scheduler.waiting] + [s.request_id for s in engine.scheduler.running.values()]
    for rid in ids:
        engine.abort(rid)
    return len(ids)


# ---- spaces --------------------------------------------------------------------------------------
def slot_observation_space(vocab_size: int, max_len: int, feature_size: int) -> spaces.Dict:
    return spaces.Dict({
        "last_token": spaces.Discrete(vocab_size),
        "position": spaces.Discrete(max_len),
        # Hidden states are unbounded in principle; a finite bound keeps the Box well defined.
        "features": spaces.Box(-1e6, 1e6, (feature_size,), np.float32),
    })


def slot_action_space(vocab_size: int, max_lookahead: int) -> spaces.Dict:
    return spaces.Dict({
        "tokens": spaces.MultiDiscrete(np.full(max_lookahead, vocab_size, dtype=np.int64)),
        "k": spaces.Discrete(max_lookahead + 1),
    })


def observation(view: SlotView) -> dict:
    """A slot's observation (Discrete entries as numpy int64, features as float32 [3H])."""
    return {"last_token": np.int64(view.last_token), "position": np.int64(view.position),
            "features": view.features.float().numpy()}


def check_proposals(tokens: np.ndarray, ks: np.ndarray, vocab_size: int, max_lookahead: int) -> None:
    """Validate a batch of actions (tokens [N, K], ks [N]); errors name the bad values and the range."""
    if tokens.shape[-1] != max_lookahead:
        raise ValueError(f"action tokens have shape {tokens.shape}; expected [..., {max_lookahead}]")
    if ks.size and (ks.min() < 0 or ks.max() > max_lookahead):
        raise ValueError(f"action k must be in [0, {max_lookahead}]; got {ks.tolist()}")
    used = np.arange(max_lookahead) < ks[..., None]
    bad = tokens[used]
    if bad.size and (bad.min() < 0 or bad.max() >= vocab_size):
        raise ValueError(f"proposed token ids must be in [0, {vocab_size}); got min={bad.min()} max={bad.max()}")
