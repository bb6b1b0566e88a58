"""Gymnasium views of the serving engine: token-level draft envs, speculation control, workloads.

- ``SpecDecodeVectorEnv``: each engine slot is an env; action = proposed tokens, reward = accepted
  count, autoreset = continuous batching (``AutoresetMode.SAME_STEP``).
- ``SpecDecodeEnv``: one slot as a plain ``gymnasium.Env`` (passes ``check_env``).
- ``SpeculationControlEnv``: action = lookahead k, reward = normalised tokens/s; registered with
  gymnasium as ``aurora_rl/SpeculationControl-v0`` on import, and with Ray Tune by ``register_rllib()``.
- ``envs.workloads``: requests, arrival processes, domain-shift schedules.

Ray is imported only inside ``register_rllib``.
"""

from __future__ import annotations

import gymnasium

from envs.models import ServingModels, build_models
from envs.serving import ProposalDecoder, SlotStep, SlotView, WorkloadExhausted
from envs.single_env import SpecDecodeEnv
from envs.spec_vector_env import SpecDecodeVectorEnv
from envs.speculation_control import SpeculationControlConfig, SpeculationControlEnv
from envs.workloads import (ClosedLoop, DomainShift, Phase, PoissonArrivals, Request, TokenWorkload, as_request,
                            make_arrivals, random_prompts, sharegpt_workload)

SPECULATION_CONTROL_ID = "aurora_rl/SpeculationControl-v0"

if SPECULATION_CONTROL_ID not in gymnasium.registry:
    # Wall-clock rewards: the same seed and actions do not give the same rewards.
    gymnasium.register(id=SPECULATION_CONTROL_ID, entry_point="envs.speculation_control:SpeculationControlEnv",
                       nondeterministic=True)


def register_rllib(name: str = SPECULATION_CONTROL_ID) -> str:
    """Register the speculation-control env with Ray Tune (for RLlib) under ``name``; returns the name.

    RLlib passes the algorithm's ``env_config`` dict, which becomes the ``SpeculationControlConfig``.
    """
    from ray.tune.registry import register_env

    register_env(name, _make_speculation_control)
    return name


def _make_speculation_control(env_config) -> SpeculationControlEnv:
    return SpeculationControlEnv(dict(env_config))


__all__ = [
    "SPECULATION_CONTROL_ID", "register_rllib",
    "SpecDecodeVectorEnv", "SpecDecodeEnv", "SpeculationControlEnv", "SpeculationControlConfig",
    "ProposalDecoder", "SlotStep", "SlotView", "WorkloadExhausted", "ServingModels", "build_models",
    "Request", "as_request", "TokenWorkload", "random_prompts", "sharegpt_workload", "DomainShift", "Phase",
    "ClosedLoop", "PoissonArrivals", "make_arrivals",
]
