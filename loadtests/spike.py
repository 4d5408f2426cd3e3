"""A sudden spike to four times the pools' capacity, and the recovery after it.

A steady half-capacity load, then in one go four times as many users as there are
pooled connections, then back. During the spike the pools shed what they cannot queue
(503 with Retry-After, counted as expected) instead of letting requests hang, and
PgBouncer keeps PostgreSQL's connection count flat; after it, latency must come back
to the baseline. Each stage lasts LOADTEST_STAGE_SECONDS (default 30 s).

    .venv/bin/locust -f loadtests/spike.py --headless --csv reports/spike
"""

from __future__ import annotations

import random

from locust import FastHttpUser, constant, run_single_user, task

from loadtests.common.scenario import DEFAULT_HOST, SEED_ITEMS, expect
from loadtests.common.shapes import POOL_CAPACITY, Stage, StagedShape, of_capacity

SPIKE_RATE = max(10, 10 * POOL_CAPACITY)  # all the spike's users within a fraction of a second


class Spike(StagedShape):
    """Baseline, spike, baseline."""

    stages = (
        #     stages  users (x pool capacity)  spawn rate
        Stage(2, of_capacity(0.5), SPIKE_RATE),  # the baseline
        Stage(1, of_capacity(4.0), SPIKE_RATE),  # the spike
        Stage(2, of_capacity(0.5), SPIKE_RATE),  # recovery
    )


class Client(FastHttpUser):
    """Back-to-back requests, reads and writes: about one request in flight per user."""

    host = DEFAULT_HOST
    wait_time = constant(0)

    @task(3)
    def read_item(self) -> None:
        item_id = random.randint(1, SEED_ITEMS)
        with self.client.get(f"/items/{item_id}", name="/items/[id]", catch_response=True) as resp:
            expect(resp, 200)

    @task(1)
    def visit(self) -> None:
        item_id = random.randint(1, SEED_ITEMS)
        with self.client.post(
            "/visits", json={"item_id": item_id}, name="/visits", catch_response=True
        ) as resp:
            expect(resp, 201)


if __name__ == "__main__":
    run_single_user(Client)
