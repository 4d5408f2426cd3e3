"""What the benchmark reads from the processes under test while a run goes on: CPU by
process group, worker RSS, and requests per coalesced statement from a replica's metrics."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from infra.localstack import procs
from infra.localstack.replicas import Replica
from loadtests.common.prom import Scrape

FLUSH_WAIT_S = 1.2  # a little over the replicas' POOL_STATS_INTERVAL (1 s)


class CPUMeter:
    """CPU seconds (user + system) spent by each group of processes during a run.

    Groups: a replica's workers (children of its gunicorn master), PgBouncer (every
    instance), every PostgreSQL process, and our own child processes (wrk or pgbench,
    from rusage).
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, bouncer_pid_files: Sequence[Path], postgres_pid_file: Path) -> None:
        self.bouncer_pid_files = bouncer_pid_files
        self.postgres_pid_file = postgres_pid_file

    @classmethod
    def _cpu(cls, pid: int) -> float:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / cls.TICK

    def _read(self, master: int | None) -> dict[str, dict[int, float]]:
        groups: dict[str, list[int]] = {
            "workers": worker_pids(master) if master else [],
            "pgbouncer": [p for p in map(procs.read_pid, self.bouncer_pid_files) if p],
        }
        postmaster = procs.read_pid(self.postgres_pid_file)
        groups["postgres"] = [postmaster, *worker_pids(postmaster)] if postmaster else []
        return {name: {pid: self._cpu(pid) for pid in pids} for name, pids in groups.items()}

    @contextmanager
    def measuring(self, master: int | None) -> Iterator[dict[str, float]]:
        """CPU seconds by group spent while the block runs, filled in when it ends.

        `master`: the gunicorn master whose workers count (None: no replica). Our own
        children (wrk, pgbench, the driver ceiling) count as the load generator.
        """
        spent: dict[str, float] = {}
        before, children = self._read(master), self._children()
        yield spent
        after = self._read(master)
        for name, pids in after.items():
            # A process born in between counts from zero.
            earlier = before.get(name, {})
            spent[name] = sum(t - earlier.get(pid, 0.0) for pid, t in pids.items())
        spent["load generator"] = self._children() - children

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime


def worker_pids(master: int) -> list[int]:
    try:
        text = Path(f"/proc/{master}/task/{master}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_rss(replica: Replica) -> list[float]:
    master = procs.read_pid(replica.pid_file)
    return [rss_mib(pid) for pid in worker_pids(master)] if master else []


def statement_totals(metrics_url: str, statement: str) -> tuple[float, float]:
    """(statements run, requests they served) of one coalesced statement so far, from a
    replica's pgscale_db_requests_per_statement (`_count` and `_sum`, all workers)."""
    metrics = Scrape.get(metrics_url)
    family = "pgscale_db_requests_per_statement"
    return (
        metrics.total(family, "_count", statement=statement),
        metrics.total(family, "_sum", statement=statement),
    )


class StatementCounter:
    """Requests per statement of one coalesced statement over a run, from the replica's
    pgscale_db_requests_per_statement histogram (its `_sum` over its `_count`).

    Workers write their tallies once per POOL_STATS_INTERVAL, so it waits that long
    before the first reading and after the run; None when there is nothing to read.
    """

    def __init__(self, replica: Replica, statement: str | None) -> None:
        self.replica = replica
        self.statement = statement
        self.requests_per_statement: float | None = None
        self._before = (0.0, 0.0)

    def _read(self) -> tuple[float, float]:
        time.sleep(FLUSH_WAIT_S)
        assert self.statement is not None
        return statement_totals(self.replica.metrics_url, self.statement)

    def __enter__(self) -> StatementCounter:
        if self.statement is not None:
            self._before = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.statement is None or exc[0] is not None:
            return
        count, total = (a - b for a, b in zip(self._read(), self._before, strict=True))
        if count > 0:
            self.requests_per_statement = total / count
