"""Every response names its request and says where its time went; so do the logs.

One real replica with JSON logs and the access log on; one with a single pooled
connection, where concurrent reads coalesce and queue.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from infra.localstack import procs
from infra.localstack.replicas import Replica
from tests.support.stack import StartService, make_items

pytestmark = pytest.mark.slow  # real gunicorn replicas

TIMING = re.compile(r"(\w+);(dur|desc)=([\d.]+)")


def timings(response: httpx.Response) -> dict[str, float]:
    """Server-Timing's entries by name (durations in ms, the batch as a count)."""
    entries = TIMING.findall(response.headers["server-timing"])
    return {name: float(value) for name, _, value in entries}


def log_objects(replica: Replica) -> list[dict[str, Any]]:
    lines = replica.log.read_text(encoding="utf-8", errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def json_replica(start_service: StartService) -> Replica:
    return start_service(log_format="json", access_log="true", slow_request_ms=100_000)


def test_every_response_carries_its_id_and_timing(json_replica: Replica) -> None:
    with httpx.Client(base_url=json_replica.url, timeout=15) as http:
        (item,) = make_items(json_replica.url, 1)
        read = http.get(f"/items/{item}", headers={"X-Request-ID": "trace-me.1"})
        insane = {"X-Request-ID": "bad id; with spaces"}
        missing = http.get("/items/9223372036854775807", headers=insane)
        unrouted = http.get("/nowhere")
    assert read.status_code == 200
    assert read.headers["x-request-id"] == "trace-me.1"
    spent = timings(read)
    assert {"queue", "db", "app"} <= spent.keys()
    assert spent["db"] > 0  # it ran a statement
    assert spent["batch"] >= 1  # a coalesced read, alone or not

    # An insane id is replaced, and the problem body names the id the header carries.
    assert missing.status_code == 404
    assert missing.headers["x-request-id"] != "bad id; with spaces"
    assert missing.json()["request_id"] == missing.headers["x-request-id"]
    assert unrouted.json()["request_id"] == unrouted.headers["x-request-id"]
    assert timings(unrouted)["db"] == 0  # nothing touched the database


def test_json_logs_name_the_request(json_replica: Replica) -> None:
    with httpx.Client(base_url=json_replica.url, timeout=15) as http:
        http.get("/items/1", headers={"X-Request-ID": "find-my-line"})

    def access_line() -> dict[str, Any] | None:
        found = [o for o in log_objects(json_replica) if o.get("request_id") == "find-my-line"]
        return found[0] if found else None

    assert procs.wait_until(lambda: access_line() is not None, 10)
    line = access_line()
    assert line is not None
    assert line["route"] == "/items/{item_id}"
    assert line["status"] in (200, 404)
    assert line["duration_ms"] >= line["db_ms"] > 0
    assert "queue_ms" in line
    assert line["replica"]
    assert line["level"] == "INFO"
    # gunicorn's own lines are JSON too: the whole log parses, line by line.
    text = json_replica.log.read_text(encoding="utf-8").splitlines()
    assert text
    assert all(line.startswith("{") for line in text), text[:3]
    assert any(o["logger"].startswith("gunicorn") for o in log_objects(json_replica))


def test_reads_that_queue_together_say_so(start_service: StartService) -> None:
    """With one connection and 32 reads in flight, most queue, and most share a statement;
    the slow-request line is written without the access log."""
    replica = start_service(pool_min=1, pool_max=1, slow_request_ms=1, log_format="json")
    ids = make_items(replica.url, 50)
    with httpx.Client(base_url=replica.url, timeout=15) as http, ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: http.get(f"/items/{ids[i % 50]}"), range(600)))
    assert [a.status_code for a in answers] == [200] * 600
    spent = [timings(a) for a in answers]
    assert max(s["batch"] for s in spent) > 1
    assert max(s["queue"] for s in spent) > 0
    assert procs.wait_until(
        lambda: any(o["message"].startswith("slow request") for o in log_objects(replica)), 10
    )
