"""What the sweep runs: the modes, the workers x replicas (x PgBouncers) grid, each cell's key."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    """How the replicas reach PostgreSQL (the value is what reports and files say)."""

    PGBOUNCER = "pgbouncer"
    DIRECT = "direct"


@dataclass(frozen=True)
class CellKey:
    """One cell of the sweep: a mode, workers per replica, replicas, PgBouncer instances."""

    mode: Mode
    workers: int
    replicas: int
    instances: int = 1

    @property
    def prefix(self) -> str:
        """The file name prefix of the cell's CSVs and logs: `pgbouncer-w2-r1` (`-b2`: two
        PgBouncers)."""
        several = f"-b{self.instances}" if self.instances > 1 else ""
        return f"{self.mode}-w{self.workers}-r{self.replicas}{several}"


@dataclass(frozen=True)
class Plan:
    """What the sweep runs: the grid, the pool, the time per cell, the direct limit."""

    workers: tuple[int, ...]
    replicas: tuple[int, ...]
    pool_max: int
    duration: int
    direct_max_connections: int
    pgbouncer_pool_size: int
    modes: tuple[Mode, ...] = (Mode.PGBOUNCER, Mode.DIRECT)
    instances: tuple[int, ...] = (1,)  # PgBouncer instances (direct cells have none)
    # Requests always in flight per pooled connection: every pool full, more waiting.
    # Fewer leave a worker now and then with fewer requests than connections (haproxy
    # and the kernel spread them unevenly), and its pool short of POOL_MAX.
    users_per_connection: int = 4

    def cells(self, mode: Mode | None = None) -> list[CellKey]:
        """Every cell in the order the sweep runs them (of one mode, if given)."""
        modes = self.modes if mode is None else (mode,)
        return [
            CellKey(m, w, r, b)
            for m in modes
            for b in (self.instances if m is Mode.PGBOUNCER else (1,))
            for w in self.workers
            for r in self.replicas
        ]


def grid(text: str) -> tuple[int, ...]:
    """`"1 2,4"` -> (1, 2, 4): a grid axis from the environment."""
    values = tuple(int(v) for v in text.replace(",", " ").split())
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
