"""Sampling parameters and the pure functions that turn logits into a distribution and a token.

``processed_probs`` is the distribution a request actually samples from (temperature, top-k, top-p
applied); lossless speculative verification compares draft and target under exactly this
distribution. Greedy (temperature 0) is argmax and needs no generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aurora_rl.models import cpu_kernels


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded and when it stops."""

    max_tokens: int = 128
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 means greedy (deterministic argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same sampled output."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one; it is cut from the output text."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (in addition to the model's EOS)."""
    ignore_eos: bool = False
    """Keep generating through EOS (benchmarks)."""
    lookahead: int | None = None
    """Draft tokens to speculate per step; None takes the engine's default, 0 disables speculation."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.lookahead is not None and self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [..., V] a request samples from; one-hot at the argmax when greedy."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(cpu_kernels.argmax(logits), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def served_stats(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[R, 3] normalisers of the distribution rows of ``logits`` [R, V] are verified under (see ``Trace``).

    Columns: logsumexp of z = logits/T over the whole vocabulary (T = 1 when greedy: the point mass has
    no normaliser, and T = 1 is what the learner distils greedy traffic at); the smallest z that
    ``processed_probs`` keeps (-inf when top-k/top-p cut nothing); logsumexp of z over the kept set.
    With them, p(v) = exp(z_v - col2) where z_v >= col1, else 0, for any subset of the vocabulary.
    """
    temperature = 1.0 if params.greedy else params.temperature
    if params.greedy or (params.top_p >= 1.0 and not params.top_k):
        return _uncut_stats(cpu_kernels.logsumexp(logits, 1.0 / temperature))  # every served row: one native pass
    z = logits.float() / temperature
    logz = torch.logsumexp(z, -1)
    kept = processed_probs(logits, params) > 0
    cut = z.masked_fill(~kept, float("inf")).amin(-1)
    return torch.stack([logz, cut, torch.logsumexp(z.masked_fill(~kept, float("-inf")), -1)], -1)


def served_stats_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``served_stats`` of row b of ``logits`` [B, V] under ``params[b]``: [B, 3]. Rows whose distribution
    cuts nothing (greedy, or no top-k/top-p) share one native pass per temperature; a plain step of a
    batch records one such row per request."""
    out = torch.empty(logits.shape[0], 3)
    simple: dict[float, list[int]] = {}
    for b, p in enumerate(params):
        if p.greedy or (p.top_p >= 1.0 and not p.top_k):
            simple.setdefault(1.0 if p.greedy else p.temperature, []).append(b)
        else:
            out[b] = served_stats(logits[b : b + 1], p)[0]
    for temperature, rows in simple.items():
        sel = logits if len(rows) == logits.shape[0] else logits[rows]
        out[rows] = _uncut_stats(cpu_kernels.logsumexp(sel, 1.0 / temperature))
    return out


def _uncut_stats(logz: torch.Tensor) -> torch.Tensor:
    """Served stats [R, 3] of rows whose distribution cuts nothing, from their normalisers ``logz`` [R]."""
    return torch.stack([logz, torch.full_like(logz, float("-inf")), logz], -1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> list[int]:
    """Next token for each row of ``logits`` [B, V]; greedy rows share one argmax."""
    argmax = cpu_kernels.argmax(logits).tolist()
    out = []
    for row, (p, g) in enumerate(zip(params, generators)):
        out.append(argmax[row] if p.greedy else int(sample_from(processed_probs(logits[row], p), g)))
    return out


def sample_with_stats(logits: torch.Tensor, params: list[SamplingParams],
                      generators: list[torch.Generator | None]) -> tuple[list[int], torch.Tensor]:
    """(``sample_tokens``, ``served_stats_rows``) of a plain step's logits [B, V]. When every row is greedy
    (the common serving case) the tokens and the normalisers come from one native pass per row
    (``cpu_kernels.argmax_logsumexp``): a recorded plain step then reads its logits once, as plain
    decoding does."""
    if all(p.greedy for p in params):
        idx, logz = cpu_kernels.argmax_logsumexp(logits)
        return idx.tolist(), _uncut_stats(logz)
    return sample_tokens(logits, params, generators), served_stats_rows(logits, params)
