"""Load shapes as tables of stages, sized against the pools' total capacity.

The capacity is the connection budget's `R x W x POOL_MAX` for the local stack's
settings (service/budget.py, from the same environment variables `make up` reads), so
"twice the pools" means the same thing here as in the budget. Each stage lasts a number
of `LOADTEST_STAGE_SECONDS` (default 30; tests shorten it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from locust import LoadTestShape

from service.budget import check, deployment_topology

# Every pooled connection of every worker of every replica: R x W x POOL_MAX.
POOL_CAPACITY = check(deployment_topology()).clients_at_peak
STAGE_SECONDS = float(os.environ.get("LOADTEST_STAGE_SECONDS") or 30)


def of_capacity(multiple: float) -> int:
    """Users for `multiple` x the pools' capacity (at least one)."""
    return max(1, round(POOL_CAPACITY * multiple))


@dataclass(frozen=True)
class Stage:
    """Hold `users` for `stages` x STAGE_SECONDS, starting or stopping `spawn_rate` a second."""

    stages: float
    users: int
    spawn_rate: float

    @property
    def seconds(self) -> float:
        return self.stages * STAGE_SECONDS


class StagedShape(LoadTestShape):
    """Runs `stages` in order, then stops the test."""

    abstract = True
    stages: ClassVar[Sequence[Stage]] = ()

    def tick(self) -> tuple[int, float] | None:
        run_time = float(self.get_run_time())  # type: ignore[no-untyped-call]
        ends = 0.0
        for stage in self.stages:
            ends += stage.seconds
            if run_time < ends:
                return stage.users, stage.spawn_rate
        return None

    @classmethod
    def duration(cls) -> float:
        """Seconds the whole shape takes."""
        return sum(stage.seconds for stage in cls.stages)
