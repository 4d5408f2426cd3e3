"""Idempotency-Key: a retried write creates nothing twice."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from tests.support.stack import Databases

pytestmark = pytest.mark.slow  # the session's gunicorn replica


def key() -> str:
    return f"test-{uuid.uuid4()}"


def visits_of(client: httpx.Client, item_id: int) -> int:
    count: int = client.get("/visits/count", params={"item_id": item_id}).json()["count"]
    return count


def test_a_retried_visit_is_recorded_once(client: httpx.Client) -> None:
    item = client.post("/items", json={"name": "retried"}).json()
    headers = {"Idempotency-Key": key()}
    first = client.post("/visits", json={"item_id": item["id"]}, headers=headers)
    again = client.post("/visits", json={"item_id": item["id"]}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert visits_of(client, item["id"]) == 1
    assert client.get(f"/items/{item['id']}").json()["visits"] == 1


def test_a_retried_item_is_created_once(client: httpx.Client, databases: Databases) -> None:
    name = f"once-{uuid.uuid4()}"
    headers = {"Idempotency-Key": key()}
    first = client.post("/items", json={"name": name}, headers=headers)
    again = client.post("/items", json={"name": name}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    with psycopg.connect(databases.direct_url) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE name = %s", (name,)).fetchone() == (
            1,
        )


def test_the_same_key_for_another_request_is_refused(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": key()}
    one = client.post("/items", json={"name": "first"}).json()["id"]
    two = client.post("/items", json={"name": "second"}).json()["id"]
    assert client.post("/visits", json={"item_id": one}, headers=headers).status_code == 201
    other_body = client.post("/visits", json={"item_id": two}, headers=headers)
    assert other_body.status_code == 422
    assert other_body.json()["errors"][0]["field"] == "header.Idempotency-Key"
    other_route = client.post("/items", json={"name": "x"}, headers=headers)
    assert other_route.status_code == 422


def test_a_failed_write_leaves_its_key_free(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": key()}
    missing = client.post("/visits", json={"item_id": 9_000_000_000}, headers=headers)
    assert missing.status_code == 422
    item = client.post("/items", json={"name": "late"}).json()
    # Same key, different body: allowed, because the failed write claimed nothing.
    ok = client.post("/visits", json={"item_id": item["id"]}, headers=headers)
    assert ok.status_code == 201


def test_concurrent_repeats_create_one_row(client: httpx.Client) -> None:
    item = client.post("/items", json={"name": "raced"}).json()
    headers = {"Idempotency-Key": key()}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda _: client.post("/visits", json={"item_id": item["id"]}, headers=headers),
                range(8),
            )
        )
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["id"] for a in answers}) == 1
    assert visits_of(client, item["id"]) == 1


def test_malformed_keys_are_422(client: httpx.Client) -> None:
    for bad in (b"", b"has space", b"x" * 201, "caf\u00e9".encode()):
        resp = client.post("/visits", json={"item_id": 1}, headers={b"Idempotency-Key": bad})
        assert resp.status_code == 422, bad
