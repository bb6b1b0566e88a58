"""Functions vLLM runs inside its worker (``LLM.collective_rpc(fn, args=...)``; ``fn(worker, *args)``).

- ``reload_draft``: replace the EAGLE3 draft's weights in place. The drafter's own ``load_weights``
  cannot do it on CPU: vLLM repacks linear weights into kernel layouts after loading and leaves the
  checkpoint-shaped parameters empty. vLLM's in-place reload routine
  (``model_executor.model_loader.reload.inplace.reload_weights``) rebuilds the checkpoint-shaped
  parameters, loads, and reruns the same post-load processing, which is what is called here on the
  draft model (the target is not touched).
- ``record_proposals`` / ``take_proposals``: log the draft tokens vLLM proposes at every step (per
  request, in order) by wrapping the model runner's ``take_draft_token_ids``; the export-fidelity test
  compares them with our engine's proposals.
"""

from __future__ import annotations

from typing import Any

import torch


def _drafter(worker: Any):
    drafter = getattr(worker.model_runner, "drafter", None)
    if drafter is None or getattr(drafter, "model", None) is None:
        raise RuntimeError("this vLLM engine has no draft model (speculative_config not set?)")
    return drafter


def reload_draft(worker: Any, tensors: dict[str, torch.Tensor]) -> int:
    """Load ``tensors`` (EAGLE3 checkpoint names, no embedding) into the running draft; returns how many."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    drafter = _drafter(worker)
    model = drafter.model
    # what reload.inplace.reload_weights does for checkpoint-format weights, with the draft's own
    # model config (that routine takes the engine config, whose model config is the target's)
    with torch.no_grad():
        initialize_layerwise_reload(model)
        loaded = model.load_weights(iter(list(tensors.items())))
        finalize_layerwise_reload(model, drafter.speculative_config.draft_model_config)
    return len(loaded) if loaded is not None else len(tensors)


def record_proposals(worker: Any) -> bool:
    """Start logging ``(request_id, draft_token_ids)`` per step on this worker (idempotent)."""
    runner = worker.model_runner
    if getattr(runner, "_aurora_proposals", None) is not None:
        return True
    runner._aurora_proposals = []
    original = runner.take_draft_token_ids

    def take_and_log():
        out = original()
        if out is not None:
            ids = out.draft_token_ids
            ids = ids.tolist() if torch.is_tensor(ids) else [list(map(int, r)) for r in ids]
            runner._aurora_proposals.append(list(zip(list(out.req_ids), ids)))
        return out

    runner.take_draft_token_ids = take_and_log
    return True


def take_proposals(worker: Any) -> list[list[tuple[str, list[int]]]]:
    """The steps logged since the last call: per step, ``(request_id, proposals)`` for each request."""
    runner = worker.model_runner
    steps = getattr(runner, "_aurora_proposals", None)
    if steps is None:
        raise RuntimeError("record_proposals was not called on this worker")
    runner._aurora_proposals = []
    return steps
