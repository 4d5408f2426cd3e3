"""The driver ceiling: psycopg alone running the service's read, no HTTP and no framework.

`clients` async connections (as many as a replica's pools hold) each run GET_ITEM back
to back through PgBouncer for `duration` seconds, on uvloop like the workers. With the
framework ceiling (GET /healthz) and this, the benchmark can say what a request would
cost if the service's own code cost nothing.

    python -m loadtests.driver_ceiling URL [--clients 8] [--duration 8]

Prints one JSON line: queries, seconds, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import psycopg
import uvloop
from psycopg.rows import dict_row

from service import sql


async def _client(url: str, until: float, latencies: list[float], ids: int) -> None:
    async with await psycopg.AsyncConnection.connect(
        url,
        autocommit=True,
        prepare_threshold=None,
        row_factory=dict_row,
        # As the service reads behind PgBouncer: values bound client-side (service/db.py).
        cursor_factory=psycopg.AsyncClientCursor,
    ) as conn:
        while (started := time.perf_counter()) < until:
            cur = await conn.execute(sql.GET_ITEM, (random.randint(1, ids),))
            await cur.fetchone()
            latencies.append(time.perf_counter() - started)


async def _run(url: str, clients: int, duration: float, ids: int) -> dict[str, float]:
    latencies: list[float] = []
    started = time.perf_counter()
    until = started + duration
    await asyncio.gather(*(_client(url, until, latencies, ids) for _ in range(clients)))
    latencies.sort()
    return {
        "queries": len(latencies),
        "seconds": time.perf_counter() - started,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.driver_ceiling")
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--ids", type=int, default=1000, help="pick ids in 1..IDS")
    args = parser.parse_args(argv)
    print(json.dumps(uvloop.run(_run(args.url, args.clients, args.duration, args.ids))))


if __name__ == "__main__":
    main()
