"""Rules that span the tiers, each written once for every place that checks it.

The replica's start-up (service/gunicorn_conf.py), the local stack, the compose check
and the k8s check all call these, so a deployment is refused for the same reason, in
the same words, wherever it is described. The connection budget's arithmetic is
service/budget.py's.
"""

from __future__ import annotations

import configparser
import re


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
