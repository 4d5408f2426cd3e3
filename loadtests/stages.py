"""Step the users up past the pools' total capacity (R x W x POOL_MAX) and back down.

Below capacity every request finds a pooled connection at once. Past it, requests
queue in the pools (POOL_TIMEOUT), then are shed as 503s with Retry-After (counted as
expected, not failed), while PgBouncer's server connections and PostgreSQL's backends
stay flat: watch the Connections tab or the `_connections.csv`. Coming back down shows
the recovery. Each stage lasts LOADTEST_STAGE_SECONDS (default 30 s).

    .venv/bin/locust -f loadtests/stages.py --headless --csv reports/stages
"""

from __future__ import annotations

from locust import run_single_user

from loadtests.common.shapes import POOL_CAPACITY, Stage, StagedShape, of_capacity
from loadtests.common.users import BackToBack

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


class Client(BackToBack):
    """Back-to-back reads and writes (loadtests/common/users.py): one request in flight each."""


if __name__ == "__main__":
    run_single_user(Client)
