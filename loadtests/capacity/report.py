"""`make capacity`'s report: the validation tables, the fleets, and their charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after use("Agg")
from matplotlib.figure import Figure

from loadtests.capacity.fleets import (
    NAIVE_POOL,
    OVERLOAD,
    PER_REPLICA_RPS,
    POSTGRES_CORES,
    RTT_MS,
    WRITE_RATIO,
    Fleet,
)
from loadtests.capacity.validate import Row, coalescing_table, parts_table, sweep_table

TIERS = ("workers", "pools", "PgBouncer", "server pools", "PostgreSQL")


def fleet_row(f: Fleet) -> dict[str, Any]:
    o, s = f.outcome, f.setup
    return {
        "replicas": f.replicas,
        "sizing": f.sizing,
        "offered_rps": round(s.rps),
        "workers": s.workers,
        "pool": f"{s.pool_min}..{s.pool_max}",
        "pgbouncers": s.instances if s.via_pgbouncer else 0,
        "default_pool_size": s.default_pool_size if s.via_pgbouncer else None,
        "max_connections": s.max_connections,
        "client_connections": o.client_connections,
        "wanted_connections": s.replicas * s.workers * s.pool_max,
        "pgbouncer_servers": o.pgbouncer_servers if s.via_pgbouncer else None,
        "postgres_backends": o.postgres_backends,
        "refused": o.refused,
        "served_rps": round(o.rps),
        "p50_ms": round(o.p50_ms, 2),
        "p99_ms": round(o.p99_ms, 2),
        "error_ratio": round(o.error_ratio, 4),
        "requests_per_statement": round(o.requests_per_statement, 2),
        "utilization": {k: round(v, 3) for k, v in o.utilization.items()},
        "saturates_first": o.saturated,
        "planner_bottleneck": f.plan.bottleneck.name,
    }


def fleet_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| replicas | sizing | offered req/s | pool | PgBouncers x pool | max_connections |"
        " app connections (wanted) | PgBouncer servers | PostgreSQL backends | refused |"
        " served req/s | p99 ms | errors | req/stmt | busiest tier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u = r["utilization"]
        busiest = f"{r['saturates_first']} {u[r['saturates_first']]:.0%}"
        bouncers = f"{r['pgbouncers']} x {r['default_pool_size']}" if r["pgbouncers"] else "-"
        lines.append(
            f"| {r['replicas']} | {r['sizing']} | {r['offered_rps']} | {r['pool']} | {bouncers} |"
            f" {r['max_connections']} | {r['client_connections']} ({r['wanted_connections']}) |"
            f" {r['pgbouncer_servers'] if r['pgbouncer_servers'] is not None else '-'} |"
            f" {r['postgres_backends']} | {r['refused']} | {r['served_rps']} | {r['p99_ms']} |"
            f" {r['error_ratio']:.1%} | {r['requests_per_statement']} | {busiest} |"
        )
    return lines


def _save(fig: Figure, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def charts(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Connections per tier, PostgreSQL backends, p99, utilization; the file names
    (none without fleets: `--fleets` given no sizes)."""
    names: list[str] = []
    if not rows:
        return names
    sizes = sorted({r["replicas"] for r in rows})

    def pick(sizing: str, key: str) -> list[float]:
        by = {r["replicas"]: r for r in rows if r["sizing"] == sizing}
        return [float(by[n][key] or 0) for n in sizes]

    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(sizes))
    series = [
        ("planned: app -> PgBouncer", pick("planned", "client_connections")),
        ("planned: PgBouncer -> PostgreSQL", pick("planned", "pgbouncer_servers")),
        ("naive: connections wanted", pick("naive", "wanted_connections")),
        ("naive: PostgreSQL accepted", pick("naive", "client_connections")),
    ]
    width = 0.2
    for i, (label, values) in enumerate(series):
        ax.bar([j + (i - 1.5) * width for j in x], values, width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"{n} replicas" for n in sizes])
    ax.set_ylabel("connections (log)")
    ax.set_title("Connections per tier")
    ax.legend(fontsize=8)
    names.append(_save(fig, out, "connections.png"))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(sizes, pick("planned", "postgres_backends"), "o-", label="planned (via PgBouncer)")
    ax.plot(sizes, pick("naive", "wanted_connections"), "^--", label="naive: wanted")
    ax.plot(sizes, pick("naive", "postgres_backends"), "s-", label="naive: accepted")
    ax.plot(sizes, pick("planned", "max_connections"), ":", color="red", label="max_connections")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("replicas")
    ax.set_ylabel("PostgreSQL backends (log)")
    ax.set_title("PostgreSQL backends: flat behind PgBouncer, past max_connections without")
    ax.legend(fontsize=8)
    names.append(_save(fig, out, "postgres_backends.png"))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(sizes, pick("planned", "p99_ms"), "o-", label="planned: p99 of served")
    ax.plot(sizes, pick(f"planned x{OVERLOAD:g}", "p99_ms"), "s--", label="planned, overloaded")
    ax.plot(sizes, pick("naive", "p99_ms"), "^-", label="naive: p99 of served")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("replicas")
    ax.set_ylabel("p99 ms (log)")
    failed = ax.twinx()
    failed.bar(
        sizes,
        pick("naive", "error_ratio"),
        [n * 0.3 for n in sizes],
        alpha=0.25,
        color="red",
        label="naive: requests failed",
    )
    failed.set_ylim(0, 1)
    failed.set_ylabel("naive: share of requests failed")
    ax.set_title("Latency of the requests served; the naive fleets fail the rest")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = failed.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="upper left")
    names.append(_save(fig, out, "p99.png"))

    fig, ax = plt.subplots(figsize=(9, 4.5))
    loads = [r for r in rows if r["sizing"].startswith("planned")]
    labels = [
        f"{r['replicas']} x{r['offered_rps'] / (r['replicas'] * PER_REPLICA_RPS):.0f}"
        for r in loads
    ]
    for i, tier in enumerate(TIERS):
        ax.bar(
            [j + (i - 2) * 0.16 for j in range(len(loads))],
            [r["utilization"].get(tier, 0) for r in loads],
            0.16,
            label=tier,
        )
    ax.axhline(1.0, color="red", linestyle=":")
    ax.set_xticks(list(range(len(loads))), labels)
    ax.set_xlabel("replicas x load (1: the target, 2: twice it)")
    ax.set_ylabel("busiest process of the tier")
    ax.set_title("Which tier saturates first (planned fleets)")
    ax.legend(fontsize=8)
    names.append(_save(fig, out, "utilization.png"))
    return names


def parts_section(sweep: list[Row]) -> list[str]:
    """The sweep's reads taken apart, when it recorded their Server-Timing."""
    table = parts_table(sweep)
    if not table:
        return []
    return [
        "### Where a read's time went (GET /items/{id})",
        "",
        "Measured / modelled, p50/p99 ms: the service's Server-Timing parts (queue: waiting"
        " for a connection; db: holding one; app: the rest of the service's time) and the"
        " whole latency Locust saw; what Locust saw beyond the parts passed outside the"
        " service's clock (Locust, haproxy, a request not yet read by its worker).",
        "",
        *table,
        "",
    ]


def markdown(
    sweep: list[Row],
    sweep_source: str,
    sweep_calibration_source: str,
    coalescing: list[tuple[int, float, float]],
    fleets: list[dict[str, Any]],
    calibration_source: str,
    pictures: list[str],
) -> str:
    agree = sum(1 for r in sweep if not r.problems)
    lines = [
        "# Capacity: the model against this machine, then fleets it cannot hold",
        "",
        f"Calibration: {calibration_source}. Model: loadtests/capacity/model.py (SimPy).",
        "",
        f"## This machine: every cell of the sweep ({sweep_source})",
        "",
        f"Costs: {sweep_calibration_source}.",
        "",
        "Measured / modelled. Connections must agree exactly, req/s and p99 within 25%."
        + (
            f" Each figure is the median of {sweep[0].sweeps} sweeps, and of the model's run"
            " of each; beside the measured req/s and p99, the lowest and highest."
            if sweep and sweep[0].sweeps > 1
            else ""
        ),
        "",
        *sweep_table(sweep),
        "",
        f"{agree} of {len(sweep)} cells agree on everything.",
        "",
        *parts_section(sweep),
        "## This machine: the bench's coalescing (GET /items/{id} as deployed)",
        "",
        *coalescing_table(coalescing),
        "",
        "## Fleets",
        "",
        f"Each fleet offers {PER_REPLICA_RPS:g} req/s per replica ({WRITE_RATIO:.0%} writes)"
        f" to one PostgreSQL of {POSTGRES_CORES} cores, {RTT_MS:g} ms per network round trip."
        " planned: `python -m service.budget plan --replicas R` for that target, coalescing on;"
        f" planned x2: the same shape at twice the load; naive: every worker a pool of"
        f" {NAIVE_POOL} straight to the same PostgreSQL, coalescing off.",
        "",
        *fleet_table(fleets),
        "",
        "Busiest tier: the share of its capacity in use, for the busiest worker's CPU and"
        " its pool's connections, the busiest PgBouncer's core, all PgBouncer server"
        " connections, and PostgreSQL's cores: the tier that reaches 100% first.",
        "",
    ]
    lines += [f"![{name}]({name})" for name in pictures]
    return "\n".join(lines) + "\n"


def write(out: Path, text: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "capacity.json").write_text(json.dumps(data, indent=2) + "\n")
