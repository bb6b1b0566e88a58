"""``config.validate`` for ``engine.kind=sglang``: the SGLang server arguments and worker options are
checked at config time, before Ray or any actor starts, and every error names the config key."""

from __future__ import annotations

import pytest

from aurora_rl.config import ClusterSection, EngineSection, ModelSection, RunConfig, validate

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:30000"


def sglang_config(sglang: dict | None = None, rollout_gpus: float = 1.0, target: str = "meta-llama/Llama-3.1-8B",
                  **engine) -> RunConfig:
    return RunConfig(model=ModelSection(target=target),
                     engine=EngineSection(**{"kind": "sglang", "lookahead": 4, "adaptive_lookahead": False, "sglang": dict(sglang or {}), **engine}),
                     cluster=ClusterSection(rollout_gpus=rollout_gpus), output_dir="/tmp/aurora-rl-test")


def test_a_good_sglang_config_validates():
    validate(sglang_config({"tp_size": 2, "mem_fraction_static": 0.7, "dtype": "bfloat16"}, rollout_gpus=2))
    validate(sglang_config({"url": URL, "weight_poll_s": 0.5}, rollout_gpus=0, target="tiny"))


@pytest.mark.parametrize("sglang, match", [
    ({"tp_size": 0}, r"engine\.sglang\.tp_size must be >= 1, got 0"),
    ({"mem_fraction_static": 1.5}, r"engine\.sglang\.mem_fraction_static must be in \(0, 1\)"),
    ({"dtype": "fp8"}, r"engine\.sglang\.dtype='fp8' is not one of"),
    ({"port": 70000}, r"engine\.sglang\.port must be in 1\.\.65535"),
    ({"speculative_eagle_topk": 4, "speculative_num_draft_tokens": 30}, r"engine\.sglang\.speculative_num_draft_tokens"),
    ({"extra_args": ["--tp-size", "4"]}, r"engine\.sglang\.extra_args repeats \['--tp-size'\]"),
    ({"tp_sise": 2}, r"engine\.sglang\.tp_sise is not a valid key; valid: .*'tp_size'"),
    ({"speculative_num_steps": 3}, r"engine\.sglang\.speculative_num_steps is set from engine\.lookahead"),
    ({"model_path": "x"}, r"engine\.sglang\.model_path is set from model\.target"),
    ({"url": "127.0.0.1:30000"}, r"engine\.sglang\.url must start with http://"),
    ({"url": URL, "weight_poll_s": 0}, r"engine\.sglang\.weight_poll_s must be > 0"),
])
def test_bad_sglang_arguments_fail_naming_the_key(sglang, match):
    with pytest.raises(ValueError, match=match):
        validate(sglang_config(sglang))


@pytest.mark.parametrize("cfg, match", [
    (sglang_config(rollout_gpus=0), r"cluster\.rollout_gpus=0 is too few.*engine\.sglang\.tp_size=1"),
    (sglang_config({"tp_size": 2}, rollout_gpus=1), r"cluster\.rollout_gpus=1 is too few.*tp_size=2"),
    (sglang_config(target="tiny"), r"model\.target='tiny' cannot be loaded by SGLang.*engine\.sglang\.url"),
    (sglang_config(adaptive_lookahead=True), r"engine\.adaptive_lookahead"),
    (sglang_config(context_copy=True), r"engine\.context_copy=true is not supported"),
    (sglang_config(lookahead=0), r"engine\.lookahead=0"),
    (RunConfig(engine=EngineSection(sglang={"tp_size": 2}), output_dir="/tmp/x"), r"engine\.sglang=.*only read with "
                                                                                   r"engine\.kind=sglang"),
])
def test_sglang_cross_section_rules(cfg, match):
    with pytest.raises(ValueError, match=match):
        validate(cfg)


def test_the_command_line_refuses_a_bad_sglang_argument_at_config_time():
    from aurora_rl.cli import ConfigError
    from tests.test_cli import _run_config

    with pytest.raises(ConfigError, match=r"engine\.sglang\.tp_size must be >= 1, got 0"):
        _run_config(["engine=sglang", "cluster.rollout_gpus=1", "engine.sglang.tp_size=0"])


def test_the_driver_validates_before_starting_ray(tmp_path):
    import ray

    from aurora_rl.runtime.driver import run

    cfg = sglang_config({"tp_size": 0})
    cfg.output_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"engine\.sglang\.tp_size"):
        run(cfg)
    assert not ray.is_initialized() and not any(tmp_path.iterdir())
