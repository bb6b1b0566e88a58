"""vLLM as a rollout engine (``engine.kind=vllm``): vLLM's own engine with EAGLE3 speculation by our draft.

- ``options``: the ``engine.vllm`` block, validated, and the ``vllm.LLM`` arguments it becomes.
- ``backend``: ``VLLMBackend``, vLLM in this process as an ``ExternalRollout`` backend.
- ``rpc``: functions vLLM runs inside its worker (draft reload, proposal logging).
- ``fidelity``: our engine against vLLM with the same exported draft, step by step.

Only ``backend``, ``rpc`` and ``fidelity.vllm_steps`` import ``vllm``, lazily.
"""
