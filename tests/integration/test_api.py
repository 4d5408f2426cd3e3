"""The HTTP API through a real gunicorn and a real PgBouncer: CRUD, pagination, errors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import jsonschema  # type: ignore[import-untyped,unused-ignore]  # no stubs installed
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


def test_a_whole_number_written_as_a_float_is_that_id(client: httpx.Client) -> None:
    """JSON has one number type: 7.0 is 7, as JSON Schema's `integer` says."""
    item = client.post("/items", json={"name": "float id"}).json()
    visit = client.post("/visits", json={"item_id": float(item["id"])})
    assert visit.status_code == 201, visit.text
    assert visit.json()["item_id"] == item["id"]


def test_visit_to_missing_item_names_the_field(client: httpx.Client) -> None:
    body = assert_problem(client.post("/visits", json={"item_id": 9_000_000_000}), 422)
    assert body["errors"] == [{"field": "body.item_id", "message": "no item with this id"}]
    # No schema can say which ids exist: the 422's description does.
    responses = client.get("/openapi.json").json()["paths"]["/visits"]["post"]["responses"]
    assert "`body.item_id` when no item has that id" in responses["422"]["description"]


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


def test_query_integers_in_decimal_digits_are_taken(client: httpx.Client) -> None:
    """The control for the refusals below: plain digits still work, as query text."""
    page = client.get("/items?limit=5&after=0").json()
    assert len(page["items"]) == 5
    assert client.get(f"/items/{page['items'][0]['id']}").status_code == 200
    assert client.get("/visits/count?item_id=1").status_code == 200


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
        # Bodies take JSON types strictly: none of these is item 1.
        ("POST", "/visits", {"item_id": True}, "body.item_id"),
        ("POST", "/visits", {"item_id": "1"}, "body.item_id"),
        ("POST", "/visits", {"item_id": 1.5}, "body.item_id"),
        ("GET", "/items/0", None, "path.item_id"),
        ("GET", "/items/9223372036854775808", None, "path.item_id"),
        ("GET", "/items/abc", None, "path.item_id"),
        ("GET", "/items?limit=0", None, "query.limit"),
        ("GET", "/items?after=-1", None, "query.after"),
        # Path and query integers are decimal digits: int() would take all of these.
        ("GET", "/items/1.0", None, "path.item_id"),
        ("GET", "/items/%2B1", None, "path.item_id"),
        ("GET", "/items/1_0", None, "path.item_id"),
        ("GET", "/items?limit=5.0", None, "query.limit"),
        ("GET", "/items?limit=+5", None, "query.limit"),  # a query's "+" is a space
        ("GET", "/items?limit=%2B5", None, "query.limit"),
        ("GET", "/items?limit=1_0", None, "query.limit"),
        ("GET", "/items?after=0.0", None, "query.after"),
        ("GET", "/visits/count?item_id=1.0", None, "query.item_id"),
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


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("OPTIONS", "/items", {"GET", "POST"}),
        ("DELETE", "/items", {"GET", "POST"}),
        ("OPTIONS", "/items/1", {"GET", "PATCH", "DELETE"}),
        ("PUT", "/items/1", {"GET", "PATCH", "DELETE"}),
        ("GET", "/visits", {"POST"}),
        ("POST", "/visits/count", {"GET"}),
    ],
)
def test_405_allows_every_method_of_the_path(
    client: httpx.Client, method: str, url: str, allowed: set[str]
) -> None:
    """RFC 9110: `Allow` lists what the resource supports, not one route's methods."""
    resp = client.request(method, url)
    assert_problem(resp, 405)
    assert {m.strip() for m in resp.headers["allow"].split(",")} == allowed


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


INT8_MAX = 2**63 - 1


def test_the_openapi_document_bounds_every_id_to_int8(client: httpx.Client) -> None:
    """Ids are PostgreSQL int8: documented with their bounds exactly, as integers (a float
    maximum would be 2**63, one past what the service takes)."""
    document = client.get("/openapi.json").json()
    ids: dict[str, dict[str, object]] = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] in {"item_id", "after"}:
                    schema = parameter["schema"]
                    for option in schema.get("anyOf", [schema]):  # item_id or null
                        if option["type"] == "integer":
                            ids[f"{method} {path} {parameter['in']}.{parameter['name']}"] = option
    body = document["components"]["schemas"]["VisitCreate"]["properties"]["item_id"]
    ids["post /visits body.item_id"] = body
    assert len(ids) == 6, sorted(ids)  # get/patch/delete item, after, count's item_id, body
    for where, schema in ids.items():
        assert type(schema["maximum"]) is int, where
        assert schema["maximum"] == INT8_MAX, where
        assert schema["minimum"] in (0, 1), where


@pytest.mark.parametrize(
    ("body", "accepted"),
    [
        ({}, False),
        ({"name": None}, False),
        ({"name": None, "description": None}, False),
        ({"name": None, "description": "kept name"}, True),
        ({"name": "renamed"}, True),
    ],
)
def test_the_patch_schema_refuses_what_the_service_refuses(
    client: httpx.Client, body: dict[str, object], accepted: bool
) -> None:
    """PATCH needs a field to change: the document says so (`minProperties`, and a
    non-null field), so a client validating against it is refused nothing else."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ItemUpdate"]
    assert schema["minProperties"] == 1
    assert jsonschema.Draft202012Validator(schema).is_valid(body) is accepted
    item = client.post("/items", json={"name": "to patch"}).json()
    resp = client.patch(f"/items/{item['id']}", json=body)
    assert resp.status_code == (200 if accepted else 422), resp.text


def test_the_idempotency_key_answers_are_documented_where_it_is_taken(
    client: httpx.Client,
) -> None:
    """Every route taking the header documents a replay and a key reused for another
    body, and answers the reuse as documented."""
    paths = client.get("/openapi.json").json()["paths"]
    takers = {
        (path, method): operation
        for path, operations in paths.items()
        for method, operation in operations.items()
        if any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", []))
    }
    assert set(takers) == {("/items", "post"), ("/visits", "post")}
    item = client.post("/items", json={"name": "keyed"}).json()
    bodies: dict[str, tuple[dict[str, object], dict[str, object]]] = {
        "/items": ({"name": "first"}, {"name": "second"}),
        "/visits": ({"item_id": item["id"]}, {"item_id": 1}),
    }
    for (path, _), operation in takers.items():
        responses = operation["responses"]
        assert "Idempotent-Replayed" in responses["201"]["headers"]
        assert "Idempotency-Key" in responses["422"]["description"]
        key = f"reused-{path}-{item['id']}"
        first, other = bodies[path]
        assert client.post(path, json=first, headers={"Idempotency-Key": key}).status_code == 201
        replay = client.post(path, json=first, headers={"Idempotency-Key": key})
        assert replay.status_code == 201
        assert replay.headers["Idempotent-Replayed"] == "true"
        reused = client.post(path, json=other, headers={"Idempotency-Key": key})
        body = assert_problem(reused, 422)
        assert body["errors"] == [
            {"field": "header.Idempotency-Key", "message": "already used for a different request"}
        ]


@pytest.mark.parametrize("field", ["name", "description"])
def test_the_document_says_text_holds_no_nul(client: httpx.Client, field: str) -> None:
    """PostgreSQL text cannot hold NUL, so the service refuses it; the schema says so."""
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ItemCreate"]
    body = {"name": "ok", field: "nul\x00byte"}
    assert not jsonschema.Draft202012Validator(schema).is_valid(body)
    assert jsonschema.Draft202012Validator(schema).is_valid({"name": "ok", field: "no nul"})
    problem = assert_problem(client.post("/items", json=body), 422)
    assert problem["errors"] == [
        {"field": f"body.{field}", "message": "Value error, must not contain NUL characters"}
    ]
