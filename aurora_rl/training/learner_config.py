"""The learner's one typed config: optimisation, batching and publishing, validated in one place.

``LearnerConfig`` is both the ``learner`` group of a run's Hydra tree (``aurora_rl.config.RunConfig``,
``conf/learner/``) and what ``aurora_rl.training.learner.Learner`` takes; its ``__post_init__`` is the
only validation, and its errors name ``learner.<field>``, the bad value and what is allowed. The
learning rule is not here: it is the run's ``algorithm`` group, passed to the learner beside this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LEARNER_DTYPES = ("auto", "float32", "bfloat16")
"""What ``learner.dtype`` accepts."""


@dataclass
class LearnerConfig:
    """Optimisation (AdamW, warmup then a constant rate), TTT depth, batching and publishing."""

    lr: float = 3e-3
    """Peak (and constant) AdamW learning rate."""
    warmup_steps: int = 10
    """Linear warmup from 0 to ``lr`` over these optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas, two numbers in [0, 1)."""
    grad_clip: float = 1.0
    """Max global grad norm (0 disables)."""
    depth: int = 5
    """TTT depth K: train the draft to the deepest lookahead served (``engine.lookahead`` <= it)."""
    dtype: str = "auto"
    """Compute dtype of the draft's forward during training: ``bfloat16`` (autocast; the weights,
    gradients and optimizer stay float32), ``float32``, or ``auto``: bfloat16 where the CPU computes it
    natively (AMX or AVX512-BF16; ``aurora_rl.models.dtypes``) or on a GPU, float32 elsewhere."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (traces are split evenly)."""
    replay_ratio: int = 2
    """Optimizer passes over each batch of traces (>1 reuses recent data). A batch publishes one new
    policy version however many passes it takes."""
    prompt_bases: int = 64
    """Prompt positions per trace also trained on (sampled when a prompt is longer; 0 = generated
    positions only). Their taps are in the trace already: more rows per served request, at the cost
    of the deeper TTT depths and the head on those rows."""
    batch_traces: int = 8
    """Traces per learner batch (online)."""
    publish_every: int = 1
    """Publish weights every this many batches (online)."""
    checkpoint_every: int = 20
    """Write a checkpoint every this many batches (0 = only at the end)."""
    vocab_refresh_every: int = 0
    """Batches between checks of the draft vocabulary against the recent traffic (0 = the vocabulary
    stays as it was at day 0); native engine only (``aurora_rl.training.vocab``)."""
    vocab_refresh_min_gain: float = 0.01
    """Remap only when the best vocabulary covers at least this much more of the recent tokens."""
    vocab_half_life_tokens: int = 16384
    """Recent traffic: token counts halve every this many (weighted) tokens counted."""
    vocab_prompt_weight: float = 0.25
    """Weight of a prompt token against an emitted one in the counts."""

    def __post_init__(self) -> None:
        at_least = {"warmup_steps": 0, "prompt_bases": 0, "vocab_refresh_every": 0, "checkpoint_every": 0,
                    "depth": 1, "grad_accum": 1, "replay_ratio": 1, "batch_traces": 1, "publish_every": 1,
                    "vocab_half_life_tokens": 1}
        for name, lo in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"learner.{name}={value!r} must be an integer >= {lo}")
        ranges = {"lr": (0.0, None, True), "grad_clip": (0.0, None, False), "weight_decay": (0.0, None, False),
                  "vocab_refresh_min_gain": (0.0, 1.0, False), "vocab_prompt_weight": (0.0, None, False)}
        for name, (lo, hi, open_lo) in ranges.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value > lo if open_lo else value >= lo) and (hi is None or value <= hi)
            if not ok:
                where = f"{'(' if open_lo else '['}{lo}, {'inf' if hi is None else hi}]"
                raise ValueError(f"learner.{name}={value!r} must be a number in {where}")
        betas = list(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"learner.betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = [float(b) for b in betas]
        if self.dtype not in LEARNER_DTYPES:
            raise ValueError(f"learner.dtype={self.dtype!r} is not valid; choose one of {list(LEARNER_DTYPES)}")
