"""The schema step is idempotent and leaves the application role owning its tables."""

from __future__ import annotations

import psycopg

from service.migrate import STEPS
from tests.support.stack import APP, Databases, migrate


def test_running_the_migration_again_changes_nothing(databases: Databases) -> None:
    result = migrate(databases.direct_url, seed=10)
    assert f"schema at version {len(STEPS)} (0 step(s) applied, 0 item(s) seeded)" in result.stdout


def test_application_role_owns_its_tables_and_is_no_superuser(databases: Databases) -> None:
    with psycopg.connect(databases.direct_url) as conn:
        owners = conn.execute(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        superuser = conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert {owner for _, owner in owners} == {APP}
    assert {"items", "visits", "schema_version"} <= {table for table, _ in owners}
    assert superuser == (False,)


def test_the_role_carries_the_statement_timeout(databases: Databases) -> None:
    """Reads run in autocommit without SET LOCAL: the role's default bounds them."""
    with psycopg.connect(databases.direct_url) as conn:
        row = conn.execute("SHOW statement_timeout").fetchone()
    assert row == ("5s",)
