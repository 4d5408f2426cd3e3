"""Read-heavy browsing: single items by random id, and keyset pagination through the list.

Each read is one autocommit statement, so a pooled connection is held for one round
trip: this is the load under which PgBouncer multiplexes the most clients onto the
fewest server connections. Ids are drawn from 1..SEED_ITEMS (the items `make up` seeds).

    .venv/bin/locust -f loadtests/browse.py --headless -u 50 -r 10 -t 1m --csv reports/browse
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, run_single_user, task

from loadtests.common.scenario import DEFAULT_HOST, SEED_ITEMS, expect, json_body

PAGE_SIZE = 20


class Browser(FastHttpUser):
    """Reads items one at a time and pages through the listing."""

    host = DEFAULT_HOST
    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        self.after = 0  # this user's place in the listing

    @task(4)
    def read_item(self) -> None:
        item_id = random.randint(1, SEED_ITEMS)
        with self.client.get(f"/items/{item_id}", name="/items/[id]", catch_response=True) as resp:
            if expect(resp, 200) and (item := json_body(resp)) and item.get("id") != item_id:
                resp.failure(f"asked for item {item_id}, got {item.get('id')}")

    @task(1)
    def next_page(self) -> None:
        with self.client.get(
            f"/items?limit={PAGE_SIZE}&after={self.after}",
            name="/items?limit=[n]&after=[id]",
            catch_response=True,
        ) as resp:
            if not expect(resp, 200) or (page := json_body(resp)) is None:
                return
            ids = [item["id"] for item in page["items"]]
            if ids != sorted(ids) or any(i <= self.after for i in ids):
                resp.failure(f"page after {self.after} is not in id order: {ids}")
            # Back to the start after the last page.
            self.after = page["next_after"] or 0


if __name__ == "__main__":
    run_single_user(Browser)
