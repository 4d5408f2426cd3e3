"""Write-heavy: record visits, each a short explicit transaction, with an occasional count.

A write holds its pooled (and PgBouncer server) connection for BEGIN, SET LOCAL, the
statement and COMMIT, and takes a row lock on the item: compare its connection counts
with browse.py's at the same user count.

    .venv/bin/locust -f loadtests/visits.py --headless -u 50 -r 10 -t 1m --csv reports/visits
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, run_single_user, task

from loadtests.common.scenario import DEFAULT_HOST, SEED_ITEMS, expect, json_body


class Visitor(FastHttpUser):
    """Mostly records visits to random items; now and then reads an item's count."""

    host = DEFAULT_HOST
    wait_time = between(0.05, 0.25)

    @task(10)
    def visit(self) -> None:
        item_id = random.randint(1, SEED_ITEMS)
        with self.client.post(
            "/visits", json={"item_id": item_id}, name="/visits", catch_response=True
        ) as resp:
            if expect(resp, 201) and (visit := json_body(resp)) and visit.get("item_id") != item_id:
                resp.failure(f"visit recorded for item {visit.get('item_id')}, not {item_id}")

    @task(1)
    def count(self) -> None:
        item_id = random.randint(1, SEED_ITEMS)
        with self.client.get(
            f"/visits/count?item_id={item_id}",
            name="/visits/count?item_id=[id]",
            catch_response=True,
        ) as resp:
            if expect(resp, 200) and (body := json_body(resp)) and body.get("count", -1) < 0:
                resp.failure(f"bad count: {body}")


if __name__ == "__main__":
    run_single_user(Visitor)
