"""Request ids and the Server-Timing value (service/context.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra.localstack.config import REPO
from service.context import Timing, request_id_of, server_timing


def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "headers": list(headers)}


@pytest.mark.parametrize("sane", [b"abc", b"0f3a-77.x:y/z+=@_", b"a" * 128])
def test_a_sane_caller_id_is_kept(sane: bytes) -> None:
    assert request_id_of(scope((b"x-request-id", sane))) == sane.decode()


@pytest.mark.parametrize(
    "insane", [b"", b"-leading-dash", b"has space", b"a" * 129, b'quo"te', b"semi;colon"]
)
def test_anything_else_is_replaced_by_a_new_id(insane: bytes) -> None:
    made = request_id_of(scope((b"x-request-id", insane)))
    assert made != insane.decode()
    assert request_id_of(scope((b"x-request-id", made.encode()))) == made  # ours are sane


def test_new_ids_differ() -> None:
    ids = {request_id_of(scope()) for _ in range(1000)}
    assert len(ids) == 1000


def test_server_timing_names_the_parts_in_ms_and_the_batch_when_there_is_one() -> None:
    timing = Timing("r")
    timing.queue, timing.db = 0.002, 0.0015
    assert server_timing(timing, 0.005) == b"queue;dur=2.000, db;dur=1.500, app;dur=1.500"
    timing.batch = 7
    assert server_timing(timing, 0.005).endswith(b", batch;desc=7")
    # Never a negative app share, whatever the clocks did.
    assert b"app;dur=0.000" in server_timing(timing, 0.001)


FORKED = """
import os
from service.context import new_id
parent = new_id().split("-")[0]
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, new_id().split("-")[0].encode())
    os._exit(0)
os.close(write)
print(parent, os.read(read, 64).decode())
"""


def test_a_forked_worker_makes_ids_of_its_own() -> None:
    # In a process of its own: forking pytest's, threads and all, would not be safe.
    result = subprocess.run(
        [sys.executable, "-c", FORKED], capture_output=True, text=True, check=True, cwd=REPO
    )
    parent, child = result.stdout.split()
    assert child != parent
