"""A burst of requests that lands on one worker in one turn of its event loop.

Through haproxy, or from threads, requests reach a worker one by one over a few
milliseconds, and each may find the state the one before it left. To see what a worker
does with requests that truly arrive together, the burst:

1. opens keep-alive connections to one replica, each answered once (`/healthz`), and
   finds which worker accepted each one: the server side of the connection is a socket
   inode in /proc/net/tcp, held open by exactly one worker (/proc/<pid>/fd);
2. keeps `size` connections of one worker, stops that worker (SIGSTOP), writes one
   request on each, and lets it go on (SIGCONT): its next wait for events finds every
   socket readable, so it starts every request in the same turn.

Everything is plain blocking http.client; the stopped worker is continued whatever
happens (a `finally`), within milliseconds of being stopped.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from tests.faults.load import PROBLEM_JSON, Attempt, Recorder

MOST_CONNECTIONS = 64  # opened to find `size` on one worker before giving up


def _hex_endpoint(port: int) -> str:
    """127.0.0.1:`port` as /proc/net/tcp writes it (little-endian address)."""
    return f"0100007F:{port:04X}"


def server_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the server side of the loopback connection from `client_port`."""
    local, remote = _hex_endpoint(server_port), _hex_endpoint(client_port)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[9])
    return None


def socket_owners(pids: set[int]) -> dict[int, int]:
    """{socket inode: pid} for every socket `pids` hold open."""
    owners: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owners[int(target[8:-1])] = pid
    return owners


@contextlib.contextmanager
def connections_on_one_worker(
    port: int, workers: set[int], size: int
) -> Iterator[tuple[int, list[http.client.HTTPConnection]]]:
    """`size` keep-alive connections to 127.0.0.1:`port` that one worker holds, and its pid.

    Connections another worker took stay open meanwhile (closed, the next one could
    land anywhere); all are closed on exit. AssertionError if no worker gets `size`
    of `MOST_CONNECTIONS`.
    """
    opened: list[http.client.HTTPConnection] = []
    by_worker: dict[int, list[http.client.HTTPConnection]] = {}
    try:
        while len(opened) < MOST_CONNECTIONS:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            opened.append(conn)
            conn.request("GET", "/healthz")
            conn.getresponse().read()  # answered: a worker accepted it
            assert conn.sock is not None
            inode = server_inode(port, conn.sock.getsockname()[1])
            owner = socket_owners(workers).get(inode) if inode is not None else None
            if owner is None:
                continue
            mine = by_worker.setdefault(owner, [])
            mine.append(conn)
            if len(mine) == size:
                yield owner, mine
                return
        raise AssertionError(
            f"no worker of {sorted(workers)} took {size} of {len(opened)} connections:"
            f" { ({pid: len(c) for pid, c in by_worker.items()}) }"
        )
    finally:
        for conn in opened:
            conn.close()


def fire_in_one_turn(
    worker: int,
    conns: list[http.client.HTTPConnection],
    paths: list[str],
    recorder: Recorder,
    *,
    source: str = "burst",
) -> list[Attempt]:
    """Send `paths[i]` on `conns[i]` while `worker` is stopped, then read every answer."""
    assert len(paths) == len(conns)
    started: list[float] = []
    os.kill(worker, signal.SIGSTOP)
    try:
        for conn, path in zip(conns, paths, strict=True):
            started.append(time.monotonic())
            conn.request("GET", path)
    finally:
        os.kill(worker, signal.SIGCONT)
    attempts = []
    for conn, began in zip(conns, started, strict=True):
        attempt = _answer(conn, began, source)
        recorder.add(attempt)
        attempts.append(attempt)
    return attempts


def _answer(conn: http.client.HTTPConnection, started: float, source: str) -> Attempt:
    try:
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return Attempt(
            source, "read", started, time.monotonic() - started, None, type(exc).__name__
        )
    detail = None
    if resp.status >= 400 and resp.getheader("content-type") == PROBLEM_JSON:
        detail = json.loads(body).get("detail")
    return Attempt(
        source,
        "read",
        started,
        time.monotonic() - started,
        resp.status,
        detail=detail,
        retry_after=resp.getheader("retry-after"),
    )
