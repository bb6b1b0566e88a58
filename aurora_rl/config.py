"""Typed configuration of a run: one dataclass per config group, registered in Hydra's ConfigStore.

Groups (YAML under ``conf/``): model, engine, algorithm, learner, workload, buffer, cluster, eval,
experiment. The learner group's schema is ``aurora_rl.training.learner_config.LearnerConfig``, the
same dataclass the learner takes. Library code receives its own section, never the whole tree. Every field has a
docstring; ``validate(cfg)`` checks cross-field rules before any actor starts, and unknown keys are
rejected by the structured schema itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from aurora_rl.training.learner_config import LearnerConfig


@dataclass
class ModelSection:
    """Target and draft models."""

    target: str = "smollm2"
    """``smollm2`` (the embedded SmolLM2-135M-Instruct), ``tiny`` (random, tests), a HF folder,
    a ``.gguf`` file or a hub id."""
    dtype: str = "auto"
    """Target weights dtype on the serving side: auto (bfloat16 where the CPU or GPU computes it natively,
    else float32; see ``aurora_rl.models.dtypes``), bfloat16 or float32."""
    quant: str = "auto"
    """Target weight format: auto (a GGUF's own q8_0 / q4_1 blocks where the kernels take them: the
    embedded SmolLM2 runs its shipped Q4_1 file as stored; float for float checkpoints), none (float
    weights in ``dtype``), q8_0 or q4_1 (every projection quantized to that format). Speculation is
    lossless against the target served this way. See ``aurora_rl.models.quant``."""
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
    """``native`` (our engine), ``vllm`` (vLLM in process, CPU or GPU) or ``sglang`` (GPU only)."""
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
    traffic_copy: bool = False
    """Where a row's own context offers no copy, copy what the target wrote after the same 2-4 tokens in
    earlier requests' outputs (``aurora_rl.engine.traffic_copy``: an index of recent outputs, learned as
    requests finish, no training step). Native engine only; needs ``context_copy``."""
    traffic_window: int = 50_000
    """Output tokens the traffic index keeps (the most recent; at most about 1 KB each)."""
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
    vllm: dict[str, Any] = field(default_factory=dict)
    """``engine.kind=vllm`` only: ``aurora_rl.vllm_engine.options.VLLMOptions`` fields (dtype,
    kv_cache_gib, weight_poll_s, engine_args, ...); ``validate`` checks them before any actor starts."""


@dataclass
class AlgorithmSection:
    """Learning rule (see ``algorithms.list_algorithms()``) and its arguments."""

    name: str = "aurora"
    """aurora, eagle3_kl, osd or frozen."""
    args: dict[str, Any] = field(default_factory=dict)
    """Fields of the algorithm's own config dataclass (validated by it)."""


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
    max_trace_lag: int = 64
    """Traces whose newest step is more than this many published policy versions behind the learner are
    dropped (and counted). A bound on whole traces; the policy-gradient term's per-step bound, in the
    same versions, is ``algorithm.args.max_lag``."""


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
    prompts: int = 0
    """Held-out prompts per domain that the evaluation serves, the first of each domain's held-out set
    (0: all of them). The held-out set can be larger: ``bench_spec`` measures on all of it."""


@dataclass
class RunConfig:
    """A whole run (``aurora-rl experiment=...``)."""

    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Optimisation, batching and publishing (``aurora_rl.training.learner_config``; validated there)."""
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
    "model.quant": ("auto", "none", "q8_0", "q4_1"),
    "model.draft_head_init": ("target", "random"),
    "engine.kind": ("native", "sglang", "vllm"),
    "engine.trace_dtype": ("bfloat16", "float16", "float32"),
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
    valid = [f.name for f in dataclasses.fields(algo.config_cls)]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"algorithm.args.{unknown[0]} is not an argument of {cfg.algorithm.name!r}; valid: {valid}")
    try:
        algo.make_config(**args)
    except ValueError as err:
        raise ValueError(f"algorithm.args: {err}") from None
    if cfg.engine.deterministic and cfg.engine.kind != "native":
        raise ValueError(f"engine.deterministic=true needs engine.kind=native (the batch-invariant kernels are "
                         f"ours), got engine.kind={cfg.engine.kind!r}")
    positive = {"engine.num_slots": cfg.engine.num_slots, "workload.max_tokens": cfg.workload.max_tokens,
                "cluster.rollout_workers": cfg.cluster.rollout_workers, "buffer.max_traces": cfg.buffer.max_traces}
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")
    if cfg.engine.lookahead < 0:
        raise ValueError(f"engine.lookahead={cfg.engine.lookahead} must be >= 0")
    if cfg.engine.traffic_copy and cfg.engine.kind != "native":
        raise ValueError(f"engine.traffic_copy=true needs engine.kind=native (copies are our engine's proposals), "
                         f"got engine.kind={cfg.engine.kind!r}")
    if cfg.engine.traffic_copy and cfg.engine.context_copy is False:
        raise ValueError("engine.traffic_copy=true needs engine.context_copy (traffic copies are tried where the "
                         "context offers none): set engine.context_copy=true or engine.traffic_copy=false")
    if cfg.engine.traffic_window < 2:
        raise ValueError(f"engine.traffic_window={cfg.engine.traffic_window} must be >= 2 tokens")
    if cfg.eval.prompts < 0:
        raise ValueError(f"eval.prompts={cfg.eval.prompts} must be >= 0 (0: every held-out prompt)")
    LearnerConfig(**vars(cfg.learner))  # the learner section's own checks, also for a config built in code
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
    _validate_external_quant(cfg)
    if cfg.engine.kind == "vllm":
        _validate_vllm(cfg)
    elif cfg.engine.vllm:
        raise ValueError(f"engine.vllm={dict(cfg.engine.vllm)} is only read with engine.kind=vllm, "
                         f"not {cfg.engine.kind!r}")


def _validate_external_quant(cfg: RunConfig) -> None:
    """An external engine serves the float weights: traces recomputed on a quantized copy would come from
    another target than the one the engine verified against."""
    if cfg.engine.kind != "native" and cfg.model.quant in ("q8_0", "q4_1"):
        raise ValueError(f"model.quant={cfg.model.quant} is not supported with engine.kind={cfg.engine.kind}: the "
                         "external engine serves float weights (set model.quant=auto or none)")


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


def _validate_vllm(cfg: RunConfig) -> None:
    """The vLLM engine options and what serving ``model.target`` with our draft in vLLM needs."""
    from aurora_rl.vllm_engine.options import VLLMOptions

    engine = cfg.engine
    VLLMOptions.from_dict(dict(engine.vllm or {}))
    unsupported = {"engine.adaptive_lookahead": (engine.adaptive_lookahead, "the lookahead is an engine argument, "
                                                 "fixed at start (set engine.adaptive_lookahead=false)"),
                   "engine.context_copy": (engine.context_copy, "vLLM proposes with one method, here the EAGLE3 "
                                           "draft (set engine.context_copy=false)")}
    for key, (value, why) in unsupported.items():
        if value:
            raise ValueError(f"{key}=true is not supported with engine.kind=vllm: {why}")
    if cfg.learner.vocab_refresh_every:
        raise ValueError(f"learner.vocab_refresh_every={cfg.learner.vocab_refresh_every} is not supported with "
                         "engine.kind=vllm: vLLM keeps the draft vocabulary it was started with "
                         "(set learner.vocab_refresh_every=0)")
    if cfg.model.target == "tiny" or cfg.model.target.endswith(".gguf"):
        raise ValueError(f"model.target={cfg.model.target!r} cannot be loaded by vLLM here; use smollm2, a Hugging "
                         "Face folder or a hub id")


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore as ``run_schema`` (``conf/`` composes it as group
    ``schema``, option ``run``, registered by ``aurora_rl.cli.register_schemas``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
