"""The serving engine as a gymnasium vector env: each slot is an env, the draft policy acts for all.

Contract (see ``envs.serving`` for the engine side):
- ``num_envs`` = engine slots. Episode = one request; reward = proposals the target accepted.
- Action per slot: ``{"tokens": MultiDiscrete([V] * K), "k": Discrete(K + 1)}``: the first ``k`` of
  ``tokens`` are the proposal (the rest is ignored). Batched: ``tokens`` [N, K], ``k`` [N]. A slot
  near the end of its request has its proposal clipped to the room left (``info["lookahead"]``).
- Observation per slot: ``{"last_token": Discrete(V), "position": Discrete(max_len),
  "features": Box float32 [3H]}``; batched: [N], [N], [N, 3H]. Idle slots observe zeros.
- ``step`` verifies every running slot's proposal in ONE batched target forward, then the engine
  frees finished slots and admits the next requests into them within the same ``engine.step()``
  (continuous batching). That is gymnasium's ``AutoresetMode.SAME_STEP``: a slot whose request ended
  returns ``terminated=True``, its reward for the last step, and already the new request's first
  observation; the finished request's last observation and info are in ``info["final_obs"]`` /
  ``info["final_info"]`` (masks ``_final_obs`` / ``_final_info``), exactly as ``SyncVectorEnv`` does.
  Every request end is a termination (EOS, stop or max_tokens alike: the request is gone);
  ``truncations`` are always False.
- A request that finishes in its own prefill (max_tokens=1, EOS first) never occupies a step: it is
  served, counted in ``stats["finished_at_prefill"]`` and its slot is refilled on the next step.
- When the workload runs dry, freed slots stay idle: ``info["active"]`` is False, reward 0, never
  terminated; ``done`` is True once nothing is running or queued.
- ``info`` per step: ``active``, ``request_id`` (current occupant, "" when idle), ``accepted``,
  ``lookahead``, ``emitted`` (tokens appended). Finished requests' outputs collect in ``outputs``;
  ``kept_features(slot)`` is a no-copy view of the taps of the positions the last step kept.
- ``reset(seed=...)`` aborts whatever is in flight (counted in ``stats["aborted"]``) and, when a seed
  is given (or on the first reset), restarts the workload; without a seed it continues with the next
  requests. Up to ``num_slots`` requests wait in the engine's queue so that any freed slot can refill.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from aurora_rl.engine.engine import EngineConfig, LLMEngine
from aurora_rl.engine.sequence import RequestOutput
from aurora_rl.models.target import TargetModel
from envs.serving import (ProposalDecoder, RequestFeed, SlotStep, abort_all, check_proposals, observation,
                          slot_action_space, slot_observation_space)
from envs.workloads import Request


class SpecDecodeVectorEnv(VectorEnv):
    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, target: TargetModel, workload: Iterable[Request | tuple], num_slots: int = 4,
                 max_lookahead: int = 4, max_len: int = 256, tokenizer: Any = None) -> None:
        if max_lookahead < 0:
            raise ValueError(f"max_lookahead must be >= 0, got {max_lookahead}")
        self.decoder = ProposalDecoder()
        self.engine = LLMEngine(target, EngineConfig(num_slots=num_slots, max_len=max_len), tokenizer,
                                decoder=self.decoder)
        self.feed = RequestFeed(workload)
        self.num_envs = num_slots
        self.max_lookahead = max_lookahead
        cfg = target.config
        self.vocab_size = cfg.vocab_size
        self.feature_size = len(cfg.tap_layers) * cfg.hidden_size
        self.single_observation_space = slot_observation_space(cfg.vocab_size, max_len, self.feature_size)
        self.single_action_space = slot_action_space(cfg.vocab_size, max_lookahead)
        self.observation_space = batch_space(self.single_observation_space, num_slots)
        self.action_space = batch_space(self.single_action_space, num_slots)
        self.outputs: list[RequestOutput] = []
        self.stats = {"aborted": 0, "finished_at_prefill": 0, "steps": 0}

    @property
    def done(self) -> bool:
        """The workload is exhausted and nothing is running or queued."""
        return self.feed.exhausted and not self.engine.has_work()

    def kept_features(self, slot: int) -> torch.Tensor:
        """Taps [n, 3H] of the positions the last step kept in ``slot`` (the prompt after a prefill)."""
        view = self.decoder.views.get(slot)
        if view is None:
            raise KeyError(f"slot {slot} has no request; running slots: {sorted(self.decoder.views)}")
        return view.kept_features

    # ---- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.stats["aborted"] += abort_all(self.engine)
        if seed is not None or self.feed.pulled == 0:
            self.feed.restart()
        self.decoder.steps.clear()
        self._serve()
        obs = self._batch_obs()
        infos: dict = {}
        for slot in range(self.num_envs):
            infos = self._add_info(infos, self._slot_info(slot, None), slot)
        return obs, infos

    def step(self, actions: dict) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        tokens = np.asarray(actions["tokens"], dtype=np.int64).reshape(self.num_envs, self.max_lookahead)
        ks = np.asarray(actions["k"], dtype=np.int64).reshape(self.num_envs)
        check_proposals(tokens, ks, self.vocab_size, self.max_lookahead)
        running = dict(self.engine.scheduler.running)
        self.decoder.proposals = {slot: tokens[slot, : ks[slot]].tolist() for slot in running}
        self.decoder.steps.clear()
        finished = {o.request_id: o for o in self._serve()}
        self.stats["steps"] += 1
        rewards = np.zeros(self.num_envs, np.float64)
        terminated = np.zeros(self.num_envs, np.bool_)
        infos: dict = {}
        for slot in range(self.num_envs):
            step = self.decoder.steps.get(slot)
            if step is not None:
                rewards[slot] = step.accepted
                out = finished.get(step.request_id)
                if out is not None:
                    terminated[slot] = True
                    final = {"final_obs": observation(step.view), "final_info": _final_info(step, out)}
                    infos = self._add_info(infos, final, slot)
            infos = self._add_info(infos, self._slot_info(slot, step), slot)
        return self._batch_obs(), rewards, terminated, np.zeros(self.num_envs, np.bool_), infos

    def close_extras(self, **kwargs: Any) -> None:
        self.stats["aborted"] += abort_all(self.engine)

    # ---- internals -------------------------------------------------------------------------------
    def _serve(self) -> list[RequestOutput]:
        """One engine step with the queue topped up so that every slot that frees can refill."""
        self.feed.submit(self.engine, self.num_envs - len(self.engine.scheduler.waiting))
        running = {s.request_id for s in self.engine.scheduler.running.values()}
        outs = self.engine.step()
        self.stats["finished_at_prefill"] += sum(o.request_id not in running for o in outs)
        self.outputs.extend(outs)
        return outs

    def _batch_obs(self) -> dict[str, np.ndarray]:
        obs = {"last_token": np.zeros(self.num_envs, np.int64), "position": np.zeros(self.num_envs, np.int64),
               "features": np.zeros((self.num_envs, self.feature_size), np.float32)}
        for slot, view in self.decoder.views.items():
            one = observation(view)
            for key in obs:
                obs[key][slot] = one[key]
        return obs

    def _slot_info(self, slot: int, step: SlotStep | None) -> dict:
        seq = self.engine.scheduler.running.get(slot)
        return {"active": seq is not None, "request_id": seq.request_id if seq is not None else "",
                "accepted": step.accepted if step else 0, "lookahead": step.lookahead if step else 0,
                "emitted": step.emitted if step else 0}


def _final_info(step: SlotStep, out: RequestOutput) -> dict:
    return {"request_id": out.request_id, "finish_reason": out.finish_reason,
            "num_output_tokens": out.num_output_tokens, "accept_length": out.accept_length}

