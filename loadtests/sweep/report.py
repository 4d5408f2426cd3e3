"""The sweep's report files: cells.csv, summary.json, report.md with its charts."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from loadtests.sweep.cells import Cell
from loadtests.sweep.charts import charts
from loadtests.sweep.plan import Mode, Plan


def write_report(plan: Plan, cells: list[Cell], out: Path) -> None:
    """cells.csv, summary.json (the plan, when, whether all cells agreed, the cells),
    the charts and report.md, in `out`."""
    rows = [asdict(c) for c in cells]
    with (out / "cells.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "plan": asdict(plan),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "all_as_predicted": all(c.as_predicted for c in cells),
        "cells": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    pngs = charts(cells, out)
    (out / "report.md").write_text(markdown(plan, cells, pngs))


# Other work above this, in cores, and a cell's rates and latencies are not the stack's
# alone on this machine (the connection counts still are). An idle stack: about 0.05.
QUIET_CORES = 0.25


def shared_note(cells: list[Cell]) -> str:
    """Whether the machine was the stack's own while the sweep ran ("other load")."""
    busiest = max(c.background_cores for c in cells)
    shared = sum(c.background_cores > QUIET_CORES for c in cells)
    if not shared:
        return (
            f"Other load: at most {busiest:.2f} cores busy with the stack at rest before a"
            " cell: the machine was the stack's own."
        )
    return (
        f"Other load: {shared} of {len(cells)} cells started with more than {QUIET_CORES}"
        f" cores busy elsewhere (at most {busiest:.2f}): their req/s and latencies include"
        " that work (the connection counts do not); compare them with a quiet run, not a model."
    )


def markdown(plan: Plan, cells: list[Cell], pngs: list[str]) -> str:
    lines = [
        "# Workers x replicas x PgBouncers sweep",
        "",
        f"Grid: workers {list(plan.workers)} x replicas {list(plan.replicas)} x PgBouncer"
        f" instances {list(plan.instances)} (PgBouncer cells), POOL_MAX"
        f" {plan.pool_max} (POOL_MIN 1: the pools grow under load, and overflowing direct"
        " replicas still boot; coalescing off, COALESCE_MAX 1, so that every queued request"
        f" needs a connection of its own), {plan.duration} s of loadtests/saturate.py per"
        f" cell (browse.py's reads, no pause) with {plan.users_per_connection} users per pooled"
        " connection, all started in the first second; req/s and latencies from then on"
        " (Locust's --reset-stats)."
        f" PgBouncer cells: default_pool_size {plan.pgbouncer_pool_size}, no reserve."
        f" Direct cells: PostgreSQL with max_connections {plan.direct_max_connections}.",
        "",
        "Predicted = R x W x POOL_MAX (service/budget.py); measured = the peak the sampler saw"
        " (app connections in PgBouncer's SHOW CLIENTS, or in pg_stat_activity when direct)."
        " With several PgBouncers, each new connection picks one at random"
        " (libpq's load_balance_hosts=random): each instance's share is predicted within"
        " mean +- 3 sigma of a binomial split, and each holds at most its own server pool,"
        " so PostgreSQL's side grows with instances x pool, not with replicas.",
        "",
        "| mode | W | R | PgBouncers | predicted clients | measured clients | split |"
        " PgBouncer servers | PostgreSQL backends | req/s | p50 ms | p95 ms | p99 ms |"
        " failures | shed 503 | pool waiters | refused connections | in flight by worker |"
        " other load (cores) | budget | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        pooled = c.mode is Mode.PGBOUNCER
        instances = c.pgbouncer_instances if pooled else "-"
        lines.append(
            f"| {c.mode} | {c.workers} | {c.replicas} | {instances} |"
            f" {c.predicted_clients} | {c.measured_clients} |"
            f" {c.clients_by_instance.replace(';', ' ') if pooled else '-'} |"
            f" {c.pgbouncer_servers if pooled else '-'} |"
            f" {c.postgres_backends} | {c.requests_per_s:.0f} | {c.p50_ms:.0f} | {c.p95_ms:.0f} |"
            f" {c.p99_ms:.0f} | {c.failures} | {c.shed_503} | {c.pool_waiters} |"
            f" {c.connection_errors} | {c.in_flight_by_worker.replace(';', ' ') or '-'} |"
            f" {c.background_cores:.2f} |"
            f" {'fits' if c.budget_fits else 'over'} |"
            f" {'as predicted' if c.as_predicted else 'NOT as predicted'}: {c.verdict} |"
        )
    agree = sum(c.as_predicted for c in cells)
    lines += ["", f"{agree} of {len(cells)} cells as predicted.", "", shared_note(cells), ""]
    lines += [f"![{name}]({name})" for name in pngs]
    return "\n".join(lines) + "\n"
