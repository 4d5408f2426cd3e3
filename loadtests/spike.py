"""A sudden spike to four times the pools' capacity, and the recovery after it.

A steady half-capacity load, then in one go four times as many users as there are
pooled connections, then back. During the spike the pools shed what they cannot queue
(503 with Retry-After, counted as expected) instead of letting requests hang, and
PgBouncer keeps PostgreSQL's connection count flat; after it, latency must come back
to the baseline. Each stage lasts LOADTEST_STAGE_SECONDS (default 30 s).

    .venv/bin/locust -f loadtests/spike.py --headless --csv reports/spike
"""

from __future__ import annotations

from locust import run_single_user

from loadtests.common.shapes import POOL_CAPACITY, Stage, StagedShape, of_capacity
from loadtests.common.users import BackToBack

SPIKE_RATE = max(10, 10 * POOL_CAPACITY)  # all the spike's users within a fraction of a second


class Spike(StagedShape):
    """Baseline, spike, baseline."""

    stages = (
        #     stages  users (x pool capacity)  spawn rate
        Stage(2, of_capacity(0.5), SPIKE_RATE),  # the baseline
        Stage(1, of_capacity(4.0), SPIKE_RATE),  # the spike
        Stage(2, of_capacity(0.5), SPIKE_RATE),  # recovery
    )


class Client(BackToBack):
    """Back-to-back reads and writes (loadtests/common/users.py): one request in flight each."""


if __name__ == "__main__":
    run_single_user(Client)
