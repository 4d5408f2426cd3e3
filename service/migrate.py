"""The schema, applied once before replicas start: `python -m service.migrate [--seed N]`.

Idempotent: each step runs once, recorded in `schema_version`, under a transaction-level
advisory lock so two migrators never race (and nothing outlives the transaction, which
keeps this safe through PgBouncer in transaction mode).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import LiteralString

import psycopg
from psycopg import sql

from service.settings import Settings, get_settings

logger = logging.getLogger("service.migrate")

MIGRATION_LOCK_KEY = 7_300_001

STEPS: list[LiteralString] = [
    # 1: items and their visits.
    """
    CREATE TABLE items (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
        description text        NOT NULL DEFAULT '' CHECK (char_length(description) <= 2000),
        visits      bigint      NOT NULL DEFAULT 0,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE visits (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        item_id     bigint      NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        created_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX visits_item_id ON visits (item_id);
    """,
    # 2: Idempotency-Key records (service/idempotency.py).
    """
    CREATE TABLE idempotency_keys (
        key         text        PRIMARY KEY,
        scope       text        NOT NULL,
        fingerprint text        NOT NULL,
        response    jsonb,
        created_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
    """,
]


def migrate(conn: psycopg.Connection[tuple[object, ...]], settings: Settings) -> int:
    """Apply the steps not yet applied; return how many ran."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version int PRIMARY KEY)")
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = int(row[0]) if row else 0  # type: ignore[call-overload]
        for version, step in enumerate(STEPS, start=1):
            if version > current:
                conn.execute(step)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                logger.info("applied schema step %d", version)
        # The role's default bounds reads, which run in autocommit without SET LOCAL.
        # It applies to server connections opened from now on.
        timeout = f"{int(settings.statement_timeout * 1000)}ms"
        conn.execute(
            sql.SQL("ALTER ROLE CURRENT_USER SET statement_timeout = {}").format(
                sql.Literal(timeout)
            )
        )
    return max(0, len(STEPS) - current)


def seed(conn: psycopg.Connection[tuple[object, ...]], count: int) -> int:
    """Top `items` up to `count` rows, so load tests and examples find ids 1..count."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        row = conn.execute("SELECT count(*) FROM items").fetchone()
        have = int(row[0]) if row else 0  # type: ignore[call-overload]
        if have < count:
            conn.execute(
                "INSERT INTO items (name, description)"
                " SELECT 'item ' || g, 'seeded item number ' || g"
                " FROM generate_series(%s::bigint, %s::bigint) AS g",
                (have + 1, count),
            )
        return max(0, count - have)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="ensure at least N items exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    try:
        with psycopg.connect(settings.conninfo, prepare_threshold=None) as conn:
            applied = migrate(conn, settings)
            seeded = seed(conn, args.seed) if args.seed else 0
    except psycopg.OperationalError as exc:
        print(f"migration failed: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    print(f"schema at version {len(STEPS)} ({applied} step(s) applied, {seeded} item(s) seeded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
