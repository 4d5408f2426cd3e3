"""Rules that span the tiers, each written once for every place that checks it.

The replica's start-up (service/gunicorn_conf.py), the local stack, the compose check
and the k8s check all call these, so a deployment is refused for the same reason, in
the same words, wherever it is described. The connection budget's arithmetic is
service/budget.py's.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Mapping


def timeout_problems(
    *, query_wait_timeout: float, db_deadline: float, via_pgbouncer: bool = True
) -> list[str]:
    """PgBouncer's `query_wait_timeout` must end a queued query before DB_DEADLINE does.

    Otherwise a query queued in PgBouncer is still queued when the service gives up on
    it, and PgBouncer runs it for nobody.
    """
    if via_pgbouncer and query_wait_timeout >= db_deadline:
        return [
            f"PGBOUNCER_QUERY_WAIT_TIMEOUT ({query_wait_timeout:g}s) must be below"
            f" DB_DEADLINE ({db_deadline:g}s), so PgBouncer gives up before the service does"
        ]
    return []


def pool_mode_problems(ini: str, where: str) -> list[str]:
    """Anything in a pgbouncer.ini (template) but transaction pooling, said plainly.

    Every deployment must run PgBouncer in transaction mode: the mode every rule of the
    service (no prepared statements, no session state) assumes, and the one that
    multiplexes R x W x P clients onto few servers.
    """
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(ini)
    except configparser.Error as exc:
        return [f"{where}: not a valid ini file ({exc})"]
    problems = []
    mode = parser.get("pgbouncer", "pool_mode", fallback=None)
    if mode != "transaction":
        problems.append(f"{where}: pool_mode = {mode} in [pgbouncer], not transaction")
    if parser.has_section("databases"):
        for name, value in parser.items("databases"):
            found = re.search(r"\bpool_mode\s*=\s*(\w+)", value)
            if found and found[1] != "transaction":
                problems.append(f"{where}: database {name} overrides pool_mode = {found[1]}")
    return problems


# libpq's sslmodes that may leave a hop in plain text: `prefer` (libpq's default) and
# `allow` fall back to it without a word.
PLAINTEXT_SSLMODES = frozenset({"disable", "allow", "prefer"})


def sslmode_in(conninfo: str) -> str | None:
    """The sslmode a libpq URL, key=value string or exporter URI names, if any."""
    found = re.search(r"\bsslmode\s*=\s*([A-Za-z-]+)", conninfo)
    return found[1] if found else None


def service_sslmode(env: Mapping[str, str], default: str) -> str:
    """What a replica (or the migration) connects with: DATABASE_URL's sslmode, else
    DB_SSLMODE, else the service's default (service/settings.py)."""
    return sslmode_in(env.get("DATABASE_URL", "")) or env.get("DB_SSLMODE") or default


def tls_problems(hops: Mapping[str, str | None]) -> list[str]:
    """Every database hop encrypted: one at disable, allow or prefer (or unset, which
    libpq reads as prefer) is refused, named. `hops` maps a hop to its sslmode
    (PostgreSQL's side as `require` when `ssl = on` with hostssl-only rules)."""
    return [
        f"{hop}: sslmode {mode or 'unset (libpq falls back to prefer)'} can run this hop"
        " in plain text; use verify-full (require for PgBouncer's clients)"
        for hop, mode in hops.items()
        if mode is None or mode.strip().lower() in PLAINTEXT_SSLMODES
    ]


def postgres_sslmode(env: Mapping[str, str]) -> str:
    """PostgreSQL's side of its hops as an sslmode: `require` only with `ssl = on` and
    hostssl-only network rules (infra/postgres/pg_hba.conf's POSTGRES_HBA_HOST)."""
    encrypted = env.get("POSTGRES_SSL") == "on" and env.get("POSTGRES_HBA_HOST") == "hostssl"
    return "require" if encrypted else "disable"
