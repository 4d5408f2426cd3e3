"""A PostgreSQL server in a directory of ours: initdb, start, stop, roles and database."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from infra.localstack import procs
from infra.localstack.certs import TlsFiles
from infra.localstack.render import render, write_private

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"

# Shutdown modes of the postmaster, by signal.
SMART, FAST, IMMEDIATE = signal.SIGTERM, signal.SIGINT, signal.SIGQUIT


@dataclass
class Postgres:
    """One cluster under `root` (data/, run/, postgres.log, postgres.pid)."""

    root: Path
    port: int
    max_connections: int = 100
    superuser_reserved: int = 3
    tls: TlsFiles | None = None  # None: plain TCP, only to measure what TLS costs
    app_role: str = "app"  # admitted over the network only with PgBouncer's client cert
    # False: plain TCP admitted beside TLS, and no client certificate asked (the
    # benchmark's TLS-off PgBouncer shares this server). Never in a deployment.
    tls_only: bool = True

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        return self.root / "postgres.pid"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def superuser_conninfo(self, dbname: str = "postgres") -> str:
        """Over the Unix socket, which only the database's user (and root) can enter."""
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}"

    def init(self) -> None:
        """initdb once; (re)write our settings every time so port changes apply."""
        for path in (self.root, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o700)
        procs.hand_to_service_user(self.root, self.socket_dir)
        if not (self.data / "PG_VERSION").exists():
            procs.run_as_service_user(
                [
                    str(PG_BIN / "initdb"),
                    "--pgdata",
                    str(self.data),
                    "--username",
                    SUPERUSER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        conf = render(
            "postgres/postgresql.conf",
            {
                "POSTGRES_LISTEN": "127.0.0.1",
                "POSTGRES_PORT": self.port,
                "POSTGRES_MAX_CONNECTIONS": self.max_connections,
                "POSTGRES_SUPERUSER_RESERVED": self.superuser_reserved,
                "POSTGRES_SOCKET_DIR": self.socket_dir,
                "POSTGRES_SSL": "on" if self.tls else "off",
                "TLS_DIR": self.tls.directory if self.tls else "",
            },
        )
        tls_only = self.tls is not None and self.tls_only
        hba = {
            "APP_USER": self.app_role,
            "POSTGRES_HBA_HOST": "hostssl" if tls_only else "host",
            "POSTGRES_HBA_APP_OPTIONS": "clientcert=verify-full" if tls_only else "",
        }
        write_private(self.data / "pgscale.conf", conf)
        write_private(self.data / "pg_hba.conf", render("postgres/pg_hba.conf", hba))
        procs.hand_to_service_user(self.data / "pgscale.conf", self.data / "pg_hba.conf")
        main_conf = self.data / "postgresql.conf"
        if "include 'pgscale.conf'" not in main_conf.read_text():
            with main_conf.open("a") as out:
                out.write("\ninclude 'pgscale.conf'\n")

    def running(self) -> bool:
        return procs.alive(procs.read_pid(self.pid_file))

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster (if it is not running) and wait until it accepts connections."""
        if not self.running():
            procs.ensure_port_free(self.port, "POSTGRES_PORT")
            procs.spawn(
                [str(PG_BIN / "postgres"), "-D", str(self.data)],
                self.log,
                self.pid_file,
                as_service_user=True,
            )
        if not procs.wait_until(self.accepting, timeout, interval=0.2):
            raise procs.StackError(f"PostgreSQL did not start:\n{procs.tail(self.log)}")

    def accepting(self) -> bool:
        try:
            with psycopg.connect(self.superuser_conninfo(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def reload(self) -> None:
        """Re-read the configuration, pg_hba.conf and the TLS files (SIGHUP)."""
        with psycopg.connect(self.superuser_conninfo(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")

    def stop(self, mode: signal.Signals = FAST, timeout: float = 30.0) -> bool:
        return procs.stop_recorded(self.pid_file, mode, timeout)

    def ensure_role(self, role: str, password: str, *, superuser: bool = False) -> None:
        """Create or update a login role whose password is stored as a SCRAM secret."""
        with psycopg.connect(self.superuser_conninfo(), autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = sql.SQL("ALTER" if exists else "CREATE")
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN {} PASSWORD {}").format(
                    verb,
                    sql.Identifier(role),
                    sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"),
                    sql.Literal(password),
                )
            )

    def grant_role(self, group: str, member: str) -> None:
        """Make `member` a member of `group` (e.g. pg_monitor for the exporter)."""
        with psycopg.connect(self.superuser_conninfo(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(member))
            )

    def ensure_database(self, name: str, owner: str) -> None:
        """A database owned by `owner`, so the application role owns what it creates
        in its public schema, and nothing it could create beside that."""
        with psycopg.connect(self.superuser_conninfo(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(owner)
                    )
                )
            conn.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name))
            )
            # The owner keeps CONNECT and its public schema, not new schemas or temp tables.
            conn.execute(
                sql.SQL("REVOKE CREATE, TEMPORARY ON DATABASE {} FROM {}").format(
                    sql.Identifier(name), sql.Identifier(owner)
                )
            )

    def client_backends(self) -> int:
        """How many client backends PostgreSQL has now (ourselves excluded)."""
        with psycopg.connect(self.superuser_conninfo(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
        return int(row[0]) if row else 0
