"""A MOCK SGLang HTTP server for tests: the sglang 0.5.22 endpoints our SGLang engine uses.

SGLang cannot be installed or run on the CPU machines these tests run on (see /work/shared/NOTES.md),
so this stands in for it. It answers in the documented formats (``srt/entrypoints/http_server.py``,
``srt/managers/io_struct.py``): ``/generate`` with ``output_ids`` and ``meta_info`` (spec counters and
``weight_version``), and the draft-only weight update (``/begin_weight_update``,
``/update_weights_from_tensor`` with ``selector: "draft"``, ``/end_weight_update``). It records every
call, and for each update it decodes every TP rank's tensor payload the way sglang does (plain pickle
of a ForkingPickler dump), which also checks that the shared-memory transport works across processes
when the caller is another process. Its answers are made up: output token i is ``last prompt token +
1 + i`` and half the tokens count as accepted drafts.
"""

from __future__ import annotations

import base64
import pickle
import threading
from dataclasses import dataclass

from fastapi import FastAPI, Request  # module level: the handlers annotate with Request
from fastapi.responses import JSONResponse


@dataclass
class DraftUpdate:
    """One draft update the mock accepted."""

    version: str
    names: list[str]
    ranks: int


class MockSGLang:
    """Serve with ``aurora_rl.serving.http.serve(mock.app, port=0)``; read ``calls`` and ``updates``."""

    def __init__(self, vocab_size: int = 128, fail_first_token: int | None = 0) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.updates: list[DraftUpdate] = []
        self.version, self.session, self.loaded_names = "default", False, []
        self._lock = threading.Lock()
        app = FastAPI()

        @app.get("/health")
        def health():
            return {}

        @app.get("/get_server_info")
        def info():
            return {"version": "0.5.22", "speculative_algorithm": "EAGLE3", "speculative_num_steps": 3}

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self._record("/generate", body)
            ids, sp = body["input_ids"], body["sampling_params"]
            if fail_first_token is not None and ids[0] == fail_first_token:
                return JSONResponse({"error": {"message": "mock failure"}}, status_code=500)
            n = sp["max_new_tokens"]
            out = [(ids[-1] + 1 + i) % vocab_size for i in range(n)]
            verify = (n + 1) // 2
            meta = {"id": body.get("rid"), "finish_reason": {"type": "length", "length": n},
                    "prompt_tokens": len(ids), "weight_version": self.version, "completion_tokens": n,
                    "cached_tokens": 0, "spec_verify_ct": verify, "spec_num_correct_drafts": n - verify,
                    "spec_num_proposed_drafts": 3 * verify, "spec_accept_length": n / verify, "e2e_latency": 0.01}
            return {"text": "", "output_ids": out, "meta_info": meta}

        @app.post("/begin_weight_update")
        async def begin(request: Request):
            self._record("/begin_weight_update", await request.json())
            self.session = True
            return {"success": True, "message": "ok"}

        @app.post("/update_weights_from_tensor")
        async def update(request: Request):
            body = await request.json()
            self._record("/update_weights_from_tensor", body)
            if not self.session:  # 0.5.22 refuses tensor updates outside a session
                return JSONResponse({"success": False, "message": "must run between begin_weight_update() and "
                                     "end_weight_update()"}, status_code=400)
            ranks = [pickle.loads(base64.b64decode(p)) for p in body["serialized_named_tensors"]]
            self.loaded_names = [n for n, _ in ranks[0]]
            self.version = body["weight_version"]
            with self._lock:
                self.updates.append(DraftUpdate(self.version, self.loaded_names, len(ranks)))
            return {"success": True, "message": "Success"}

        @app.post("/end_weight_update")
        async def end(request: Request):
            self._record("/end_weight_update", await request.json())
            self.session = False
            return {"success": True, "message": "ok"}

        self.app = app

    def _record(self, endpoint: str, body: dict) -> None:
        with self._lock:
            self.calls.append((endpoint, body))
