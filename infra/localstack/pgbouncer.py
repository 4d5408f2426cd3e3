"""A PgBouncer in transaction mode under a directory of ours, and its admin console."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg.rows import dict_row

from infra.localstack import procs
from infra.localstack.certs import TlsFiles
from infra.localstack.render import render, write_private

ADMIN_USER = "pgbouncer_admin"  # the console's admin: PAUSE, RELOAD, SHUTDOWN
STATS_USER = "pgbouncer_stats"  # read-only SHOW commands, for the exporter and samplers

# PgBouncer 1.18: SIGINT waits for clients to finish (safe); SIGTERM stops at once.
SAFE_SHUTDOWN, IMMEDIATE_SHUTDOWN = signal.SIGINT, signal.SIGTERM


@dataclass
class PgBouncer:
    """PgBouncer listening on 127.0.0.1:`port`, pooling `database` on PostgreSQL.

    Several instances may share `root`: each one's files are named after it.
    """

    root: Path
    port: int
    postgres_port: int
    database: str
    users: dict[str, str] = field(default_factory=dict)  # role -> password
    admin_password: str = ""
    stats_password: str = ""
    max_client_conn: int = 1000
    default_pool_size: int = 20
    reserve_pool_size: int = 5
    max_db_connections: int = 30
    query_wait_timeout: int = 5
    server_login_retry: int = 1
    name: str = "pgbouncer-1"
    tls: TlsFiles | None = None  # None: plain TCP, only to measure what TLS costs

    @property
    def ini(self) -> Path:
        return self.root / f"{self.name}.ini"

    @property
    def auth_file(self) -> Path:
        return self.root / f"{self.name}.users.txt"

    @property
    def pid_file(self) -> Path:
        return self.root / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def values(self) -> dict[str, object]:
        """The template's placeholders, by name."""
        return {
            "APP_DATABASE": self.database,
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": self.postgres_port,
            "PGBOUNCER_LISTEN": "127.0.0.1",
            "PGBOUNCER_PORT": self.port,
            "PGBOUNCER_AUTH_FILE": self.auth_file,
            "PGBOUNCER_ADMIN_USER": ADMIN_USER,
            "PGBOUNCER_STATS_USER": STATS_USER,
            "PGBOUNCER_MAX_CLIENT_CONN": self.max_client_conn,
            "PGBOUNCER_DEFAULT_POOL_SIZE": self.default_pool_size,
            "PGBOUNCER_RESERVE_POOL_SIZE": self.reserve_pool_size,
            "PGBOUNCER_MAX_DB_CONNECTIONS": self.max_db_connections,
            "PGBOUNCER_QUERY_WAIT_TIMEOUT": self.query_wait_timeout,
            "PGBOUNCER_SERVER_LOGIN_RETRY": self.server_login_retry,
            "PGBOUNCER_CLIENT_TLS_SSLMODE": "require" if self.tls else "disable",
            "PGBOUNCER_SERVER_TLS_SSLMODE": "verify-full" if self.tls else "disable",
            "TLS_DIR": self.tls.directory if self.tls else "",
        }

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        procs.hand_to_service_user(self.root)
        write_private(self.ini, render("pgbouncer/pgbouncer.ini", self.values()))
        # Plain passwords let PgBouncer answer SCRAM from clients *and* log in to
        # PostgreSQL with SCRAM itself; the file is readable by its owner only.
        users = {**self.users, ADMIN_USER: self.admin_password}
        if self.stats_password:
            users[STATS_USER] = self.stats_password
        lines = [f'"{user}" "{password}"' for user, password in sorted(users.items())]
        write_private(self.auth_file, "\n".join(lines) + "\n")
        procs.hand_to_service_user(self.ini, self.auth_file)

    def running(self) -> bool:
        return procs.alive(procs.read_pid(self.pid_file))

    def start(self, timeout: float = 15.0) -> None:
        """Start PgBouncer (if it is not running) and wait until its admin console answers."""
        self.write_config()
        if not self.running():
            procs.ensure_port_free(self.port, "PGBOUNCER_PORT")
            procs.spawn(["pgbouncer", str(self.ini)], self.log, self.pid_file, as_service_user=True)
        if not procs.wait_until(self.answering, timeout, interval=0.1):
            raise procs.StackError(f"PgBouncer did not start:\n{procs.tail(self.log)}")

    def answering(self) -> bool:
        try:
            self.admin("SHOW VERSION")
        except psycopg.Error:
            return False
        return True

    def stop(self, sig: signal.Signals = IMMEDIATE_SHUTDOWN, timeout: float = 30.0) -> bool:
        return procs.stop_recorded(self.pid_file, sig, timeout)

    def admin_conninfo(self) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname=pgbouncer user={ADMIN_USER}"
            f" password={self.admin_password} connect_timeout=3{self.tls_params()}"
        )

    def tls_params(self) -> str:
        """Conninfo parameters a client needs to reach this PgBouncer (empty without TLS)."""
        return "".join(f" {key}={value}" for key, value in self.client_tls().items())

    def client_tls(self) -> dict[str, str]:
        """libpq's TLS parameters toward this PgBouncer (sslmode=disable without TLS)."""
        return self.tls.libpq() if self.tls else {"sslmode": "disable"}

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run one admin console command (`SHOW POOLS`, `RELOAD`, ...) and return its rows.

        The console speaks only the simple query protocol, which psycopg uses for a
        statement without parameters on a ClientCursor.
        """
        with psycopg.connect(
            self.admin_conninfo(), autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cur = conn.cursor(row_factory=dict_row)
            cur.execute(command)
            return cur.fetchall() if cur.description else []

    def server_pids(self) -> set[str]:
        """The PostgreSQL backend of each server connection it holds now (SHOW SERVERS;
        a login still in progress has none yet): tells the connections it had from the
        ones that replaced them."""
        return {str(r["remote_pid"]) for r in self.admin("SHOW SERVERS") if r["remote_pid"]}

    def app_conninfo(self, user: str) -> str:
        """libpq URL for `user` through PgBouncer."""
        url = f"postgresql://{user}:{self.users[user]}@127.0.0.1:{self.port}/{self.database}"
        return f"{url}?{urlencode(self.client_tls())}"


def app_url(bouncers: Sequence[PgBouncer], user: str) -> str:
    """libpq URL for `user` through every one of `bouncers` (they share users and TLS).

    With several, libpq (16+; psycopg's wheel ships 18) picks one at random for each new
    connection and tries the next when one refuses: pools spread over the instances,
    move to the survivors when one dies, and a cancel request goes to the instance that
    runs the statement (PgBouncer 1.18 cannot forward it to a peer).
    """
    first = bouncers[0]
    if len(bouncers) == 1:
        return first.app_conninfo(user)
    hosts = ",".join(f"127.0.0.1:{bouncer.port}" for bouncer in bouncers)
    return (
        f"postgresql://{user}:{first.users[user]}@{hosts}/{first.database}"
        f"?load_balance_hosts=random&{urlencode(first.client_tls())}"
    )
