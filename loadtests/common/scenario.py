"""What every scenario imports: defaults, response checks, and the plugins they register.

Importing this module registers, once per process, the thresholds gate (gate.py), the
shed-503 tally (checks.py), the connection sampler (sampler.py), the Server-Timing
tally (timing.py) and their web UI tabs (webui.py). Scenarios then use
`expect`/`json_body` and the defaults below.
"""

from __future__ import annotations

from infra.localstack.config import StackSettings
from loadtests.common import gate, sampler, timing, webui
from loadtests.common.checks import expect, json_body

_stack = StackSettings()

# The local stack's load balancer; --host (or LOCUST_HOST, or locust.conf) overrides it.
DEFAULT_HOST = f"http://127.0.0.1:{_stack.lb_port}"

# Items 1..SEED_ITEMS exist (`make up` seeds them); SEED_ITEMS as `make up` reads it.
SEED_ITEMS = max(1, _stack.seed_items)

__all__ = [
    "DEFAULT_HOST",
    "SEED_ITEMS",
    "expect",
    "gate",
    "json_body",
    "sampler",
    "timing",
    "webui",
]
