"""Typed configuration of a run: one dataclass per config group, registered in Hydra's ConfigStore.

Groups (YAML under ``conf/``): model, engine, algorithm, learner, workload, buffer, cluster, eval,
experiment. Library code receives its own section, never the whole tree. Every field has a
docstring; ``validate(cfg)`` checks cross-field rules before any actor starts, and unknown keys are
rejected by the structured schema itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ModelSection:
    """Target and draft models."""

    target: str = "smollm2"
    """``smollm2`` (the embedded SmolLM2-135M-Instruct), ``tiny`` (random, tests), a HF folder,
    a ``.gguf`` file or a hub id."""
    dtype: str = "auto"
    """Target weights dtype on the serving side: auto (bfloat16 where the CPU or GPU computes it natively,
    else float32; see ``aurora_rl.models.dtypes``), bfloat16 or float32."""
    draft: str = "random"
    """``random`` (day 0) or the path of an EAGLE3 draft folder."""
    draft_vocab_size: int = 8192
    """Rows of the draft head; chosen from token frequencies of a traffic sample."""
    draft_head_init: str = "target"
    """Day-0 head: ``target`` (the target's lm_head rows for the draft vocabulary) or ``random``."""
    vocab_sample: int = 64
    """Requests of the workload whose token frequencies pick the draft vocabulary."""


@dataclass
class EngineSection:
    """Serving engine of each rollout worker."""

    kind: str = "native"
    """``native`` (our engine) or ``sglang`` (GPU only)."""
    num_slots: int = 4
    """Concurrent requests per worker (maximum batch size)."""
    max_len: int = 2048
    """Context limit per request."""
    lookahead: int = 4
    """Draft tokens per step (0 disables speculation)."""
    adaptive_lookahead: bool = True
    """Choose the lookahead per step in 0..``lookahead`` from measured acceptance and step costs (the
    serving default: never slower than no speculation). Off = every step speculates ``lookahead``
    tokens, which experiments that measure acceptance at a fixed lookahead want."""
    context_copy: bool | None = None
    """Propose by copying from the request's own context where its last 2-4 tokens occurred before
    (prompt lookup), the draft elsewhere. None (default): on with the native engine, off with SGLang,
    which does not support it (true there is an error). Copies need no draft pass; the learner
    trains the draft on every position still, but its proposal terms only on drafted steps."""
    tree_topk: int = 0
    """Token trees: children per expanded draft node (EAGLE-2's top-k; SGLang's ``--speculative-eagle-topk``).
    0 proposes one chain of ``lookahead`` tokens per row."""
    tree_budget: int = 8
    """Proposed tree nodes per row and step, copies included (SGLang's ``--speculative-num-draft-tokens`` is
    this plus one). With ``adaptive_lookahead`` each step's budget is chosen among 0 and quarters of it."""
    tree_depth: int = 5
    """Deepest draft expansion of a tree (SGLang's ``--speculative-num-steps`` for a tree)."""
    capture_traces: bool = True
    """Record traces for the learner (off = serve only)."""
    trace_dtype: str = "bfloat16"
    """Stored dtype of trace features."""
    threads: int = 0
    """Torch threads per worker (0 = the actor's CPU share)."""
    weight_poll_steps: int = 4
    """Engine steps between wake-ups of the background fetch of newer draft weights (it also looks once a
    second when idle; ``engine.sglang.weight_poll_s`` for SGLang)."""
    deterministic: bool = False
    """Batch-invariant target passes: at temperature 0 a prompt gets the same tokens alone or batched,
    streamed or not, speculated or not (slower: ``make bench`` prints the cost). Without it, verification
    is lossless up to floating-point rounding that depends on the batch."""
    sglang: dict[str, Any] = field(default_factory=dict)
    """``engine.kind=sglang`` only: server arguments (``SGLangServerConfig`` fields: tp_size,
    mem_fraction_static, dtype, port, ...) and worker options (``SGLangWorkerOptions``: url, weight_poll_s,
    ...), from ``aurora_rl.sglang.args``; ``validate`` checks them before any actor starts."""


@dataclass
class AlgorithmSection:
    """Learning rule (see ``algorithms.list_algorithms()``) and its arguments."""

    name: str = "aurora"
    """aurora, eagle3_kl, osd or frozen."""
    args: dict[str, Any] = field(default_factory=dict)
    """Fields of the algorithm's own config dataclass (validated by it)."""


@dataclass
class LearnerSection:
    """Optimisation (mirrors ``aurora_rl.training.learner.LearnerConfig``) and batching."""

    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    depth: int = 5
    dtype: str = "float32"
    grad_accum: int = 1
    replay_ratio: int = 2
    """Optimizer passes over each batch of traces."""
    prompt_bases: int = 64
    """Prompt positions per trace trained on as well (0 = generated positions only)."""
    batch_traces: int = 8
    """Traces per learner batch."""
    publish_every: int = 1
    """Publish weights every this many batches."""
    checkpoint_every: int = 20
    """Write a checkpoint every this many batches (0 = only at the end)."""
    vocab_refresh_every: int = 0
    """Batches between checks of the draft vocabulary against the recent traffic (0 = keep the day-0
    vocabulary); native engine only (``aurora_rl.training.vocab``)."""
    vocab_refresh_min_gain: float = 0.01
    """Remap only when the best vocabulary covers at least this much more of the recent tokens."""
    vocab_half_life_tokens: int = 16384
    """Token counts halve every this many (weighted) tokens counted."""
    vocab_prompt_weight: float = 0.25
    """Weight of a prompt token against an emitted token in the counts."""


@dataclass
class WorkloadSection:
    """Traffic served during the run."""

    source: str = "sharegpt"
    """``sharegpt`` or ``random`` (random token prompts, for tests)."""
    phases: list[Any] = field(default_factory=lambda: [{"domain": "code", "requests": 100000}])
    """Domain phases in order: each ``{domain, requests}``; domains: code, chat, non_english, all."""
    max_tokens: int = 128
    """Completion tokens per request."""
    temperature: float = 0.0
    """Sampling temperature of the traffic (0 = greedy)."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this are skipped (and counted)."""
    held_out: int = 8
    """Requests per domain kept out of training for the final evaluation."""


@dataclass
class BufferSection:
    """TraceBuffer between rollout workers and the learner."""

    max_traces: int = 256
    max_bytes: int = 2_000_000_000
    policy: str = "drop_oldest"
    """When full: ``block`` (producers wait), ``drop_oldest``, or ``sample`` (evict a random trace)."""
    max_lag: int = 64
    """Traces whose newest step is older than this many versions are dropped (and counted)."""


@dataclass
class ClusterSection:
    """Ray placement."""

    address: Optional[str] = None
    """None starts a local Ray; ``auto`` or ``ray://host:port`` joins an existing cluster."""
    num_cpus: Optional[int] = None
    """CPUs for a local Ray (None = all)."""
    rollout_workers: int = 1
    rollout_cpus: float = 1.0
    learner_cpus: float = 1.0
    rollout_gpus: float = 0.0
    learner_gpus: float = 0.0


@dataclass
class EvalSection:
    """Final evaluation on held-out prompts: accept length and speedup over no speculation."""

    enabled: bool = True
    max_tokens: int = 128
    batch_size: int = 1


@dataclass
class RunConfig:
    """A whole run (``aurora-rl experiment=...``)."""

    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    learner: LearnerSection = field(default_factory=LearnerSection)
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    buffer: BufferSection = field(default_factory=BufferSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    eval: EvalSection = field(default_factory=EvalSection)
    name: str = "run"
    seed: int = 0
    time_budget_s: float = 600.0
    """Wall-clock budget of the online phase (serving + learning)."""
    max_requests: int = 0
    """Stop after this many served requests (0 = only the time budget)."""
    output_dir: str = MISSING
    """Run directory (Hydra sets it): TensorBoard events, checkpoints, summary.json, curves.png."""
    progress: bool = True
    """Show a progress bar."""


CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float32"),
    "model.draft_head_init": ("target", "random"),
    "engine.kind": ("native", "sglang"),
    "engine.trace_dtype": ("bfloat16", "float16", "float32"),
    "learner.dtype": ("float32", "bfloat16"),
    "workload.source": ("sharegpt", "random"),
    "buffer.policy": ("block", "drop_oldest", "sample"),
}


def validate(cfg: RunConfig) -> None:
    """Cross-field and choice checks; raises ValueError naming the key, the value and valid options."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ValueError(f"{key}={value!r} is not valid; choose one of {list(choices)}")
    import dataclasses

    from algorithms import get_algorithm

    algo = get_algorithm(cfg.algorithm.name)
    args = dict(cfg.algorithm.args)
    valid = [f.name for f in dataclasses.fields(algo.config_cls) if f.name != "greedy_verify"]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"algorithm.args.{unknown[0]} is not an argument of {cfg.algorithm.name!r}; valid: {valid} "
                         "(greedy_verify is set from workload.temperature)")
    try:
        algo.make_config(**args)
    except ValueError as err:
        raise ValueError(f"algorithm.args: {err}") from None
    if cfg.engine.deterministic and cfg.engine.kind != "native":
        raise ValueError(f"engine.deterministic=true needs engine.kind=native (the batch-invariant kernels are "
                         f"ours), got engine.kind={cfg.engine.kind!r}")
    positive = {"engine.num_slots": cfg.engine.num_slots, "learner.batch_traces": cfg.learner.batch_traces,
                "learner.depth": cfg.learner.depth, "workload.max_tokens": cfg.workload.max_tokens,
                "cluster.rollout_workers": cfg.cluster.rollout_workers, "buffer.max_traces": cfg.buffer.max_traces}
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")
    if cfg.engine.lookahead < 0:
        raise ValueError(f"engine.lookahead={cfg.engine.lookahead} must be >= 0")
    if cfg.learner.prompt_bases < 0:
        raise ValueError(f"learner.prompt_bases={cfg.learner.prompt_bases} must be >= 0 (0 = generated positions only)")
    _validate_vocab_refresh(cfg.learner)
    if cfg.engine.lookahead > cfg.learner.depth:
        raise ValueError(f"engine.lookahead={cfg.engine.lookahead} exceeds learner.depth={cfg.learner.depth}: "
                         "the draft would propose at depths it is never trained for")
    if cfg.time_budget_s <= 0 and cfg.max_requests <= 0:
        raise ValueError("set time_budget_s > 0 or max_requests > 0, or the run never stops")
    for i, phase in enumerate(cfg.workload.phases):
        if set(phase) != {"domain", "requests"}:
            raise ValueError(f"workload.phases[{i}]={dict(phase)} must have exactly the keys domain, requests")
        from aurora_rl.data.sharegpt import check_domain

        check_domain(phase["domain"])
    if cfg.engine.kind == "sglang":
        _validate_sglang(cfg)
    elif cfg.engine.sglang:
        raise ValueError(f"engine.sglang={dict(cfg.engine.sglang)} is only read with engine.kind=sglang, "
                         f"not {cfg.engine.kind!r}")


def _validate_vocab_refresh(learner: LearnerSection) -> None:
    checks = {"learner.vocab_refresh_every": learner.vocab_refresh_every >= 0,
              "learner.vocab_refresh_min_gain": 0 <= learner.vocab_refresh_min_gain <= 1,
              "learner.vocab_half_life_tokens": learner.vocab_half_life_tokens >= 1,
              "learner.vocab_prompt_weight": learner.vocab_prompt_weight >= 0}
    for key, ok in checks.items():
        if not ok:
            value = getattr(learner, key.split(".")[1])
            raise ValueError(f"{key}={value} is out of range (refresh_every >= 0, min_gain in [0, 1], "
                             "half_life_tokens >= 1, prompt_weight >= 0)")


def _validate_sglang(cfg: RunConfig) -> None:
    """The SGLang server arguments and what launching one per rollout worker needs."""
    from aurora_rl.sglang.args import check_engine_section

    engine = cfg.engine
    if engine.lookahead < 1:
        raise ValueError("engine.lookahead=0: engine.kind=sglang serves with EAGLE3 speculation and needs "
                         "engine.lookahead >= 1")
    if engine.adaptive_lookahead:
        raise ValueError("engine.adaptive_lookahead=true is not supported with engine.kind=sglang: the lookahead "
                         "is a server argument, fixed at launch")
    if engine.context_copy:
        raise ValueError("engine.context_copy=true is not supported with engine.kind=sglang: SGLang's server "
                         "proposes with the EAGLE3 draft only (set engine.context_copy=false)")
    if cfg.learner.vocab_refresh_every:
        raise ValueError(f"learner.vocab_refresh_every={cfg.learner.vocab_refresh_every} is not supported with "
                         "engine.kind=sglang: an SGLang replica keeps the draft vocabulary it was launched with "
                         "(set learner.vocab_refresh_every=0)")
    options = check_engine_section(engine)
    if options.worker.url is not None:
        return
    if cfg.model.target == "tiny" or cfg.model.target.endswith(".gguf"):
        raise ValueError(f"model.target={cfg.model.target!r} cannot be loaded by SGLang; use a Hugging Face folder "
                         "or hub id, or set engine.sglang.url to attach to a running server")
    tp_size = int(options.server.get("tp_size", 1))
    if cfg.cluster.rollout_gpus < tp_size:
        raise ValueError(f"cluster.rollout_gpus={cfg.cluster.rollout_gpus} is too few: with engine.kind=sglang each "
                         f"rollout worker launches an SGLang server on its own GPUs; set cluster.rollout_gpus >= "
                         f"engine.sglang.tp_size={tp_size}, or engine.sglang.url to attach to a running server")


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore as ``run_schema`` (``conf/`` composes it as group
    ``schema``, option ``run``, registered by ``aurora_rl.cli.register_schemas``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
