"""The cross-tier rules every deployment check shares (service/rules.py)."""

from __future__ import annotations

from service.rules import pool_mode_problems, service_sslmode, timeout_problems, tls_problems


def test_query_wait_must_end_before_the_deadline() -> None:
    assert timeout_problems(query_wait_timeout=5, db_deadline=8) == []
    [problem] = timeout_problems(query_wait_timeout=8, db_deadline=8)
    assert problem == (
        "PGBOUNCER_QUERY_WAIT_TIMEOUT (8s) must be below DB_DEADLINE (8s),"
        " so PgBouncer gives up before the service does"
    )
    # Straight to PostgreSQL there is no PgBouncer queue to order against.
    assert timeout_problems(query_wait_timeout=8, db_deadline=8, via_pgbouncer=False) == []


def test_only_transaction_pooling_passes() -> None:
    ok = "[databases]\napp = host=db\n[pgbouncer]\npool_mode = transaction\n"
    assert pool_mode_problems(ok, "ini") == []
    session = ok.replace("transaction", "session")
    assert pool_mode_problems(session, "ini") == [
        "ini: pool_mode = session in [pgbouncer], not transaction"
    ]
    override = ok.replace("host=db", "host=db pool_mode=session")
    assert pool_mode_problems(override, "ini") == [
        "ini: database app overrides pool_mode = session"
    ]


def test_tls_refuses_every_hop_that_can_fall_back_to_plain_text() -> None:
    hops = {m: m for m in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")}
    found = tls_problems({**hops, "unset": None})
    assert [p.split(":")[0] for p in found] == ["disable", "allow", "prefer", "unset"]
    assert "libpq falls back to prefer" in found[-1]


def test_the_service_sslmode_is_the_urls_then_the_settings() -> None:
    url = "postgresql://app@h:1/app?sslmode=require"
    assert service_sslmode({"DATABASE_URL": url, "DB_SSLMODE": "disable"}, "x") == "require"
    assert service_sslmode({"DATABASE_URL": "host=h sslmode=disable"}, "x") == "disable"
    assert service_sslmode({"DB_SSLMODE": "prefer"}, "verify-full") == "prefer"
    assert service_sslmode({}, "verify-full") == "verify-full"
