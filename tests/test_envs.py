"""Envs: the single-slot env passes check_env; the vector env's rewards, losslessness and autoreset;
speculation control and its registrations; workloads; and an RLlib PPO smoke run."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import envs
from aurora_rl.engine import EngineConfig, LLMEngine, SamplingParams
from envs import (ClosedLoop, DomainShift, PoissonArrivals, Request, SpecDecodeEnv, SpecDecodeVectorEnv,
                  SpeculationControlEnv, TokenWorkload, WorkloadExhausted, as_request, random_prompts)
from envs.models import tiny_target

K = 3
V = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread, and 2 shared cores make OpenMP barriers stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_target(0)


def greedy_truth(target, prompts, params):
    outs = LLMEngine(target, EngineConfig(num_slots=2, max_len=64)).generate(prompts, params)
    return {tuple(p): o.output_ids for p, o in zip(prompts, outs)}


def propose(env, truth, corrupt=False):
    """Batched action: each running slot proposes its next K greedy tokens (shifted by one if corrupt)."""
    tokens, ks = np.zeros((env.num_envs, K), np.int64), np.zeros(env.num_envs, np.int64)
    for slot, seq in env.engine.scheduler.running.items():
        nxt = truth[tuple(seq.prompt_ids)][len(seq.output_ids):][:K]
        tokens[slot, : len(nxt)] = [(t + 1) % V if corrupt else t for t in nxt]
        ks[slot] = K
    return {"tokens": tokens, "k": ks}


def run_vector(target, prompts, params, corrupt=False, slots=2):
    truth = greedy_truth(target, prompts, params)
    env = SpecDecodeVectorEnv(target, TokenWorkload(prompts, params), num_slots=slots, max_lookahead=K, max_len=64)
    env.reset(seed=0)
    steps = []
    while not env.done:
        steps.append(env.step(propose(env, truth, corrupt)))
    return env, truth, steps


@pytest.mark.unit
def test_single_slot_env_passes_check_env(target):
    work = TokenWorkload(random_prompts(4, V, 0), SamplingParams(max_tokens=10, ignore_eos=True), cycle=True)
    env = SpecDecodeEnv(target, work, max_lookahead=K, max_len=64)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=1)
    assert obs in env.observation_space and obs["features"].shape == (3 * 64,)
    assert obs["position"] == len(work.requests[0].prompt_ids) and info["request_id"] == "req-0"
    # An episode is a request: it ends when max_tokens are out.
    done, n = False, 0
    while not done:
        _, reward, done, truncated, info = env.step({"tokens": np.zeros(K, np.int64), "k": 0})
        n += 1
        assert reward == 0.0 and not truncated
    assert n == 9 and info["finish_reason"] == "length" and env.outputs[-1].num_output_tokens == 10
    with pytest.raises(RuntimeError, match="reset"):
        env.step({"tokens": np.zeros(K, np.int64), "k": 0})


@pytest.mark.unit
def test_single_env_runs_out_of_a_finite_workload(target):
    env = SpecDecodeEnv(target, [([5, 6, 7], SamplingParams(max_tokens=1))], max_lookahead=K, max_len=64)
    with pytest.raises(WorkloadExhausted, match="ran out"):
        env.reset(seed=0)  # the only request finishes in its prefill: no episode can start
    assert env.stats["finished_at_prefill"] == 1 and env.outputs[0].output_ids


@pytest.mark.unit
def test_vector_env_greedy_proposals_earn_k_and_keep_outputs(target):
    prompts = random_prompts(5, V, 1)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (9, 17, 13, 9, 11)]
    env, truth, steps = run_vector(target, prompts, params)
    assert env.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    for obs, reward, term, trunc, info in steps:
        assert obs in env.observation_space and not trunc.any()
        np.testing.assert_array_equal(reward, info["accepted"])
        # Every verified proposal is accepted; only a request's last steps have less room than K.
        np.testing.assert_array_equal(reward, info["lookahead"])
    rewards = np.concatenate([s[1] for s in steps])
    assert (rewards == K).sum() > len(rewards) / 2
    assert {tuple(o.prompt_ids): o.output_ids for o in env.outputs} == truth
    assert sum(s[2].sum() for s in steps) == len(prompts) and env.stats["finished_at_prefill"] == 0


@pytest.mark.unit
def test_vector_env_wrong_proposals_earn_nothing_and_keep_outputs(target):
    prompts = random_prompts(3, V, 2)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    env, truth, steps = run_vector(target, prompts, params, corrupt=True)
    assert all((s[1] == 0).all() for s in steps)
    assert all(o.accepted_tokens == 0 and o.draft_tokens > 0 for o in env.outputs)
    assert {tuple(o.prompt_ids): o.output_ids for o in env.outputs} == truth


@pytest.mark.unit
def test_autoreset_admits_the_next_request_into_the_freed_slot(target):
    prompts = random_prompts(4, V, 3)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 30, 5, 30)]
    truth = greedy_truth(target, prompts, params)
    env = SpecDecodeVectorEnv(target, TokenWorkload(prompts, params), num_slots=2, max_lookahead=K, max_len=64)
    obs, info = env.reset(seed=0)
    assert info["request_id"].tolist() == ["req-0", "req-1"] and info["active"].all()
    obs, reward, term, trunc, info = env.step(propose(env, truth))  # slot 0: 1 + 2 tokens = max_tokens 3
    assert term.tolist() == [True, False] and reward.tolist() == [1.0, 3.0]
    assert info["_final_obs"].tolist() == [True, False] and info["final_info"]["request_id"][0] == "req-0"
    assert info["final_obs"][0]["position"] == len(prompts[0]) + 2
    # The same step already serves the next request in slot 0: its first observation after prefill.
    assert info["request_id"].tolist() == ["req-2", "req-1"]
    assert obs["position"][0] == len(prompts[2]) and obs["last_token"][0] == truth[tuple(prompts[2])][0]
    assert env.kept_features(0).shape == (len(prompts[2]), 3 * 64)
    while not env.done:
        obs, reward, term, trunc, info = env.step(propose(env, truth))
    assert not info["active"].any() and (obs["features"] == 0).all()
    obs, reward, term, trunc, info = env.step(propose(env, truth))  # idle slots: nothing happens
    assert not term.any() and (reward == 0).all()


@pytest.mark.unit
def test_vector_env_sampled_requests_and_bad_actions(target):
    prompts = random_prompts(3, V, 4)
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)]
    env = SpecDecodeVectorEnv(target, TokenWorkload(prompts, params), num_slots=2, max_lookahead=K, max_len=64)
    env.reset(seed=0)
    while not env.done:
        action = env.action_space.sample()
        _, reward, _, _, info = env.step(action)
        assert ((0 <= reward) & (reward <= info["lookahead"])).all()
    assert sorted(o.num_output_tokens for o in env.outputs) == [10, 10, 10]
    env.reset(seed=0)
    bad_k = {"tokens": np.zeros((2, K), np.int64), "k": np.array([K + 1, 0])}
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        env.step(bad_k)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        env.step({"tokens": np.full((2, K), V), "k": np.array([1, 0])})


@pytest.mark.unit
def test_speculation_control_env_steps_and_registrations():
    env = gym.make(envs.SPECULATION_CONTROL_ID, num_slots=2, max_lookahead=3, episode_steps=6, max_tokens=5)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and obs[0] == 1.0 and info["reference_tokens_per_s"] > 0
    for k in (0, 1, 2, 3, 0, 3):
        obs, reward, terminated, truncated, info = env.step(k)
        assert obs in env.observation_space and np.isfinite(reward) and reward > 0 and not terminated
        # Both slots draft k tokens unless a request is too close to max_tokens to keep them.
        assert info["drafted"] <= 2 * k and 0 <= info["accepted"] <= info["drafted"]
    assert truncated and obs[2] == 1.0 and obs[0] == 1.0  # last k / K; closed loop keeps the slots full
    assert env.unwrapped.stats["finished"] >= 2  # 5-token requests end within 6 steps and are replaced
    with pytest.raises(ValueError, match="out of range"):
        env.step(4)
    with pytest.raises(ValueError, match="unknown speculation-control config keys.*'slots'"):
        SpeculationControlEnv({"slots": 2})
    with pytest.raises(ValueError, match="choose one of"):
        SpeculationControlEnv(model="llama-70b")
    open_loop = SpeculationControlEnv(arrival="poisson", arrival_rate=5000.0, reference_tokens_per_s=100.0,
                                      num_slots=2, max_waiting=3)
    open_loop.reset(seed=0)
    for _ in range(5):
        obs, *_ = open_loop.step(1)
    assert obs[1] > 0 and open_loop.stats["dropped"] > 0  # a flooded queue is bounded, drops counted


@pytest.mark.unit
def test_workloads():
    a, b = random_prompts(3, V, 7), random_prompts(3, V, 7)
    assert a == b and all(2 <= t < V and 3 <= len(p) <= 12 for p in a for t in p)
    w = TokenWorkload(a, SamplingParams(max_tokens=4))
    assert [r.prompt_ids for r in w] == [tuple(p) for p in a] == [r.prompt_ids for r in w]  # re-iterable
    cyc = iter(TokenWorkload(a, cycle=True))
    assert [next(cyc).prompt_ids for _ in range(4)][3] == tuple(a[0])
    assert as_request(([1, 2], SamplingParams())) == Request((1, 2), SamplingParams())
    with pytest.raises(TypeError, match="Request or a"):
        as_request([1, 2])
    shift = DomainShift([("chat", 2), ("code", 1)])
    assert list(shift) == ["chat", "chat", "code"] and shift.boundaries() == [0, 2]
    with pytest.raises(ValueError, match="math"):
        DomainShift([("math", 3)])
    rng = np.random.default_rng(0)
    assert ClosedLoop(4).due(0.1, 3, rng) == 1 and ClosedLoop(4).due(0.1, 6, rng) == 0
    counts = [PoissonArrivals(100.0).due(0.1, 5, rng) for _ in range(2000)]
    assert abs(np.mean(counts) - 10.0) < 0.3 and PoissonArrivals(1e-9).due(0.1, 0, rng) == 1


class CharTokenizer:
    """Characters as token ids under a ChatML-like template (enough to check the workload wiring)."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return {"input_ids": self.encode(text)} if tokenize else text

    def encode(self, text, add_special_tokens=False):
        return [min(ord(c), 127) for c in text]


@pytest.mark.unit
def test_sharegpt_workload_follows_the_domain_shift():
    w = envs.sharegpt_workload(CharTokenizer(), [("chat", 2), ("code", 2), ("chat", 1)], seed=0)
    reqs = list(w)
    assert [r.domain for r in reqs] == ["chat", "chat", "code", "code", "chat"]
    assert len({r.prompt_ids for r in reqs}) == 5  # the second chat phase gets fresh prompts
    assert all(r.prompt_ids[-11:] == tuple(ord(c) for c in "<assistant>") for r in reqs)
    short = envs.sharegpt_workload(CharTokenizer(), [("chat", 5)], seed=0, max_prompt_tokens=120)
    assert len(short) == 5 and all(len(r.prompt_ids) <= 120 for r in short.requests)
    assert short.skipped["too_long"] > 0  # left out and counted, never truncated


@pytest.mark.unit
def test_envs_import_neither_ray_nor_the_learner():
    code = "import sys, envs; print(sorted(m for m in ('ray', 'algorithms', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.smoke
def test_rllib_ppo_trains_on_speculation_control():
    ray = pytest.importorskip("ray")
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    name = envs.register_rllib()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = (
            PPOConfig()
            .environment(name, env_config={"model": "tiny", "num_slots": 2, "episode_steps": 8, "max_tokens": 12})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=1, rollout_fragment_length=32)
            .learners(num_learners=0)
            .training(train_batch_size_per_learner=32, minibatch_size=16, num_epochs=1)
            .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[16]))
            .debugging(seed=0)
        )
        algo = config.build_algo()
        results = [algo.train() for _ in range(2)]
        algo.stop()
    finally:
        ray.shutdown()
    runners = results[-1]["env_runners"]
    assert runners["num_env_steps_sampled_lifetime"] >= 64 and runners["num_episodes"] > 0
    assert np.isfinite(runners["episode_return_mean"])
