"""Mixed create, read, update and delete on items each user creates for itself.

Reads and writes interleave as in a typical API: the mix shows how transactions and
single statements share the pools. Users touch only their own items (ids above the
seeded ones), so a 404 is a real failure, and they delete what is left when they stop.

    .venv/bin/locust -f loadtests/crud.py --headless -u 30 -r 10 -t 1m --csv reports/crud
"""

from __future__ import annotations

import random
import uuid

from locust import FastHttpUser, between, run_single_user, task

from loadtests.common.scenario import DEFAULT_HOST, expect, json_body

KEEP_AT_MOST = 20  # items a user holds before it deletes the oldest


class Editor(FastHttpUser):
    """Creates items, reads and renames them, and deletes them again."""

    host = DEFAULT_HOST
    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        self.mine: list[int] = []
        self.tag = uuid.uuid4().hex[:8]

    @task(2)
    def create(self) -> None:
        body = {"name": f"load {self.tag}", "description": "created by loadtests/crud.py"}
        with self.client.post("/items", json=body, name="/items", catch_response=True) as resp:
            if expect(resp, 201) and (item := json_body(resp)):
                self.mine.append(int(item["id"]))
        if len(self.mine) > KEEP_AT_MOST:
            self._delete(self.mine.pop(0))

    @task(5)
    def read(self) -> None:
        if not self.mine:
            self.create()
            return
        item_id = random.choice(self.mine)
        with self.client.get(f"/items/{item_id}", name="/items/[id]", catch_response=True) as resp:
            if expect(resp, 200) and (item := json_body(resp)) and item.get("id") != item_id:
                resp.failure(f"asked for item {item_id}, got {item.get('id')}")

    @task(2)
    def update(self) -> None:
        if not self.mine:
            self.create()
            return
        item_id = random.choice(self.mine)
        name = f"load {self.tag} v{random.randint(1, 10**6)}"
        with self.client.patch(
            f"/items/{item_id}", json={"name": name}, name="/items/[id]", catch_response=True
        ) as resp:
            if expect(resp, 200) and (item := json_body(resp)) and item.get("name") != name:
                resp.failure(f"item {item_id} was not renamed")

    @task(1)
    def delete(self) -> None:
        if self.mine:
            self._delete(self.mine.pop(random.randrange(len(self.mine))))

    def _delete(self, item_id: int) -> None:
        with self.client.delete(
            f"/items/{item_id}", name="/items/[id]", catch_response=True
        ) as resp:
            expect(resp, 204)

    def on_stop(self) -> None:
        while self.mine:
            self._delete(self.mine.pop())


if __name__ == "__main__":
    run_single_user(Editor)
