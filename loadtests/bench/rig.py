"""The servers under test: one PostgreSQL, two PgBouncers (the second for the runs that
measure what it buys), and a replica per configuration.

All of them start before the first run, so every configuration is measured in the same
conditions, and all stop (by recorded pid) when the block ends, whatever happened.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from infra.localstack import certs, procs
from infra.localstack.config import REPO
from infra.localstack.pgbouncer import PgBouncer, app_url
from infra.localstack.postgres import Postgres
from infra.localstack.replicas import Replica
from loadtests.bench.plan import APP, POOL, REPLICA_SETTINGS, SEED_ITEMS, WORKERS, Config, Endpoint
from loadtests.bench.probes import CPUMeter, worker_rss
from loadtests.bench.results import Footprint
from loadtests.bench.scripts import write_scripts

# Settings every replica runs with, under its configuration's own.
COMMON = {
    "WORKERS": str(WORKERS),
    "POOL_MIN": str(POOL),
    "POOL_MAX": str(POOL),
    "REPLICAS": "1",
    "LOG_LEVEL": "warning",
}


def say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Rig:
    """The running servers, the replica of each configuration with what it cost, and the
    load scripts (in the scratch directory, which pgbench also writes its logs to)."""

    scratch: Path
    password: str
    postgres: Postgres
    bouncers: list[PgBouncer]  # TLS; the first serves every configuration; both, two-bouncers
    plain_bouncer: PgBouncer  # no TLS on either side: what TLS costs
    replicas: dict[Config, Replica]
    footprints: dict[Config, Footprint]
    lua: dict[Endpoint, Path]
    sql: dict[Endpoint, Path]

    @property
    def bouncer(self) -> PgBouncer:
        return self.bouncers[0]

    @property
    def pooled_url(self) -> str:
        """The application's libpq URL through PgBouncer."""
        return self.bouncer.app_conninfo(APP)

    @property
    def two_bouncers_url(self) -> str:
        """Through either PgBouncer, picked at random per connection (as make up does)."""
        return app_url(self.bouncers, APP)

    def meter(self) -> CPUMeter:
        """Every PgBouncer counts: only the ones a run goes through are busy."""
        pid_files = [b.pid_file for b in (*self.bouncers, self.plain_bouncer)]
        return CPUMeter(pid_files, self.postgres.pid_file)


@contextmanager
def rig() -> Iterator[Rig]:
    """Start everything in a scratch directory; stop it all and remove it at the end.

    Raises procs.StackError when a replica does not become ready within 30 s.
    """
    scratch = Path(tempfile.mkdtemp(prefix="pgscale-bench-"))
    scratch.chmod(0o755)
    # PostgreSQL, two PgBouncers with TLS and one without, then each configuration's
    # replica port and metrics port.
    base = procs.free_port_block(4 + 2 * len(REPLICA_SETTINGS))
    ports = base + 3  # replica i: ports + i; its metrics: metrics_base + i
    metrics_base = ports + len(REPLICA_SETTINGS)
    password = secrets.token_urlsafe(16)
    admin_password = secrets.token_urlsafe(16)
    tls, _ = certs.for_servers(scratch / "tls", app_role=APP)
    # TLS as deployed, but plain TCP admitted too, for the TLS-off PgBouncer beside.
    pg = Postgres(scratch / "postgres", base, max_connections=100, tls=tls, tls_only=False)

    def bouncer(root: str, port: int, name: str, files: certs.TlsFiles | None) -> PgBouncer:
        return PgBouncer(
            scratch / root,
            port,
            pg.port,
            APP,
            users={APP: password},
            admin_password=admin_password,
            default_pool_size=20,
            name=name,
            tls=files,
        )

    bouncers = [bouncer("pgbouncer", base + i, f"pgbouncer-{i}", tls) for i in (1, 2)]
    plain = bouncer("pgbouncer-plain", base + 3, "pgbouncer-plain", None)
    lua, sql = write_scripts(scratch)
    started = Rig(scratch, password, pg, bouncers, plain, {}, {}, lua, sql)
    urls = {
        Config.TWO_BOUNCERS: started.two_bouncers_url,
        Config.PLAIN: plain.app_conninfo(APP),
    }
    try:
        direct_url = start_databases(pg, [*bouncers, plain], password)
        urls[Config.DIRECT] = direct_url
        for i, config in enumerate(REPLICA_SETTINGS, start=1):
            url = urls.get(config, started.pooled_url)
            env = {**COMMON, "DATABASE_URL": url, **REPLICA_SETTINGS[config]}
            replica = Replica(scratch / "replicas", i, ports + i, metrics_base + i, env)
            started.replicas[config] = replica
            started.footprints[config] = start_replica(config, replica)
        yield started
    finally:
        for replica in started.replicas.values():
            replica.stop()
        for each in (*bouncers, plain):
            each.stop()
        pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def start_databases(pg: Postgres, bouncers: list[PgBouncer], password: str) -> str:
    """PostgreSQL with the application's role, database and seeded schema, then the
    PgBouncers in front of it; returns the direct URL (TLS, with the client pair)."""
    pg.init()
    pg.start()
    pg.ensure_role(APP, password)
    pg.ensure_database(APP, APP)
    direct_url = f"postgresql://{APP}:{password}@127.0.0.1:{pg.port}/{APP}"
    if pg.tls:
        direct_url += f"?{urlencode(pg.tls.libpq(client_cert=True))}"
    subprocess.run(
        [sys.executable, "-m", "service.migrate", "--seed", str(SEED_ITEMS)],
        env={**os.environ, "DATABASE_URL": direct_url},
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    for bouncer in bouncers:
        bouncer.start()
    return direct_url


def start_replica(config: Config, replica: Replica) -> Footprint:
    """Start one configuration's replica and time it to /readyz 200; a second later, its
    workers' RSS at rest."""
    started = time.monotonic()
    replica.start()
    procs.wait_until(lambda: replica.ready() or not replica.running(), 30, interval=0.02)
    if not replica.ready():
        raise procs.StackError(f"{config.label} did not start:\n{procs.tail(replica.log)}")
    footprint = Footprint(start_to_ready_s=time.monotonic() - started)
    time.sleep(1)
    footprint.rss_rest_mib = worker_rss(replica)
    say(
        f"{config.label:<26} ready in {footprint.start_to_ready_s:.2f}s,"
        f" workers at rest {', '.join(f'{r:.0f}' for r in footprint.rss_rest_mib)} MiB"
    )
    return footprint
