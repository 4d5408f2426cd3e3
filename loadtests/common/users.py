"""The user the load shapes drive: back-to-back requests, so users = requests in flight."""

from __future__ import annotations

import random

from locust import FastHttpUser, constant, task

from loadtests.common.scenario import DEFAULT_HOST, SEED_ITEMS, expect


class BackToBack(FastHttpUser):
    """Reads an item three times for every visit it records, with no pause in between."""

    abstract = True  # scenarios subclass it; Locust runs only the subclass
    host = DEFAULT_HOST
    wait_time = constant(0)

    @task(3)
    def read_item(self) -> None:
        item_id = random.randint(1, SEED_ITEMS)
        with self.client.get(f"/items/{item_id}", name="/items/[id]", catch_response=True) as resp:
            expect(resp, 200)

    @task(1)
    def visit(self) -> None:
        item_id = random.randint(1, SEED_ITEMS)
        with self.client.post(
            "/visits", json={"item_id": item_id}, name="/visits", catch_response=True
        ) as resp:
            expect(resp, 201)
