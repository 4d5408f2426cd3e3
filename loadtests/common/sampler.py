"""The connection sampler: a Locust plugin recording PgBouncer and PostgreSQL connection counts.

During any run (web UI, headless, or on the master of a distributed run; never on a
worker) it reads PgBouncer's `SHOW POOLS` / `SHOW CLIENTS` / `SHOW SERVERS` and
PostgreSQL's `pg_stat_activity` about once a second, writes each sample to a CSV
(columns in sampling.py) and keeps the recent ones for the web UI's Connections tab.

psycopg blocks, and its C wait function is invisible to gevent, so every query runs in
a real OS thread from gevent's hub threadpool; a greenlet only schedules the samples.
Locust's event loop never waits on a database, even one that does not answer.

Environment:

- `SAMPLER_PGBOUNCER_URL`: libpq DSN of PgBouncer's admin console (`dbname=pgbouncer`,
  a user in admin_users or stats_users), or one per instance separated by `;`.
  Default: the local stack's (every instance); `off` skips it.
- `SAMPLER_POSTGRES_URL`: libpq DSN of PostgreSQL for a role that sees every backend
  (a superuser or pg_monitor). Default: the local stack's superuser over its Unix
  socket; `off` skips it.
- `SAMPLER_INTERVAL`: seconds between samples (default 1).
- `SAMPLER_CSV`: where the CSV goes when Locust runs without `--csv PREFIX`
  (default `reports/connections.csv`); with it, the CSV is `PREFIX_connections.csv`.

The local stack's defaults apply once `make up` has created the stack (its passwords in
`.stack/secrets/`, PostgreSQL's socket directory `.stack/postgres/run`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped,unused-ignore]  # no stubs installed
from gevent.event import Event  # type: ignore[import-untyped,unused-ignore]
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from infra.localstack.config import REPO
from loadtests.common import checks
from loadtests.common.hooks import on
from loadtests.common.sampling import CONNECT_TIMEOUT, CsvLog, Probe, Sample, join_dsns

logger = logging.getLogger("loadtests.sampler")

DEFAULT_CSV = REPO / "reports" / "connections.csv"
DEFAULT_INTERVAL = 1.0
KEEP = 3600  # samples the web UI can show: an hour at one a second
OFF = "off"


@dataclass(frozen=True)
class SamplerConfig:
    """Where to sample from, how often, and where the CSV goes."""

    pgbouncer: str | None
    postgres: str | None
    interval: float
    csv: Path

    @property
    def enabled(self) -> bool:
        return bool(self.pgbouncer or self.postgres)


def local_stack_conninfo() -> tuple[str | None, str | None]:
    """The local stack's admin console and superuser DSNs, when `make up` has made them."""
    from infra.localstack.config import StackSettings
    from infra.localstack.stack import Stack  # imported here: it pulls in the whole stack

    stack = Stack(StackSettings())
    secrets = [stack.secrets / f"{name}.password" for name in ("pgbouncer_admin", "app")]
    # Stack.pgbouncer() creates passwords it does not find: ask it only once `make up` has.
    pgbouncer = (
        join_dsns(b.admin_conninfo() for b in stack.pgbouncers())
        if all(p.exists() for p in secrets)
        else None
    )
    postgres = stack.postgres()
    superuser = postgres.superuser_conninfo() if postgres.socket_dir.exists() else None
    return pgbouncer, superuser


def config_from(env: Mapping[str, str], csv_prefix: str | None) -> SamplerConfig:
    """The sampler's settings from environment variables (documented above)."""
    pgbouncer = env.get("SAMPLER_PGBOUNCER_URL") or None
    postgres = env.get("SAMPLER_POSTGRES_URL") or None
    if pgbouncer is None or postgres is None:
        local_pgbouncer, local_postgres = local_stack_conninfo()
        pgbouncer = pgbouncer or local_pgbouncer
        postgres = postgres or local_postgres
    interval = float(env.get("SAMPLER_INTERVAL") or DEFAULT_INTERVAL)
    if interval <= 0:
        raise ValueError(f"SAMPLER_INTERVAL must be above 0 (got {interval})")
    if csv_prefix:
        csv = Path(f"{csv_prefix}_connections.csv")
    else:
        csv = Path(env.get("SAMPLER_CSV") or DEFAULT_CSV)
    return SamplerConfig(
        pgbouncer=None if pgbouncer == OFF else pgbouncer,
        postgres=None if postgres == OFF else postgres,
        interval=interval,
        csv=csv,
    )


class Sampler:
    """Samples on a greenlet's schedule, each one taken in a threadpool thread."""

    def __init__(self, environment: Environment, config: SamplerConfig) -> None:
        self.environment = environment
        self.config = config
        self.samples: deque[Sample] = deque(maxlen=KEEP)
        self._probe = Probe(config.pgbouncer, config.postgres)
        self._stopping = Event()
        self._greenlet: Any = None  # a gevent.Greenlet

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.link_exception(self._died)
        logger.info(
            "sampling connections every %gs into %s (PgBouncer: %s, PostgreSQL: %s)",
            self.config.interval,
            self.config.csv,
            "yes" if self.config.pgbouncer else "off",
            "yes" if self.config.postgres else "off",
        )

    def stop(self) -> None:
        """Finish the sample in flight (or give up on it after a while), close the CSV."""
        self._stopping.set()
        if self._greenlet is not None:
            # A sample in flight may wait for two connection timeouts before it gives up.
            self._greenlet.join(timeout=self.config.interval + 2 * CONNECT_TIMEOUT + 1)
            self._greenlet.kill(block=False)

    @staticmethod
    def _died(greenlet: Any) -> None:
        # The load test goes on without the sampler; say so, not only in a traceback.
        logger.error("connection sampler stopped: %r", greenlet.exception)

    def _users(self) -> int:
        runner = self.environment.runner
        return runner.user_count if runner is not None else 0

    def _run(self) -> None:
        pool = gevent.get_hub().threadpool
        started = time.monotonic()
        with CsvLog(self.config.csv) as log:
            while not self._stopping.is_set():
                tick = time.monotonic()
                bouncer, postgres = pool.apply(self._probe.read)  # in a real OS thread
                sample = Sample(
                    timestamp=datetime.now(UTC),
                    elapsed_s=tick - started,
                    users=self._users(),
                    saturated_503=checks.total_saturated(),
                    bouncer=bouncer,
                    postgres=postgres,
                )
                self.samples.append(sample)
                log.write(sample)
                self._stopping.wait(max(0.0, self.config.interval - (time.monotonic() - tick)))
        pool.apply(self._probe.close)


# The process's sampler (None on workers, in run_single_user, or when switched off).
current: Sampler | None = None


@on(events.init)
def _start(environment: Environment, **_: Any) -> None:
    global current
    if environment.runner is None or isinstance(environment.runner, WorkerRunner):
        return  # run_single_user debugging, or a worker: the master samples
    options = environment.parsed_options
    config = config_from(os.environ, getattr(options, "csv_prefix", None))
    if not config.enabled:
        logger.warning("connection sampler off: no PgBouncer or PostgreSQL to sample")
        return
    current = Sampler(environment, config)
    current.start()


@on(events.quitting)
def _stop(environment: Environment, **_: Any) -> None:
    if current is not None:
        current.stop()
