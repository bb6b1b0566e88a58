"""llama.cpp as a benchmark peer: a wave of prompts served as one llama.cpp batch, measured like ``bench_spec.Cell``.

- ``LlamaCppModel``: the GGUF loaded once through llama-cpp-python's C API (the ``bench`` extra), with
  the AMX workaround of NOTES.md (``use_extra_bufts`` off on an AMX CPU).
- ``LlamaCppCell``: one context of ``batch`` sequences, the way llama.cpp's ``batched`` example and
  server drive it: each prompt prefilled under its own sequence id (one ``llama_decode`` per chunk of
  ``n_batch`` tokens, as our engine prefills one request per forward), then every sequence decoded
  together, one ``llama_decode`` per step with one token per sequence; greedy (argmax of the logits),
  EOS ignored, exactly ``max_tokens`` tokens. The KV memory is cleared between waves.
- Flash attention is off by default, as ``llama_cpp.Llama`` has it: then a sequence's tokens do not
  depend on the batch beside it and equal the high-level ``Llama.generate``'s (measured, 4 code prompts
  x 64 tokens, batch 1 and 4). On (``flash_attn=True``, llama.cpp's own tools' "auto" on CPU) it was
  ~10% faster here, but greedy tokens moved with the batch size from token 22-58 on.
- Timings as ``RequestOutput`` has them: tokens/s from the wave's start to the request's last token,
  decode tokens/s after its first token, TTFT from the wave's start.
- ``prefill_chunks`` / ``decode_entries`` are the batch bookkeeping (token, position, sequence, wants
  logits), pure so they can be tested without the package.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aurora_rl.bench_spec import record_wave

log = logging.getLogger(__name__)


@dataclass
class PeerOutput:
    output_ids: list[int]
    tokens_per_s: float
    decode_tokens_per_s: float
    ttft_s: float
    num_output_tokens: int
    accept_length: float = 1.0
    draft_tokens: int = 0
    verify_steps: int = 0


@dataclass(frozen=True)
class BatchEntry:
    """One token of a ``llama_batch``: its id, position in its sequence, sequence id, and whether its
    logits are wanted."""

    token: int
    pos: int
    seq: int
    logits: bool


def prefill_chunks(prompt: list[int], seq: int, n_batch: int) -> list[list[BatchEntry]]:
    """``prompt`` as sequence ``seq`` from position 0, cut into batches of at most ``n_batch`` tokens;
    logits at the prompt's last token only (the first generated token comes from it)."""
    if not prompt:
        raise ValueError("an empty prompt has no logits to start from")
    entries = [BatchEntry(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)]
    return [entries[i:i + n_batch] for i in range(0, len(entries), n_batch)]


def decode_entries(last_tokens: list[int], positions: list[int]) -> list[BatchEntry]:
    """One decode step: sequence ``i``'s last token at its next position, logits wanted for every one
    (row ``i`` of the step's logits is sequence ``i``'s)."""
    return [BatchEntry(t, p, i, True) for i, (t, p) in enumerate(zip(last_tokens, positions))]


def _cpu_flags() -> set[str]:
    from aurora_rl.models.dtypes import cpu_flags

    return cpu_flags(Path("/proc/cpuinfo").read_text(errors="replace"))


class LlamaCppModel:
    """The GGUF's weights in llama.cpp, loaded once and shared by the cells of every batch size."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import llama_cpp as capi

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback checks this level
        capi.llama_backend_init()
        params = capi.llama_model_default_params()
        # The AMX buffer type crashed on this Q4_1 file on an AMX Xeon (NOTES.md, illegal instruction).
        params.use_extra_bufts = "amx_int8" not in _cpu_flags()
        self.extra_bufts = params.use_extra_bufts
        self.model = capi.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = capi.llama_vocab_n_tokens(capi.llama_model_get_vocab(self.model))
        self.capi, self.threads = capi, threads

    def close(self) -> None:
        if self.model:
            self.capi.llama_model_free(self.model)
            self.model = None


class LlamaCppCell:
    """llama.cpp on the same file, served like a ``bench_spec.Cell``: each wave of up to ``batch``
    prompts as one llama.cpp batch (module docstring)."""

    def __init__(self, model: LlamaCppModel, batch: int, max_len: int = 2048, n_batch: int = 512,
                 flash_attn: bool = False) -> None:
        capi = model.capi
        cp = capi.llama_context_default_params()
        # Every sequence gets max_len cells, as each of our engine's slots does.
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = batch * max_len, n_batch, n_batch, batch
        cp.n_threads = cp.n_threads_batch = model.threads
        cp.no_perf = True
        cp.flash_attn_type = capi.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else capi.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.kv_unified = False  # one KV stream per sequence: a token attends to its own sequence's cells only
        self.ctx = capi.llama_init_from_model(model.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for batch {batch} x {max_len} tokens")
        self.llama_batch = capi.llama_batch_init(max(n_batch, batch), 0, 1)
        self.model, self.capi, self.n_batch, self.max_len = model, capi, n_batch, max_len
        self.batch, self.lookahead, self.decoder, self.controller = batch, "llama.cpp", None, None
        self.outs: list[PeerOutput] = []
        self.wave_means: list[float] = []
        self.wave_decode_means: list[float] = []
        self.wall = 0.0

    def close(self) -> None:
        if self.ctx:
            self.capi.llama_batch_free(self.llama_batch)
            self.capi.llama_free(self.ctx)
            self.ctx = None

    def _decode(self, entries: list[BatchEntry]) -> None:
        b = self.llama_batch
        for i, e in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = e.token, e.pos, 1, e.seq, int(e.logits)
        b.n_tokens = len(entries)
        rc = self.capi.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} on a batch of {len(entries)} tokens")

    def _argmax(self, row: int) -> int:
        """Greedy token from the logits of the last ``llama_decode``'s ``row``-th output."""
        ptr = self.capi.llama_get_logits_ith(self.ctx, row)
        assert ptr, f"no logits for output row {row}"
        return int(np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[PeerOutput]:
        """Greedy continuations of exactly ``max_tokens`` tokens for up to ``batch`` prompts at once."""
        if not 0 < len(prompts) <= self.batch:
            raise ValueError(f"{len(prompts)} prompts for a cell of batch {self.batch}")
        if max(len(p) for p in prompts) + max_tokens > self.max_len:
            raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens + {max_tokens} exceeds {self.max_len}")
        self.capi.llama_memory_clear(self.capi.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        outputs: list[list[int]] = []
        t_first: list[float] = []
        for seq, prompt in enumerate(prompts):
            for chunk in prefill_chunks(prompt, seq, self.n_batch):
                self._decode(chunk)
            outputs.append([self._argmax(-1)])  # the chunk's only output row: the prompt's last token
            t_first.append(time.perf_counter())
        positions = [len(p) for p in prompts]
        for _ in range(max_tokens - 1):
            self._decode(decode_entries([o[-1] for o in outputs], positions))
            for i, out in enumerate(outputs):
                out.append(self._argmax(i))
            positions = [p + 1 for p in positions]
        t_end = time.perf_counter()
        return [PeerOutput(ids, len(ids) / (t_end - t0),
                           (len(ids) - 1) / (t_end - tf) if len(ids) > 1 else 0.0, tf - t0, len(ids))
                for ids, tf in zip(outputs, t_first)]

    def serve(self, prompts: list[list[int]], max_tokens: int, record: bool = True) -> None:
        t0 = time.perf_counter()
        outs = self.generate(prompts, max_tokens)
        if not record:
            return
        record_wave(self, outs, time.perf_counter() - t0)
