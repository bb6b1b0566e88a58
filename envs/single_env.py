"""One slot of the serving engine as a plain ``gymnasium.Env``: one request per episode.

Same spaces, step and reward as one slot of ``SpecDecodeVectorEnv`` (see ``envs.serving``), without
autoreset: ``reset`` admits the next request of the workload and prefills it, each ``step`` verifies
one proposal (one target forward), and the episode terminates when the request finishes (EOS, stop or
max_tokens); the terminal observation is the finished request's last one. Call ``reset`` to go on.

Seeding: ``reset(seed=s)`` seeds ``np_random`` and restarts the workload from its first request, so
the same seed gives the same episodes; ``reset()`` takes the next request. Requests that finish in
their own prefill cannot form an episode: they are served, counted in ``stats["finished_at_prefill"]``
and skipped. A workload that runs dry raises ``WorkloadExhausted`` (use a cycling one for training).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import numpy as np

from aurora_rl.engine.engine import EngineConfig, LLMEngine
from aurora_rl.engine.sequence import RequestOutput
from aurora_rl.models.target import TargetModel
from envs.serving import (ProposalDecoder, RequestFeed, WorkloadExhausted, abort_all, check_proposals, observation,
                          slot_action_space, slot_observation_space)
from envs.workloads import Request

_SLOT = 0


class SpecDecodeEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, target: TargetModel, workload: Iterable[Request | tuple], max_lookahead: int = 4,
                 max_len: int = 256, tokenizer: Any = None) -> None:
        if max_lookahead < 0:
            raise ValueError(f"max_lookahead must be >= 0, got {max_lookahead}")
        self.decoder = ProposalDecoder()
        self.engine = LLMEngine(target, EngineConfig(num_slots=1, max_len=max_len), tokenizer, decoder=self.decoder)
        self.feed = RequestFeed(workload)
        self.max_lookahead = max_lookahead
        cfg = target.config
        self.vocab_size = cfg.vocab_size
        self.observation_space = slot_observation_space(cfg.vocab_size, max_len, len(cfg.tap_layers) * cfg.hidden_size)
        self.action_space = slot_action_space(cfg.vocab_size, max_lookahead)
        self.outputs: list[RequestOutput] = []
        self.stats = {"aborted": 0, "finished_at_prefill": 0}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.stats["aborted"] += abort_all(self.engine)
        if seed is not None or self.feed.pulled == 0:
            self.feed.restart()
        while _SLOT not in self.engine.scheduler.running:
            if not self.feed.submit(self.engine, 1):
                raise WorkloadExhausted(f"the workload ran out after {self.feed.pulled} requests; "
                                        "use a cycling workload or reset with a seed to start it over")
            outs = self.engine.step()
            self.outputs.extend(outs)
            self.stats["finished_at_prefill"] += len(outs)
        return observation(self.decoder.views[_SLOT]), self._info(None)

    def step(self, action: dict) -> tuple[dict, float, bool, bool, dict]:
        if _SLOT not in self.engine.scheduler.running:
            raise RuntimeError("no request is running: the episode ended, call reset()")
        tokens = np.asarray(action["tokens"], dtype=np.int64).reshape(1, self.max_lookahead)
        k = np.asarray(action["k"], dtype=np.int64).reshape(1)
        check_proposals(tokens, k, self.vocab_size, self.max_lookahead)
        self.decoder.proposals = {_SLOT: tokens[0, : k[0]].tolist()}
        self.decoder.steps.clear()
        outs = self.engine.step()
        self.outputs.extend(outs)
        step = self.decoder.steps[_SLOT]
        info = self._info(step)
        if outs:
            info["finish_reason"] = outs[0].finish_reason
        return observation(step.view), float(step.accepted), bool(outs), False, info

    def close(self) -> None:
        self.stats["aborted"] += abort_all(self.engine)

    def _info(self, step) -> dict:
        seq = self.engine.scheduler.running.get(_SLOT)
        rid = step.request_id if step is not None else seq.request_id
        return {"request_id": rid, "accepted": step.accepted if step else 0,
                "lookahead": step.lookahead if step else 0, "emitted": step.emitted if step else 0}
