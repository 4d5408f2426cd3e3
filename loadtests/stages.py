"""Step the users up past the pools' total capacity (R x W x POOL_MAX) and back down.

Below capacity every request finds a pooled connection at once. Past it, requests
queue in the pools (POOL_TIMEOUT), then are shed as 503s with Retry-After (counted as
expected, not failed), while PgBouncer's server connections and PostgreSQL's backends
stay flat: watch the Connections tab or the `_connections.csv`. Coming back down shows
the recovery. Each stage lasts LOADTEST_STAGE_SECONDS (default 30 s).

    .venv/bin/locust -f loadtests/stages.py --headless --csv reports/stages
"""

from __future__ import annotations

import random

from locust import FastHttpUser, constant, run_single_user, task

from loadtests.common.scenario import DEFAULT_HOST, SEED_ITEMS, expect
from loadtests.common.shapes import POOL_CAPACITY, Stage, StagedShape, of_capacity

RATE = max(1, POOL_CAPACITY)  # users started (or stopped) a second between stages


class Steps(StagedShape):
    """Up in steps to twice the pools' capacity, then back down."""

    stages = (
        #     stages  users (x pool capacity)  spawn rate
        Stage(1, of_capacity(0.25), RATE),  # well within the pools
        Stage(1, of_capacity(0.5), RATE),
        Stage(1, of_capacity(1.0), RATE),  # one user per pooled connection
        Stage(1, of_capacity(1.5), RATE),  # past capacity: requests queue for connections
        Stage(1, of_capacity(2.0), RATE),
        Stage(1, of_capacity(1.0), RATE),  # back down: the queues drain
        Stage(1, of_capacity(0.25), RATE),
    )


class Client(FastHttpUser):
    """Back-to-back requests, mostly reads: one user keeps about one request in flight."""

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
