"""The calibration file from a bench run: what the planner and the simulation read.

Each process's CPU per request is measured twice per endpoint: with coalescing off
(`pooled, coalescing off`, k = 1 request per statement) and as deployed (k measured
from the replica's own metrics). Two points fix `per_request + per_statement / k`
(service/calibration.py). Listings are never coalesced: all their cost counts per
statement. Also kept: the measured per-worker rate at saturation, the wrk cost per
request, and requests per statement at each wrk concurrency.

    python -m loadtests.bench.calibration reports/bench/latest.json --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loadtests.bench.plan import POOL, WORKERS, Config, Endpoint, RunKey
from loadtests.bench.results import Result
from service.calibration import Calibration, Cost

# The bench's CPU groups, by the process names the calibration uses.
GROUPS = {"worker": "workers", "pgbouncer": "pgbouncer", "postgres": "postgres"}
COALESCED = {"read": Endpoint.GET_ITEM, "write": Endpoint.POST_VISIT}


def _split(single: float, coalesced: float, k: float) -> Cost:
    """The cost line through (k=1, single) and (k, coalesced), neither part negative."""
    if k <= 1.05:  # nothing coalesced: the two runs say nothing about the split
        return Cost(per_request=0.0, per_statement=single)
    per_statement = max(0.0, (single - coalesced) / (1 - 1 / k))
    per_request = max(0.0, single - per_statement)
    return Cost(per_request=round(per_request, 4), per_statement=round(per_statement, 4))


def derive(results: list[Result], source: str, cores: int, connections: int) -> Calibration:
    """The calibration from a run's medians (a KeyError names a run it needs);
    `connections`: wrk's, for the runs whose key names none."""
    by = {r.key: r for r in results}
    costs: dict[str, dict[str, Cost]] = {p: {} for p in GROUPS}
    rates: dict[str, float] = {}
    for kind, endpoint in COALESCED.items():
        single = by[RunKey(Config.SINGLE, endpoint)]
        pooled = by[RunKey(Config.POOLED, endpoint)]
        k = pooled.requests_per_statement or 1.0
        for process, group in GROUPS.items():
            costs[process][kind] = _split(
                single.cpu_ms.get(group, 0.0), pooled.cpu_ms.get(group, 0.0), k
            )
        rates[kind] = round(single.rps / WORKERS, 1)
    listing = by[RunKey(Config.POOLED, Endpoint.LIST_ITEMS)]
    for process, group in GROUPS.items():
        costs[process]["list"] = Cost(0.0, round(listing.cpu_ms.get(group, 0.0), 4))
    rates["list"] = round(listing.rps / WORKERS, 1)
    coalescing = {
        r.key.connections or connections: round(r.requests_per_statement, 2)
        for r in results
        if r.key.config is Config.POOLED
        and r.key.endpoint is Endpoint.GET_ITEM
        and r.requests_per_statement is not None
    }
    pooled_get = by[RunKey(Config.POOLED, Endpoint.GET_ITEM)]
    return Calibration(
        source=source,
        machine_cores=cores,
        bench_workers=WORKERS,
        bench_pool=POOL,
        costs=costs,
        load_generator_ms=round(pooled_get.cpu_ms.get("load generator", 0.0), 4),
        per_worker_rps=rates,
        requests_per_statement=coalescing,
    )


def results_of(report: dict[str, Any]) -> list[Result]:
    """A bench.json's rows as Results, keyed by the run key each row carries."""
    found = []
    for row in report["results"]:
        key = row["key"]
        found.append(
            Result(
                key=RunKey(Config(key["config"]), Endpoint[key["endpoint"]], key["connections"]),
                rps=row["rps"],
                p50_ms=row["p50_ms"],
                p99_ms=row["p99_ms"],
                non2xx=row["non2xx"],
                socket_errors=row["socket_errors"],
                cpu_ms=row["cpu_ms_per_request"],
                requests_per_statement=row["requests_per_statement"],
            )
        )
    return found


def from_report(path: Path) -> Calibration:
    """The calibration of a bench.json written by `python -m loadtests.bench`."""
    report = json.loads(path.read_text())
    s = report["setup"]
    source = (
        f"make bench ({path.name}, finished {report['finished']}: {s['rounds']} round(s) of"
        f" {s['duration_s']} s, wrk {s['wrk_connections']} connections, {s['machine_cores']} cores)"
    )
    return derive(results_of(report), source, int(s["machine_cores"]), int(s["wrk_connections"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench.calibration", description=__doc__.splitlines()[0]
    )
    parser.add_argument("report", type=Path, help="a bench.json")
    parser.add_argument("--out", type=Path, required=True, help="the calibration file to write")
    args = parser.parse_args(argv)
    calibration = from_report(args.report)
    calibration.write(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
