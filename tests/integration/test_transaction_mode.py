"""Transaction pooling is safe: nothing prepared on the server, no session state kept."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from infra.localstack.config import REPO
from tests.support.stack import Databases, StartService

QUERY = "SELECT id, name FROM items WHERE id = %s"


def run_repeatedly(url: str, prepare_threshold: int | None, times: int) -> list[str]:
    """Run QUERY `times` times on each of several connections; return the errors seen."""
    errors: list[str] = []
    conns = [
        psycopg.connect(url, autocommit=True, prepare_threshold=prepare_threshold) for _ in range(6)
    ]
    try:
        for i in range(times):
            for conn in conns:
                try:
                    conn.execute(QUERY, (i % 50 + 1,)).fetchone()
                except psycopg.Error as exc:
                    errors.append(str(exc))
    finally:
        for conn in conns:
            conn.close()
    return errors


def test_the_hazard_is_real_with_prepared_statements_on(databases: Databases) -> None:
    """The control: psycopg's default (prepare after 5 runs) breaks behind this PgBouncer.

    Six clients share four server connections, so a statement prepared on one server
    connection is looked for (or made again) on another.
    """
    errors = run_repeatedly(databases.pooled_url, prepare_threshold=0, times=30)
    # "... does not exist" or "... already exists", depending on which connection it lands on
    assert any("prepared statement" in e for e in errors), errors[:3]


def test_no_prepared_statement_errors_with_prepare_threshold_none(databases: Databases) -> None:
    errors = run_repeatedly(databases.pooled_url, prepare_threshold=None, times=150)
    assert errors == []


@pytest.mark.slow
def test_service_survives_hundreds_of_identical_queries(
    start_service: StartService, databases: Databases
) -> None:
    """900 identical reads over 2 workers x 8 pool connections sharing 4 server connections."""
    replica = start_service(workers=2, pool_min=8, pool_max=8)
    with httpx.Client(base_url=replica.url, timeout=15) as http:
        # Items of its own: other tests (schemathesis) delete and rename seeded ones.
        ids = [http.post("/items", json={"name": f"same-{i}"}).json()["id"] for i in range(50)]

        def get(i: int) -> httpx.Response:
            return http.get(f"/items/{ids[i % 50]}")

        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(get, range(900)))
    odd = [(a.request.url.path, a.status_code, a.text) for a in answers if a.status_code != 200]
    assert odd == []
    log = replica.log.read_text()
    assert not re.search(r'prepared statement "\w+" (does not exist|already exists)', log)
    assert "Traceback" not in log


def test_set_local_does_not_leak_to_other_clients(databases: Databases) -> None:
    """What a write transaction sets with SET LOCAL is gone when the server connection moves on."""
    with (
        psycopg.connect(databases.pooled_url, prepare_threshold=None) as writer,
        writer.transaction(),
    ):
        writer.execute("SET LOCAL statement_timeout = '1234ms'")
        shown = writer.execute("SHOW statement_timeout").fetchone()
        assert shown == ("1234ms",)
    seen = set()
    conns = [
        psycopg.connect(databases.pooled_url, autocommit=True, prepare_threshold=None)
        for _ in range(8)
    ]
    try:
        for _ in range(10):
            for conn in conns:
                row = conn.execute("SHOW statement_timeout").fetchone()
                assert row is not None
                seen.add(row[0])
    finally:
        for conn in conns:
            conn.close()
    assert "1234ms" not in seen


# Session-level constructs that break (or leak) under transaction pooling.
FORBIDDEN = {
    "session SET": re.compile(r"""["']\s*SET\s+(?!LOCAL\b)""", re.IGNORECASE),
    "RESET": re.compile(r"""["']\s*RESET\s""", re.IGNORECASE),
    "LISTEN": re.compile(r"\bLISTEN\s+\w"),
    "PREPARE": re.compile(r"\b(PREPARE|DEALLOCATE)\s+\w"),
    "session advisory lock": re.compile(r"pg_(try_)?advisory_(un)?lock(_shared)?\("),
    "temporary table": re.compile(r"\bCREATE\s+TEMP(ORARY)?\b", re.IGNORECASE),
    "WITH HOLD cursor": re.compile(r"\bWITH\s+HOLD\b", re.IGNORECASE),
}


def session_state_in(text: str) -> list[str]:
    return [name for name, pattern in FORBIDDEN.items() if pattern.search(text)]


def test_the_guard_catches_session_state() -> None:
    assert session_state_in('conn.execute("SET statement_timeout = 0")') == ["session SET"]
    assert session_state_in('conn.execute("LISTEN jobs")') == ["LISTEN"]
    assert session_state_in('"SELECT pg_advisory_lock(1)"') == ["session advisory lock"]
    assert session_state_in('"PREPARE q AS SELECT 1"') == ["PREPARE"]
    assert session_state_in('"SET LOCAL statement_timeout = 1"') == []
    assert session_state_in('"SELECT pg_advisory_xact_lock(1)"') == []


def test_service_code_keeps_no_session_state() -> None:
    """A lint-level guard over service/: no session-level commands anywhere."""
    service = REPO / "service"
    found = {
        str(path.relative_to(service)): hits
        for path in sorted(service.rglob("*.py"))
        if (hits := session_state_in(path.read_text()))
    }
    assert found == {}
