"""The whole local stack: bring it up (or reshape it in place), report on it, take it down."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import psycopg

from infra.localstack import certs, procs
from infra.localstack.certs import TlsFiles
from infra.localstack.config import REPO, StackSettings
from infra.localstack.haproxy import Haproxy
from infra.localstack.monitoring import (
    PgBouncerExporter,
    PostgresExporter,
    ProcessExporter,
    Prometheus,
)
from infra.localstack.pgbouncer import SAFE_SHUTDOWN, STATS_USER, PgBouncer, app_url
from infra.localstack.postgres import Postgres
from infra.localstack.replicas import Replica
from infra.localstack.secrets import password
from service.budget import check, deployment_topology, summary
from service.rules import timeout_problems
from service.settings import DeploymentSettings, Settings

APP_ROLE = "app"
APP_DATABASE = "app"
EXPORTER_ROLE = "pgscale_exporter"  # PostgreSQL role of the exporter: pg_monitor only


@dataclass
class Stack:
    """Every component of the local stack, located under `settings.stack_dir`."""

    settings: StackSettings

    @property
    def root(self) -> Path:
        return self.settings.stack_dir

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def tls(self) -> TlsFiles | None:
        """The certificates under secrets/ (made by `up`), or None with DB_TLS=false."""
        return TlsFiles(self.secrets) if self.settings.db_tls else None

    def postgres(self) -> Postgres:
        s = self.settings
        return Postgres(
            self.root / "postgres",
            s.postgres_port,
            max_connections=s.postgres_max_connections,
            superuser_reserved=s.postgres_superuser_reserved,
            tls=self.tls,
            app_role=APP_ROLE,
        )

    def pgbouncer(self, index: int = 1) -> PgBouncer:
        """PgBouncer instance `index` (1-based), on PGBOUNCER_PORT + index - 1."""
        s = self.settings
        return PgBouncer(
            self.root / "pgbouncer",
            s.pgbouncer_instance_port(index),
            s.postgres_port,
            APP_DATABASE,
            users={APP_ROLE: password(self.secrets, APP_ROLE)},
            admin_password=password(self.secrets, "pgbouncer_admin"),
            stats_password=password(self.secrets, STATS_USER),
            max_client_conn=s.pgbouncer_max_client_conn,
            default_pool_size=s.pgbouncer_default_pool_size,
            reserve_pool_size=s.pgbouncer_reserve_pool_size,
            max_db_connections=s.pgbouncer_max_db_connections,
            query_wait_timeout=s.pgbouncer_query_wait_timeout,
            server_login_retry=s.pgbouncer_server_login_retry,
            name=f"pgbouncer-{index}",
            tls=self.tls,
        )

    def pgbouncers(self) -> list[PgBouncer]:
        """The PGBOUNCER_INSTANCES instances this stack runs."""
        return [self.pgbouncer(i) for i in range(1, self.settings.pgbouncer_instances + 1)]

    def recorded_pgbouncers(self) -> list[int]:
        """Indexes of the PgBouncer instances with a pid file, running or not."""
        return sorted(
            int(path.stem.removeprefix("pgbouncer-"))
            for path in (self.root / "pgbouncer").glob("pgbouncer-*.pid")
        )

    def pgbouncer_url(self) -> str:
        """The application role through every instance (see pgbouncer.app_url)."""
        return app_url(self.pgbouncers(), APP_ROLE)

    def haproxy(self) -> Haproxy:
        return Haproxy(self.root / "haproxy", self.settings.lb_port)

    def pgbouncer_exporter(self) -> PgBouncerExporter:
        s = self.settings
        return PgBouncerExporter(
            "pgbouncer-exporter",
            self.root / "monitoring",
            s.pgbouncer_exporter_port,
            "PGBOUNCER_EXPORTER_PORT",
            pgbouncers={bouncer.name: bouncer.port for bouncer in self.pgbouncers()},
            stats_user=STATS_USER,
            stats_password=password(self.secrets, STATS_USER),
            tls=self.tls,
        )

    def process_exporter(self) -> ProcessExporter:
        return ProcessExporter(
            "process-exporter",
            self.root / "monitoring",
            self.settings.process_exporter_port,
            "PROCESS_EXPORTER_PORT",
            pgbouncer_dir=self.root / "pgbouncer",
        )

    def postgres_exporter(self) -> PostgresExporter:
        s = self.settings
        dsn = (
            f"postgresql://{EXPORTER_ROLE}:{password(self.secrets, EXPORTER_ROLE)}"
            f"@127.0.0.1:{s.postgres_port}/postgres?{urlencode(self.client_tls())}"
        )
        return PostgresExporter(
            "postgres-exporter",
            self.root / "monitoring",
            s.postgres_exporter_port,
            "POSTGRES_EXPORTER_PORT",
            dsn=dsn,
        )

    def prometheus(self, replicas: int | None = None) -> Prometheus:
        """Prometheus scraping the replicas (the first `replicas`) and the exporters."""
        s = self.settings
        count = s.replicas if replicas is None else replicas
        api: list[dict[str, object]] = [
            {"targets": [f"127.0.0.1:{s.metrics_port(i)}"], "labels": {"replica": f"replica-{i}"}}
            for i in range(1, count + 1)
        ]
        return Prometheus(
            "prometheus",
            self.root / "prometheus",
            s.prometheus_port,
            "PROMETHEUS_PORT",
            targets={
                "api": api,
                "pgbouncer": [{"targets": [f"127.0.0.1:{s.pgbouncer_exporter_port}"]}],
                "postgres": [{"targets": [f"127.0.0.1:{s.postgres_exporter_port}"]}],
                "process": [{"targets": [f"127.0.0.1:{s.process_exporter_port}"]}],
                "prometheus": [{"targets": [f"127.0.0.1:{s.prometheus_port}"]}],
            },
        )

    def exporters(self) -> list[PgBouncerExporter | PostgresExporter | ProcessExporter]:
        return [self.pgbouncer_exporter(), self.postgres_exporter(), self.process_exporter()]

    def observers(
        self,
    ) -> list[PgBouncerExporter | PostgresExporter | ProcessExporter | Prometheus]:
        return [*self.exporters(), self.prometheus()]

    def service_settings(self) -> Settings:
        """The service settings every replica gets: the environment's, pointed at PgBouncer
        (or straight at PostgreSQL with VIA_PGBOUNCER=false, to show what PgBouncer saves).

        TLS goes in the URL (so it is a working conninfo on its own) and as DB_SSLMODE and
        DB_SSLROOTCERT; direct, the URL carries PgBouncer's client certificate too.
        Validated here, before anything starts, so a bad value stops `make up` early.
        """
        url = self.pgbouncer_url() if self.settings.via_pgbouncer else self.direct_url()
        tls = self.client_tls()
        return Settings(
            database_url=url,
            db_sslmode=tls["sslmode"],
            db_sslrootcert=tls.get("sslrootcert"),
        )

    def direct_url(self) -> str:
        """The application role straight to PostgreSQL (migrations, direct mode), with
        PgBouncer's client certificate: pg_hba.conf admits the role with nothing less."""
        return (
            f"postgresql://{APP_ROLE}:{password(self.secrets, APP_ROLE)}"
            f"@127.0.0.1:{self.settings.postgres_port}/{APP_DATABASE}"
            f"?{urlencode(self.client_tls(client_cert=True))}"
        )

    def client_tls(self, *, client_cert: bool = False) -> dict[str, str]:
        """libpq's TLS parameters for this stack's servers (sslmode=disable without TLS)."""
        tls = self.tls
        return tls.libpq(client_cert=client_cert) if tls else {"sslmode": "disable"}

    def service_env(self) -> dict[str, str]:
        """Every service and deployment setting as an environment variable.

        The deployment's (REPLICAS, the PgBouncer and PostgreSQL limits) go too, so each
        replica's start-up guard checks the numbers this stack really runs with, even
        when they were set in code rather than in the environment. A change restarts
        the replicas.
        """
        per_replica = {"host", "port", "metrics_port", "replica_name", "prometheus_multiproc_dir"}
        service = {
            name.upper(): str(value)
            for name, value in self.service_settings().model_dump(mode="json").items()
            if name not in per_replica and value is not None
        }
        # REPLICAS stays out: scaling must not restart the replicas that stay (their
        # guard reads the declared count from the environment `make up` runs in).
        deployment = {
            name.upper(): str(getattr(self.settings, name)).lower()
            if isinstance(getattr(self.settings, name), bool)
            else str(getattr(self.settings, name))
            for name in DeploymentSettings.model_fields
            if name != "replicas"
        }
        return {**deployment, **service}

    def replica(self, index: int) -> Replica:
        return Replica(
            self.root / "replicas",
            index,
            self.settings.replica_port(index),
            self.settings.metrics_port(index),
            self.service_env(),
        )

    def recorded_replicas(self) -> list[int]:
        """Indexes of the replicas with a pid file, running or not."""
        return sorted(
            int(path.stem.removeprefix("replica-"))
            for path in (self.root / "replicas").glob("replica-*.pid")
        )

    # ---- up -------------------------------------------------------------------------

    def check_settings(self, *, enforce_budget: bool = True) -> Settings:
        """Validate the settings the replicas will get, before anything starts."""
        service = self.service_settings()
        budget = check(deployment_topology(service, self.settings))
        say(f"budget       {summary(budget)}")
        if enforce_budget and not budget.ok:
            raise procs.StackError(
                "the connection budget does not allow this shape: "
                + "; ".join(budget.problems)
                + f" (at most {budget.max_safe_replicas} replicas of this shape fit;"
                " python -m service.budget shows the arithmetic)"
            )
        problems = timeout_problems(
            query_wait_timeout=self.settings.pgbouncer_query_wait_timeout,
            db_deadline=service.db_deadline,
            via_pgbouncer=self.settings.via_pgbouncer,
        )
        if problems:
            raise procs.StackError("; ".join(problems))
        return service

    def up(self, *, enforce_budget: bool = True) -> None:
        """Start what is missing, reshape what changed; return once everything is healthy.

        `enforce_budget=False` lets a shape that overflows the budget start anyway (the
        sweep does it on purpose, to show what happens without PgBouncer).
        """
        s = self.settings
        service = self.check_settings(enforce_budget=enforce_budget)
        self._check_ports()
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_reachable_by_service_user()
        self._ensure_certificates()

        pg = self.postgres()
        say(f"PostgreSQL   127.0.0.1:{pg.port}")
        pg.init()
        pg.start()
        pg.ensure_role(APP_ROLE, password(self.secrets, APP_ROLE))
        pg.ensure_database(APP_DATABASE, APP_ROLE)
        pg.ensure_role(EXPORTER_ROLE, password(self.secrets, EXPORTER_ROLE))
        pg.grant_role("pg_monitor", EXPORTER_ROLE)
        self._migrate(pg)

        for bouncer in self.pgbouncers():
            say(f"{bouncer.name:<12} 127.0.0.1:{bouncer.port} (pool_mode = transaction)")
            bouncer.start()
        for exporter in self.exporters():
            exporter.start()

        lb = self.haproxy()
        wanted = list(range(1, s.replicas + 1))
        for index in wanted:
            replica = self.replica(index)
            if replica.current():
                continue
            if replica.running():  # settings changed: roll it
                say(f"{replica.name}    restarting with new settings")
                self._set_lb_state(lb, replica.name, "drain")
                replica.stop()
            say(f"{replica.name}    127.0.0.1:{replica.port} ({service.workers} workers)")
            replica.start()
            replica.wait_ready()
            self._set_lb_state(lb, replica.name, "ready")
        lb.apply({self.replica(i).name: self.replica(i).port for i in wanted})
        for index in self.recorded_replicas():
            if index not in wanted:
                replica = self.replica(index)
                say(f"{replica.name}    draining and stopping (REPLICAS={s.replicas})")
                replica.stop()
        if not procs.wait_until(lambda: self._lb_healthy(lb, len(wanted)), 15.0, interval=0.2):
            raise procs.StackError(f"haproxy does not see every replica UP: {lb.server_states()}")
        # Only now, with every replica on the new set of instances, can surplus ones go:
        # a safe shutdown lets a transaction still running on one finish first.
        for index in self.recorded_pgbouncers():
            if index > s.pgbouncer_instances:
                say(f"pgbouncer-{index}  stopping (PGBOUNCER_INSTANCES={s.pgbouncer_instances})")
                self.pgbouncer(index).stop(SAFE_SHUTDOWN)
        prometheus = self.prometheus()
        was_running = prometheus.running()
        prometheus.start()
        if was_running:
            prometheus.reload()  # rules may have changed; targets are picked up anyway
        say("")
        say(f"API          {lb.url}   (try: curl {lb.url}/items/1)")
        for index in wanted:
            say(f"  {self.replica(index).name}  {self.replica(index).url}")
        for index in wanted:
            say(f"  {self.replica(index).name}  metrics {self.replica(index).metrics_url}")
        say(f"Prometheus   {prometheus.url}")
        for bouncer in self.pgbouncers():
            say(
                f"{bouncer.name:<12} postgresql://{APP_ROLE}@127.0.0.1:{bouncer.port}/{APP_DATABASE}"
            )
        say(f"PostgreSQL   postgresql://127.0.0.1:{pg.port}/{APP_DATABASE}")
        say(f"passwords    {self.secrets}/")

    def _check_ports(self) -> None:
        """Every port a part not yet running needs must be free, before anything starts."""
        s = self.settings
        wanted = [
            (self.postgres().running(), s.postgres_port, "POSTGRES_PORT"),
            (self.haproxy().running(), s.lb_port, "LB_PORT"),
        ]
        wanted += [(b.running(), b.port, "PGBOUNCER_PORT") for b in self.pgbouncers()]
        wanted += [
            (daemon.running(), daemon.port, daemon.port_variable) for daemon in self.observers()
        ]
        wanted += [
            (self.replica(i).ports_taken_by_itself(), port, variable)
            for i in range(1, s.replicas + 1)
            for port, variable in (
                (s.replica_port(i), "REPLICA_BASE_PORT"),
                (s.metrics_port(i), "METRICS_BASE_PORT"),
            )
        ]
        for ours, port, variable in wanted:
            if not ours:
                procs.ensure_port_free(port, variable)

    def _check_reachable_by_service_user(self) -> None:
        user = procs.service_user()
        if user is None:
            return
        probe = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(self.root)])
        if probe.returncode != 0:
            raise procs.StackError(
                f"PostgreSQL runs as {user!r}, which cannot enter {self.root}; "
                "set STACK_DIR to a directory it can reach (e.g. /tmp/pgscale-stack)"
            )

    def _ensure_certificates(self) -> None:
        """The CA and server certificates, made once (and again before they expire)."""
        if self.tls is None:
            say("TLS          off (DB_TLS=false)")
            return
        files, made = certs.for_servers(self.secrets, app_role=APP_ROLE)
        say(f"TLS          {'new certificates' if made else 'certificates'} in {files.directory}")

    def _migrate(self, pg: Postgres) -> None:
        """Schema and seed data, straight to PostgreSQL, once, before any replica starts."""
        direct = self.direct_url()
        result = subprocess.run(
            [sys.executable, "-m", "service.migrate", "--seed", str(self.settings.seed_items)],
            env={**os.environ, "DATABASE_URL": direct},
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise procs.StackError(f"migration failed:\n{result.stderr.strip()}")
        say(f"schema       {result.stdout.strip()}")

    @staticmethod
    def _set_lb_state(lb: Haproxy, name: str, state: str) -> None:
        """Drain a replica before it stops; make it ready again once it is back."""
        if lb.running() and name in lb.server_states():
            lb.command(f"set server replicas/{name} state {state}")

    @staticmethod
    def _lb_healthy(lb: Haproxy, expected: int) -> bool:
        try:
            states = lb.server_states()
        except OSError:
            return False
        return sum(1 for state in states.values() if state == "UP") == expected

    # ---- status and down ------------------------------------------------------------

    def status(self) -> int:
        """Print what runs; exit code 0 only when every part is healthy."""
        healthy = True
        pg, lb = self.postgres(), self.haproxy()
        if pg.running():
            say(f"PostgreSQL   up on {pg.port}, client backends: {pg.client_backends()}")
        else:
            say("PostgreSQL   down")
            healthy = False
        wanted = {bouncer.name for bouncer in self.pgbouncers()}
        instances = sorted({*self.recorded_pgbouncers(), *range(1, len(wanted) + 1)})
        for bouncer in (self.pgbouncer(i) for i in instances):
            healthy = self._bouncer_status(bouncer, wanted=bouncer.name in wanted) and healthy
        indexes = self.recorded_replicas()
        if not indexes:
            say("replicas     none")
            healthy = False
        for index in indexes:
            replica = self.replica(index)
            ready = replica.ready()
            state = "ready" if ready else ("up, not ready" if replica.running() else "down")
            say(f"{replica.name}    {replica.url}  {state}")
            healthy = healthy and ready
        if lb.running():
            say(f"haproxy      up on {lb.port}: {lb.server_states()}")
        else:
            say("haproxy      down")
            healthy = False
        for daemon in self.observers():
            ready = daemon.ready()
            say(f"{daemon.name:<12} {daemon.url}  {'up' if ready else 'down'}")
            healthy = healthy and ready
        return 0 if healthy else 1

    @staticmethod
    def _bouncer_status(bouncer: PgBouncer, *, wanted: bool) -> bool:
        """One line for the instance and its pools; False when it is not as it should be."""
        if not bouncer.running():
            say(f"{bouncer.name:<12} down on {bouncer.port}")
            return not wanted
        try:
            pools = bouncer.admin("SHOW POOLS")
        except psycopg.Error as exc:
            say(f"{bouncer.name:<12} up on {bouncer.port}, console does not answer: {exc}")
            return False
        extra = "" if wanted else " (not in PGBOUNCER_INSTANCES: `make up` stops it)"
        say(f"{bouncer.name:<12} up on {bouncer.port}{extra}")
        cols = ("database", "user", "pool_mode", "cl_active", "cl_waiting", "sv_active", "sv_idle")
        say("  " + "".join(f"{c:>12}" for c in cols))
        for row in pools:
            say("  " + "".join(f"{row[c]!s:>12}" for c in cols))
        return wanted

    def down(self) -> None:
        """Stop everything this stack started, by recorded pid, front to back."""
        for daemon in reversed(self.observers()):
            if daemon.stop():
                say(f"{daemon.name:<12} stopped")
        if self.haproxy().stop():
            say("haproxy      stopped")
        for index in self.recorded_replicas():
            if self.replica(index).stop():
                say(f"replica-{index}    stopped")
        for index in self.recorded_pgbouncers():
            if self.pgbouncer(index).stop():
                say(f"pgbouncer-{index}  stopped")
        if self.postgres().stop():
            say("PostgreSQL   stopped")


def say(line: str) -> None:
    print(line, flush=True)
