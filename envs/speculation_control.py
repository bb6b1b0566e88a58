"""Speculation control as a gymnasium env: choose the lookahead k for the next engine step.

A real ``LLMEngine`` with the EAGLE3 ``SpecDecoder`` serves a workload under an arrival process; the
action sets k for every running request of the next step (through ``SpecDecoder.lookahead_fn``).

- Action: ``Discrete(K + 1)``, k = 0 (no speculation) .. K = ``max_lookahead``.
- Observation: ``Box(0, 1, (5 + K,), float32)``:
  [0] running / slots; [1] waiting / (waiting + slots); [2] last k / K;
  [3] EMA of accepted tokens per running request per step, / K;
  [4] EMA of the reward squashed as x / (1 + x) (0.5 = plain-decoding throughput);
  [5 + j] EMA of the acceptance rate at depth j + 1 given a proposal at that depth.
- Reward: output tokens the step emitted (decode and the first tokens of admitted requests) over the
  step's wall time, divided by ``reference_tokens_per_s``. By default that reference is measured at
  construction: plain decoding (k = 0) with every slot busy, so a reward of 1 means "as fast as no
  speculation at full batch" and rewards are O(1) on any machine.
- Episode: ``episode_steps`` engine steps, then ``truncated`` (the traffic goes on; it is a time
  limit). ``reset`` aborts in-flight requests (counted in ``stats["aborted"]``); with a seed it also
  restarts the workload and reseeds the arrivals. Wall-clock rewards make the env nondeterministic.
- Config (``SpeculationControlConfig``; unknown keys are errors): ``model="tiny"`` builds a tiny
  random target and draft from ``seed`` (RLlib builds envs in its workers), ``"smollm2"`` the embedded
  SmolLM2-135M with ShareGPT prompts of ``domain``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from aurora_rl.engine.engine import EngineConfig, LLMEngine, set_threads
from aurora_rl.engine.sampling import SamplingParams
from aurora_rl.engine.speculative import SpecConfig, SpecDecoder
from envs.models import MODEL_NAMES, build_models
from envs.serving import RequestFeed, abort_all
from envs.workloads import TokenWorkload, make_arrivals, random_prompts, sharegpt_workload


@dataclass(slots=True)
class SpeculationControlConfig:
    """Settings of the speculation-control env."""

    model: str = "tiny"
    """``tiny`` (random, built from ``seed``) or ``smollm2`` (the embedded target, ShareGPT traffic)."""
    seed: int = 0
    """Seeds the model weights (tiny), the prompts and the arrivals."""
    num_slots: int = 4
    """Engine slots (maximum batch)."""
    max_len: int = 128
    """Context per request."""
    max_lookahead: int = 4
    """K: the largest k the policy may choose."""
    draft_vocab_size: int | None = 64
    """Rows of the random draft's head; None = the target's whole vocabulary."""
    max_tokens: int = 24
    """Tokens generated per request."""
    temperature: float = 0.0
    """Sampling temperature of the requests (0 = greedy)."""
    num_prompts: int = 32
    """Distinct prompts, served cyclically."""
    domain: str = "chat"
    """ShareGPT domain of the prompts (smollm2 only)."""
    arrival: str = "closed"
    """``closed`` (always full: a finished request is replaced at once) or ``poisson``."""
    arrival_rate: float = 20.0
    """Requests per second for ``poisson``."""
    max_waiting: int = 64
    """Queue bound; arrivals beyond it are dropped and counted in ``stats["dropped"]``."""
    episode_steps: int = 32
    """Engine steps per episode."""
    ema_decay: float = 0.9
    """Weight of the past in the acceptance and reward averages of the observation."""
    reference_tokens_per_s: float | None = None
    """Reward scale; None measures plain decoding at full batch when the env is built."""
    calibration_steps: int = 4
    """Timed plain-decoding steps for the reference."""
    num_threads: int | None = None
    """Torch intra-op threads of the process that builds the env (RLlib env runners); None leaves it."""

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model={self.model!r}; choose one of {MODEL_NAMES}")
        if self.max_lookahead < 1:
            raise ValueError(f"max_lookahead must be >= 1, got {self.max_lookahead}")
        if self.episode_steps < 1 or self.num_prompts < 1 or self.calibration_steps < 1:
            raise ValueError("episode_steps, num_prompts and calibration_steps must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.reference_tokens_per_s is not None and not self.reference_tokens_per_s > 0:
            raise ValueError(f"reference_tokens_per_s must be > 0, got {self.reference_tokens_per_s}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SpeculationControlConfig":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown speculation-control config keys {unknown}; valid: {valid}")
        return cls(**values)


class SpeculationControlEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, config: Mapping[str, Any] | SpeculationControlConfig | None = None, **overrides: Any) -> None:
        if isinstance(config, SpeculationControlConfig):
            config = dataclasses.asdict(config)
        cfg = self.config = SpeculationControlConfig.from_dict({**dict(config or {}), **overrides})
        set_threads(cfg.num_threads)
        models = build_models(cfg.model, cfg.seed, cfg.draft_vocab_size)
        self.decoder = SpecDecoder(models.draft, cfg.num_slots, cfg.max_len,
                                   SpecConfig(lookahead=cfg.max_lookahead, capture_traces=False))
        self.decoder.lookahead_fn = lambda seqs: [self._k] * len(seqs)
        self.engine = LLMEngine(models.target, EngineConfig(cfg.num_slots, cfg.max_len), models.tokenizer,
                                decoder=self.decoder)
        self.workload = self._make_workload(models)
        self.feed = RequestFeed(self.workload)
        self.arrivals = make_arrivals(cfg.arrival, cfg.num_slots, cfg.arrival_rate)
        K = cfg.max_lookahead
        self.action_space = gym.spaces.Discrete(K + 1)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (5 + K,), np.float32)
        self.stats = {"aborted": 0, "dropped": 0, "finished": 0, "steps": 0}
        self.reference_tokens_per_s = cfg.reference_tokens_per_s or self._calibrate()
        self._reset_state()

    def _make_workload(self, models) -> TokenWorkload:
        cfg = self.config
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                ignore_eos=cfg.model == "tiny")
        if cfg.model == "tiny":
            vocab = models.target.config.vocab_size
            return TokenWorkload(random_prompts(cfg.num_prompts, vocab, cfg.seed), params, cycle=True)
        return sharegpt_workload(models.tokenizer, [(cfg.domain, cfg.num_prompts)], cfg.seed, params, cycle=True,
                                 max_prompt_tokens=cfg.max_len - cfg.max_tokens)

    def _calibrate(self) -> float:
        """Tokens/s of plain decoding (k = 0) with every slot busy, timed after the prefill step."""
        self._k = 0
        RequestFeed(self.workload, prefix="calibrate-").submit(self.engine, self.config.num_slots)
        self.engine.step()
        tokens, seconds = 0, 0.0
        for _ in range(self.config.calibration_steps):
            tokens += len(self.engine.scheduler.running)  # k = 0: one token per running request
            t0 = time.perf_counter()
            self.engine.step()
            seconds += time.perf_counter() - t0
        abort_all(self.engine)
        return tokens / max(seconds, 1e-9)

    def _reset_state(self) -> None:
        K = self.config.max_lookahead
        self._k = 0
        self._t = 0
        self._ema_accept_len = 0.0
        self._ema_reward = 0.0
        self._ema_depth = np.zeros(K, np.float64)

    # ---- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.stats["aborted"] += abort_all(self.engine)
        if seed is not None or self.feed.pulled == 0:
            self.feed.restart()
        self._reset_state()
        self._arrive(0.0)
        self.engine.step()  # admit and prefill the first requests
        return self._obs(), {"reference_tokens_per_s": self.reference_tokens_per_s}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        k = int(action)
        if not 0 <= k <= self.config.max_lookahead:
            raise ValueError(f"action k={action!r} out of range; choose 0..{self.config.max_lookahead}")
        self._k = k
        before = [(seq, len(seq.output_ids), seq.draft_tokens, seq.accepted_tokens)
                  for seq in self.engine.scheduler.running.values()]
        t0 = time.perf_counter()
        outs = self.engine.step()
        dt = time.perf_counter() - t0
        emitted = self._emitted(before, outs)
        reward = emitted / max(dt, 1e-9) / self.reference_tokens_per_s
        drafted, accepted = self._update_stats(before, reward)
        self.stats["finished"] += len(outs)
        self.stats["steps"] += 1
        self._arrive(dt)
        self._t += 1
        info = {"lookahead": k, "tokens": emitted, "step_s": dt, "drafted": drafted, "accepted": accepted,
                "finished": len(outs), "running": len(self.engine.scheduler.running),
                "waiting": len(self.engine.scheduler.waiting)}
        return self._obs(), float(reward), False, self._t >= self.config.episode_steps, info

    def close(self) -> None:
        self.stats["aborted"] += abort_all(self.engine)

    # ---- internals -------------------------------------------------------------------------------
    def _emitted(self, before: list, outs) -> int:
        """Output tokens this step: growth of the requests that were running plus all of the new ones."""
        grown = sum(len(seq.output_ids) - n for seq, n, _, _ in before)
        old = {seq.request_id for seq, *_ in before}
        new = [s for s in self.engine.scheduler.running.values() if s.request_id not in old]
        return grown + sum(len(s.output_ids) for s in new) + sum(
            o.num_output_tokens for o in outs if o.request_id not in old)

    def _update_stats(self, before: list, reward: float) -> tuple[int, int]:
        K, a = self.config.max_lookahead, self.config.ema_decay
        ks = np.array([seq.draft_tokens - d for seq, _, d, _ in before], dtype=np.int64)
        acc = np.array([seq.accepted_tokens - c for seq, _, _, c in before], dtype=np.int64)
        if ks.size:
            self._ema_accept_len = a * self._ema_accept_len + (1 - a) * float(acc.mean()) / K
            for j in range(1, K + 1):
                tried = ks >= j
                if tried.any():
                    rate = float((acc[tried] >= j).mean())
                    self._ema_depth[j - 1] = a * self._ema_depth[j - 1] + (1 - a) * rate
        self._ema_reward = a * self._ema_reward + (1 - a) * reward
        return int(ks.sum()), int(acc.sum())

    def _arrive(self, dt: float) -> None:
        sched = self.engine.scheduler
        due = self.arrivals.due(dt, len(sched.running) + len(sched.waiting), self.np_random)
        room = max(0, self.config.max_waiting + self.config.num_slots - len(sched.running) - len(sched.waiting))
        added = self.feed.submit(self.engine, min(due, room))
        self.stats["dropped"] += due - added

    def _obs(self) -> np.ndarray:
        sched, n = self.engine.scheduler, self.config.num_slots
        K = self.config.max_lookahead
        head = [len(sched.running) / n, len(sched.waiting) / (len(sched.waiting) + n), self._k / K,
                min(self._ema_accept_len, 1.0), self._ema_reward / (1.0 + self._ema_reward)]
        return np.clip(np.array(head + self._ema_depth.tolist(), np.float32), 0.0, 1.0)
