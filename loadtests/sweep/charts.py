"""The sweep's PNG charts (matplotlib, written to files only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after use("Agg")

from loadtests.sweep.cells import Cell
from loadtests.sweep.plan import Mode


def _label(cell: Cell) -> str:
    several = f"xB{cell.pgbouncer_instances}" if cell.pgbouncer_instances > 1 else ""
    return f"W{cell.workers}xR{cell.replicas}{several}"


def charts(cells: list[Cell], out: Path) -> list[str]:
    """Three charts; returns their file names."""
    pooled = [c for c in cells if c.mode is Mode.PGBOUNCER]
    direct = [c for c in cells if c.mode is Mode.DIRECT]
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
