"""The sweep's report: a markdown table with verdicts, and PNG charts (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after use("Agg")

if TYPE_CHECKING:
    from loadtests.sweep import Cell, Plan


def _label(cell: Cell) -> str:
    return f"W{cell.workers}xR{cell.replicas}"


def charts(cells: list[Cell], out: Path) -> list[str]:
    """Three charts; returns their file names."""
    pooled = [c for c in cells if c.mode == "pgbouncer"]
    direct = [c for c in cells if c.mode == "direct"]
    names = []

    if pooled:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        x = range(len(pooled))
        ax.bar(
            [i - 0.2 for i in x],
            [c.predicted_clients for c in pooled],
            0.4,
            label="predicted R x W x POOL_MAX",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [c.measured_clients for c in pooled],
            0.4,
            label="measured peak in PgBouncer",
        )
        ax.set_xticks(list(x), [_label(c) for c in pooled])
        ax.set_ylabel("client connections")
        ax.set_title("Client connections into PgBouncer grow with workers x replicas")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "client_connections.png", dpi=110)
        plt.close(fig)
        names.append("client_connections.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if pooled:
        ax.plot(
            [_label(c) for c in pooled],
            [c.postgres_backends for c in pooled],
            "o-",
            label="PostgreSQL backends, via PgBouncer",
        )
        ax.plot(
            [_label(c) for c in pooled],
            [c.pgbouncer_servers for c in pooled],
            "s--",
            label="PgBouncer server connections",
        )
    if direct:
        ax.plot(
            [_label(c) for c in direct],
            [c.measured_clients for c in direct],
            "^-",
            label="app connections, direct to PostgreSQL",
        )
        limit = direct[0].postgres_max_connections
        ax.axhline(limit, color="red", linestyle=":", label=f"max_connections (direct) = {limit}")
    ax.set_ylabel("connections")
    ax.set_title("Server side: flat behind PgBouncer, growing (and refused) without it")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "server_connections.png", dpi=110)
    plt.close(fig)
    names.append("server_connections.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for mode, group, style in (("via PgBouncer", pooled, "o-"), ("direct", direct, "^--")):
        if group:
            ax.plot(
                [_label(c) for c in group], [c.requests_per_s for c in group], style, label=mode
            )
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput per cell (one 2-core machine: everything shares it)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    names.append("throughput.png")
    return names


def markdown(plan: Plan, cells: list[Cell], pngs: list[str]) -> str:
    lines = [
        "# Workers x replicas sweep",
        "",
        f"Grid: workers {list(plan.workers)} x replicas {list(plan.replicas)}, POOL_MAX"
        f" {plan.pool_max} (POOL_MIN 1: the pools grow under load, and overflowing direct"
        " replicas still boot; coalescing off, COALESCE_MAX 1, so that every queued request"
        f" needs a connection of its own), {plan.duration} s of loadtests/saturate.py per"
        f" cell (browse.py's reads, no pause) with {plan.users_per_connection} users per pooled"
        " connection."
        f" PgBouncer cells: default_pool_size {plan.pgbouncer_pool_size}, no reserve."
        f" Direct cells: PostgreSQL with max_connections {plan.direct_max_connections}.",
        "",
        "Predicted = R x W x POOL_MAX (service/budget.py); measured = the peak the sampler saw"
        " (app connections in PgBouncer's SHOW CLIENTS, or in pg_stat_activity when direct).",
        "",
        "| mode | W | R | predicted clients | measured clients | PgBouncer servers |"
        " PostgreSQL backends | req/s | p50 ms | p95 ms | p99 ms | failures | shed 503 |"
        " pool waiters | refused connections | budget | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.mode} | {c.workers} | {c.replicas} | {c.predicted_clients} |"
            f" {c.measured_clients} | {c.pgbouncer_servers if c.mode == 'pgbouncer' else '-'} |"
            f" {c.postgres_backends} | {c.requests_per_s:.0f} | {c.p50_ms:.0f} | {c.p95_ms:.0f} |"
            f" {c.p99_ms:.0f} | {c.failures} | {c.shed_503} | {c.pool_waiters} |"
            f" {c.connection_errors} |"
            f" {'fits' if c.budget_fits else 'over'} |"
            f" {'as predicted' if c.as_predicted else 'NOT as predicted'}: {c.verdict} |"
        )
    agree = sum(c.as_predicted for c in cells)
    lines += ["", f"{agree} of {len(cells)} cells as predicted.", ""]
    lines += [f"![{name}]({name})" for name in pngs]
    return "\n".join(lines) + "\n"
