"""The HTTP API through a real gunicorn and a real PgBouncer: CRUD, pagination, errors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.slow  # the session's gunicorn replica

PROBLEM = "application/problem+json"


def assert_problem(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body: dict[str, object] = resp.json()
    assert body["status"] == status
    for leak in ("Traceback", "psycopg", "SELECT", "INSERT", ".py", "SQLSTATE"):
        assert leak not in resp.text
    return body


def test_item_round_trip(client: httpx.Client) -> None:
    created = client.post("/items", json={"name": "lamp", "description": "brass"})
    assert created.status_code == 201
    item = created.json()
    assert item["name"] == "lamp"
    assert item["visits"] == 0

    assert client.get(f"/items/{item['id']}").json() == item

    patched = client.patch(f"/items/{item['id']}", json={"description": "copper"})
    assert patched.status_code == 200
    assert patched.json()["description"] == "copper"
    assert patched.json()["name"] == "lamp"

    assert client.delete(f"/items/{item['id']}").status_code == 204
    assert_problem(client.get(f"/items/{item['id']}"), 404)
    assert_problem(client.delete(f"/items/{item['id']}"), 404)
    assert_problem(client.patch(f"/items/{item['id']}", json={"name": "x"}), 404)


def test_visits_are_counted(client: httpx.Client) -> None:
    item = client.post("/items", json={"name": "counted"}).json()
    before = client.get("/visits/count").json()["count"]
    for _ in range(3):
        visit = client.post("/visits", json={"item_id": item["id"]})
        assert visit.status_code == 201
        assert visit.json()["item_id"] == item["id"]
    assert client.get(f"/items/{item['id']}").json()["visits"] == 3
    assert client.get("/visits/count", params={"item_id": item["id"]}).json() == {"count": 3}
    assert client.get("/visits/count").json()["count"] >= before + 3


def test_visit_to_missing_item_names_the_field(client: httpx.Client) -> None:
    body = assert_problem(client.post("/visits", json={"item_id": 9_000_000_000}), 422)
    assert body["errors"] == [{"field": "body.item_id", "message": "no item with this id"}]


def test_keyset_pagination_visits_every_item_once(client: httpx.Client) -> None:
    seen: list[int] = []
    after = 0
    while True:
        page = client.get("/items", params={"limit": 7, "after": after})
        assert page.status_code == 200
        body = page.json()
        seen.extend(item["id"] for item in body["items"])
        if body["next_after"] is None:
            break
        after = body["next_after"]
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen))
    assert len(seen) >= 200  # the seeded items at least


def test_page_size_is_capped(client: httpx.Client) -> None:
    page = client.get("/items", params={"limit": 10_000}).json()
    assert len(page["items"]) == 100


@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        ("POST", "/items", {"name": ""}, "body.name"),
        ("POST", "/items", {"name": "x" * 201}, "body.name"),
        ("POST", "/items", {"name": "nul\x00byte"}, "body.name"),
        ("POST", "/items", {"name": "ok", "colour": "red"}, "body.colour"),
        ("POST", "/items", {}, "body.name"),
        ("PATCH", "/items/1", {}, "body"),
        ("POST", "/visits", {"item_id": 0}, "body.item_id"),
        ("POST", "/visits", {"item_id": "one"}, "body.item_id"),
        ("GET", "/items/0", None, "path.item_id"),
        ("GET", "/items/9223372036854775808", None, "path.item_id"),
        ("GET", "/items/abc", None, "path.item_id"),
        ("GET", "/items?limit=0", None, "query.limit"),
        ("GET", "/items?after=-1", None, "query.after"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    client: httpx.Client, method: str, url: str, body: object, field: str
) -> None:
    resp = client.request(method, url, json=body)
    problem = assert_problem(resp, 422)
    fields = [error["field"] for error in problem["errors"]]  # type: ignore[attr-defined]
    assert field in fields


def test_invalid_input_is_not_echoed(client: httpx.Client) -> None:
    secret = "hunter2-" + "s" * 300
    resp = client.post("/items", json={"name": secret})
    assert_problem(resp, 422)
    assert "hunter2" not in resp.text


def test_malformed_json_is_422(client: httpx.Client) -> None:
    resp = client.post(
        "/items", content=b'{"name": "unterminated', headers={"content-type": "application/json"}
    )
    assert_problem(resp, 422)


@pytest.mark.parametrize(
    "text",
    [
        'O\'Reilly "quoted"',
        "'; DROP TABLE items; --",
        "Robert'); SELECT pg_sleep(10); --",
        "emoji \U0001f418 and math \U0001d4b3",
        "tab\tnewline\nbackslash\\",
    ],
)
def test_awkward_text_round_trips_verbatim(client: httpx.Client, text: str) -> None:
    created = client.post("/items", json={"name": text[:200], "description": text})
    assert created.status_code == 201, created.text
    fetched = client.get(f"/items/{created.json()['id']}").json()
    assert fetched["name"] == text[:200]
    assert fetched["description"] == text


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    big = {"name": "big", "description": "x" * 70_000}
    assert_problem(client.post("/items", json=big), 413)


def test_streamed_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    resp = client.post(
        "/items",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert_problem(resp, 413)


def test_unknown_route_is_problem_json(client: httpx.Client) -> None:
    assert_problem(client.get("/nope"), 404)
    assert_problem(client.put("/items/1", json={"name": "x"}), 405)


def test_health_endpoints(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_the_openapi_document_keeps_every_route_with_its_tags(client: httpx.Client) -> None:
    """The app takes its routers' routes directly (service/app.py); each keeps its tags."""
    paths = client.get("/openapi.json").json()["paths"]
    tags = {
        (path, method.upper()): operation["tags"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    }
    assert tags == {
        ("/healthz", "GET"): ["health"],
        ("/readyz", "GET"): ["health"],
        ("/items", "POST"): ["items"],
        ("/items", "GET"): ["items"],
        ("/items/{item_id}", "GET"): ["items"],
        ("/items/{item_id}", "PATCH"): ["items"],
        ("/items/{item_id}", "DELETE"): ["items"],
        ("/visits", "POST"): ["visits"],
        ("/visits/count", "GET"): ["visits"],
    }
    assert "503" in paths["/items/{item_id}"]["get"]["responses"]  # the router's responses
