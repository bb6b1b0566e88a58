"""SGLang replicas as rollout workers (GPU only), driven over SGLang's HTTP API.

Pinned against ``sglang[srt]==0.5.22``: every request field, response field and launch flag used here
was read in that release's sources (see docs/SGLANG.md). Nothing in this package imports ``sglang``;
the server runs as a subprocess (or elsewhere) and is reached over HTTP.

- ``args``: the server's launch arguments, validated, and the ``sglang.launch_server`` command line.
- ``client``: a synchronous HTTP client for ``/generate``, the weight-update endpoints and health.
- ``recompute``: a Trace from what stock SGLang returns plus one prefill through our target.
- ``engine``: ``SGLangRollout``, the rollout-worker surface (submit / poll / stats / swap_draft).
"""

from aurora_rl.sglang.args import SGLANG_VERSION, SGLangServerConfig, build_launch_command
from aurora_rl.sglang.client import GenerateResult, SGLangClient, SGLangHTTPError
from aurora_rl.sglang.recompute import RecomputedTrace, SGLangCounters, recompute_trace

__all__ = ["SGLANG_VERSION", "SGLangServerConfig", "build_launch_command", "GenerateResult", "SGLangClient",
           "SGLangHTTPError", "RecomputedTrace", "SGLangCounters", "recompute_trace"]
