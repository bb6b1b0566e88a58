"""The Hydra config tree (``conf/``) and the ``aurora-rl`` command line.

Unit tests compose configs in-process with ``hydra.compose``; smoke tests run the real entry point in
a subprocess. Those that reach the runtime replace ``aurora_rl.runtime.driver`` with a stub that
records what it was given, so they test the CLI's wiring (validation first, run directories,
arguments passed on), not the runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aurora_rl.cli import CONF_DIR, ConfigError, ServeConfig, register_schemas, to_run_config
from aurora_rl.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("model", "engine", "algorithm", "learner", "workload", "buffer", "cluster", "eval")
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _compose(overrides: list[str] = (), config_name: str = "config", hydra_cfg: bool = False):
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # Hydra sets output_dir only when a job runs; compose() does not run one.
        extra = [] if hydra_cfg else ["output_dir=/tmp/aurora-rl-test"]
        return compose(config_name=config_name, overrides=[*overrides, *extra], return_hydra_config=hydra_cfg)


def _run_config(overrides: list[str] = (), config_name: str = "config") -> RunConfig:
    return to_run_config(_compose(overrides, config_name))


# ---- composition ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_default_config_validates_into_a_run_config():
    cfg = _run_config()
    assert type(cfg) is RunConfig
    assert (cfg.model.target, cfg.engine.kind, cfg.algorithm.name, cfg.workload.source) == (
        "smollm2", "native", "aurora", "sharegpt")
    assert cfg.cluster.address is None and cfg.output_dir == "/tmp/aurora-rl-test"


@pytest.mark.unit
@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes_and_validates(group, option):
    # engine=sglang launches a server per rollout worker, on GPUs reserved for that worker
    extra = ["cluster.rollout_gpus=1"] if (group, option) == ("engine", "sglang") else []
    cfg = _run_config([f"{group}={option}", *extra])
    if group == "algorithm":
        assert cfg.algorithm.name == option


@pytest.mark.unit
def test_group_options_set_their_section():
    tiny = _run_config(["model=tiny"]).model
    assert (tiny.target, tiny.dtype, tiny.draft_vocab_size) == ("tiny", "float32", 64)
    assert _run_config(["engine=sglang", "cluster.rollout_gpus=1"]).engine.kind == "sglang"
    assert _run_config(["cluster=existing"]).cluster.address == "auto"
    shift = _run_config(["workload=shift"]).workload
    assert [p["domain"] for p in shift.phases] == ["code", "chat", "non_english"]


@pytest.mark.unit
def test_algorithm_files_spell_out_the_documented_defaults():
    """Every algorithm's YAML lists its config dataclass's defaults, so users see what they can override."""
    import dataclasses

    from algorithms import get_algorithm, list_algorithms

    for name in list_algorithms():
        args = _run_config([f"algorithm={name}"]).algorithm.args
        defaults = dataclasses.asdict(get_algorithm(name).config_cls())
        assert args == defaults, name


@pytest.mark.unit
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = _run_config([f"experiment={experiment}"])
    assert cfg.name == experiment


@pytest.mark.unit
def test_day0_and_smoke_experiments():
    day0 = _run_config(["experiment=day0"])
    assert (day0.model.target, day0.workload.phases[0]["domain"], day0.algorithm.name) == ("smollm2", "code", "aurora")
    assert (day0.time_budget_s, day0.engine.num_slots, day0.engine.lookahead) == (600, 4, 4)
    smoke = _run_config(["experiment=smoke"])
    assert (smoke.model.target, smoke.workload.source) == ("tiny", "random")
    assert smoke.time_budget_s <= 30
    # Command-line overrides win over the experiment.
    assert _run_config(["experiment=smoke", "engine.lookahead=1"]).engine.lookahead == 1


@pytest.mark.unit
def test_sweep_experiments_declare_their_sweeps():
    cfg = _compose(["experiment=algorithms"], hydra_cfg=True)
    assert cfg.hydra.sweeper.params.algorithm == "aurora,eagle3_kl,osd,frozen"
    assert set(_compose(["experiment=throughput"], hydra_cfg=True).hydra.sweeper.params) == {
        "engine.num_slots", "engine.lookahead"}


@pytest.mark.unit
def test_run_and_sweep_directories():
    cfg = OmegaConf.to_container(_compose(["experiment=smoke"], hydra_cfg=True), resolve=False)
    assert cfg["hydra"]["run"]["dir"] == "outputs/${name}/${now:%Y-%m-%d_%H-%M-%S}"
    assert cfg["hydra"]["sweep"] == {"dir": "multirun/${name}/${now:%Y-%m-%d_%H-%M-%S}",
                                     "subdir": "${hydra.job.num}_${hydra.job.override_dirname}"}
    assert cfg["output_dir"] == "${hydra:runtime.output_dir}" and cfg["name"] == "smoke"


@pytest.mark.unit
def test_serve_config(monkeypatch):
    monkeypatch.delenv("AURORA_RL_API_KEY", raising=False)
    cfg = _run_config(["experiment=smoke", "serve.port=9001"], config_name="serve")
    assert isinstance(cfg, ServeConfig)
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.learn, cfg.serve.api_key) == ("127.0.0.1", 9001, True, None)
    assert cfg.model.target == "tiny"
    monkeypatch.setenv("AURORA_RL_API_KEY", "sk-test")
    assert _run_config([], config_name="serve").serve.api_key == "sk-test"
    with pytest.raises(HydraException, match="serve.port"):
        _compose(["serve.port=9001"])  # the run config has no serve section


# ---- bad overrides -------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("override,named", [
    ("engine.num_slotz=3", "num_slotz"),
    ("engine.num_slots=abc", "engine.num_slots"),
    ("algorithm=nope", "algorithm/nope"),
])
def test_hydra_rejects_bad_keys_types_and_options(override, named):
    with pytest.raises((HydraException, OmegaConfBaseException), match=named):
        _compose([override])


@pytest.mark.unit
@pytest.mark.parametrize("overrides,named", [
    (["buffer.policy=fifo"], "buffer.policy"),
    (["algorithm.args.rho_bar=0.5"], "rho_bar"),
    (["+algorithm.args.foo=1"], "foo"),
    (["engine.lookahead=9"], "engine.lookahead"),
    (["engine.num_slots=0"], "engine.num_slots"),
    (["eval.prompts=-1"], "eval.prompts"),
    (["workload.phases=[{domain: klingon, requests: 5}]"], "klingon"),
])
def test_validation_names_the_bad_key(overrides, named):
    with pytest.raises(ConfigError, match=named):
        _run_config(overrides)


# ---- the command line ----------------------------------------------------------------------------
STUB = textwrap.dedent("""
    import json, pathlib, sys, types
    calls = pathlib.Path(sys.argv.pop(1))
    stub = types.ModuleType("aurora_rl.runtime.driver")
    def run(cfg):
        pathlib.Path(cfg.output_dir, "stub_summary.json").write_text(json.dumps({"algorithm": cfg.algorithm.name}))
        calls.write_text(json.dumps({"run": cfg.output_dir}))
        return {"table": "STUB TABLE " + cfg.algorithm.name}
    def serve(cfg, host, port, learn, api_key=None, duration_s=None):
        calls.write_text(json.dumps({"serve": [host, port, learn, api_key, duration_s, type(cfg).__name__]}))
    stub.run, stub.serve = run, serve
    sys.modules[stub.__name__] = stub
    from aurora_rl.cli import main
    main()
""")


def _cli(args: list[str], cwd: Path, stub_calls: Path | None = None, env: dict | None = None):
    """Run the CLI: ``python -m aurora_rl.cli`` or, with ``stub_calls``, main() over a stub driver."""
    cmd = [sys.executable, "-c", STUB, str(stub_calls)] if stub_calls else [sys.executable, "-m", "aurora_rl.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.smoke
def test_help_lists_groups_and_subcommands(tmp_path):
    res = _cli(["--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    for text in ("aurora-rl serve", "aurora-rl offline", "experiment: ", "algorithm: aurora, eagle3_kl, frozen, osd"):
        assert text in res.stdout


@pytest.mark.smoke
@pytest.mark.parametrize("override,named,code", [
    ("engine.num_slotz=3", "engine.num_slotz", 1),
    ("engine.num_slots=abc", "engine.num_slots", 1),
    ("algorithm=nope", "algorithm/nope", 1),
    ("buffer.policy=fifo", "buffer.policy", 2),
    ("algorithm.args.rho_bar=0.5", "rho_bar", 2),
    ("engine.lookahead=9", "engine.lookahead", 2),
])
def test_bad_override_fails_before_the_runtime(tmp_path, override, named, code):
    calls = tmp_path / "calls.json"
    res = _cli(["experiment=smoke", override], tmp_path, stub_calls=calls)
    assert res.returncode == code, res.stdout + res.stderr
    assert named in res.stderr
    assert not calls.exists(), "the driver was called with a bad config"
    if code == 2:
        assert res.stderr.strip().count("\n") == 0, res.stderr  # one line


@pytest.mark.smoke
def test_multirun_gives_each_job_its_own_directory(tmp_path):
    """Each job's validated config reaches driver.run with output_dir = its own job directory."""
    sweep = tmp_path / "sweep"
    res = _cli(["-m", "experiment=smoke", "algorithm=aurora,frozen", f"hydra.sweep.dir={sweep}"],
               tmp_path, stub_calls=tmp_path / "calls.json")
    assert res.returncode == 0, res.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_algorithm=aurora,experiment=smoke", "1_algorithm=frozen,experiment=smoke"]
    for job, algorithm in zip(jobs, ("aurora", "frozen")):
        assert json.loads((sweep / job / "stub_summary.json").read_text()) == {"algorithm": algorithm}
        assert (sweep / job / ".hydra" / "config.yaml").exists()
        assert f"STUB TABLE {algorithm}" in res.stdout and f"run directory: {sweep / job}" in res.stdout


@pytest.mark.smoke
def test_serve_passes_the_serve_section(tmp_path):
    calls = tmp_path / "calls.json"
    res = _cli(["serve", "experiment=smoke", "serve.port=9123", "serve.learn=false", "hydra.run.dir=srv"],
               tmp_path, stub_calls=calls, env={"AURORA_RL_API_KEY": "sk-test"})
    assert res.returncode == 0, res.stderr
    assert json.loads(calls.read_text())["serve"] == ["127.0.0.1", 9123, False, "sk-test", None, "ServeConfig"]
    # A key given on the command line or in a file reaches the server and no file of the run folder.
    res = _cli(["serve", "experiment=smoke", "serve.api_key=sk-literal-override", "hydra.run.dir=srv2"],
               tmp_path, stub_calls=calls)
    assert res.returncode == 0, res.stderr
    assert json.loads(calls.read_text())["serve"][3] == "sk-literal-override"
    (tmp_path / "key.txt").write_text("sk-from-file\n")
    res = _cli(["serve", "experiment=smoke", f"serve.api_key_file={tmp_path / 'key.txt'}", "hydra.run.dir=srv3"],
               tmp_path, stub_calls=calls)
    assert res.returncode == 0, res.stderr
    assert json.loads(calls.read_text())["serve"][3] == "sk-from-file"
    for run, key in (("srv", "sk-test"), ("srv2", "sk-literal-override"), ("srv3", "sk-from-file")):
        files = [p for p in (tmp_path / run).rglob("*") if p.is_file()]
        assert tmp_path / run / "config.yaml" in files
        assert not [p for p in files if key in p.read_text(errors="replace")], run
    assert "<redacted>" in (tmp_path / "srv2" / "config.yaml").read_text()


@pytest.mark.smoke
def test_offline_subcommand_forwards_its_arguments(tmp_path):
    res = _cli(["offline", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--traces" in res.stdout


@pytest.mark.smoke
def test_real_multirun_writes_readable_tensorboard_per_job(tmp_path):
    """`aurora-rl -m` with the real driver: each job has its own directory and event file."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = [sys.executable, "-m", "aurora_rl.cli", "-m", "experiment=smoke", "seed=0,1", "max_requests=8",
           "eval.enabled=false", f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    events = sorted(tmp_path.glob("*/tb/events.out.tfevents.*"))
    assert len(events) == 2 and events[0].parent.parent != events[1].parent.parent
    for e in events:
        acc = EventAccumulator(str(e)).Reload()
        assert len(acc.Scalars("serve/accept_length")) == 8
