"""The sweep's PNG charts (matplotlib, written to files only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after use("Agg")

from loadtests.common.sampling import parse_counts
from loadtests.sweep.cells import Cell
from loadtests.sweep.plan import Mode


def _label(cell: Cell) -> str:
    return f"W{cell.workers}xR{cell.replicas}"


def _via(instances: int) -> str:
    return "1 PgBouncer" if instances == 1 else f"{instances} PgBouncers"


def _by_instances(cells: list[Cell]) -> dict[int, list[Cell]]:
    """The PgBouncer cells of each instance count, in the sweep's order."""
    groups: dict[int, list[Cell]] = {}
    for cell in cells:
        if cell.mode is Mode.PGBOUNCER:
            groups.setdefault(cell.pgbouncer_instances, []).append(cell)
    return dict(sorted(groups.items()))


def charts(cells: list[Cell], out: Path) -> list[str]:
    """Three charts, each over the workers x replicas cells; returns their file names."""
    groups = _by_instances(cells)
    direct = [c for c in cells if c.mode is Mode.DIRECT]
    labels = list(dict.fromkeys(_label(c) for c in cells))
    names = []

    if groups:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / (1 + len(groups))
        x = {label: i for i, label in enumerate(labels)}
        first = next(iter(groups.values()))
        ax.bar(
            [x[_label(c)] - 0.4 + width / 2 for c in first],
            [c.predicted_clients for c in first],
            width,
            label="predicted R x W x POOL_MAX",
            color="lightgray",
            edgecolor="gray",
        )
        for slot, (instances, group) in enumerate(groups.items(), start=1):
            offset = -0.4 + width / 2 + slot * width
            positions = [x[_label(c)] + offset for c in group]
            if instances == 1:
                ax.bar(
                    positions,
                    [c.measured_clients for c in group],
                    width,
                    label="measured, 1 PgBouncer",
                )
                continue
            # Stacked: each instance's share of the clients when they peaked.
            bottom = [0] * len(group)
            for index in range(1, instances + 1):
                name = f"pgbouncer-{index}"
                shares = [parse_counts(c.clients_by_instance).get(name, 0) for c in group]
                ax.bar(
                    positions,
                    shares,
                    width,
                    bottom=bottom,
                    label=f"measured on {name} ({_via(instances)})",
                )
                bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("client connections")
        ax.set_title("Client connections into PgBouncer grow with workers x replicas")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "client_connections.png", dpi=110)
        plt.close(fig)
        names.append("client_connections.png")

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for (instances, group), marker in zip(groups.items(), "os^v", strict=False):
        ax.plot(
            [_label(c) for c in group],
            [c.postgres_backends for c in group],
            f"{marker}-",
            label=f"PostgreSQL backends, via {_via(instances)}",
        )
        ax.plot(
            [_label(c) for c in group],
            [c.pgbouncer_servers for c in group],
            f"{marker}--",
            label=f"server connections of {_via(instances)}",
        )
    if direct:
        ax.plot(
            [_label(c) for c in direct],
            [c.measured_clients for c in direct],
            "x-",
            color="black",
            label="app connections, direct to PostgreSQL",
        )
        limit = direct[0].postgres_max_connections
        ax.axhline(limit, color="red", linestyle=":", label=f"max_connections (direct) = {limit}")
    ax.set_ylabel("connections")
    ax.set_title("Server side: flat behind PgBouncer (instances x pool), growing without it")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "server_connections.png", dpi=110)
    plt.close(fig)
    names.append("server_connections.png")

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for instances, group in groups.items():
        ax.plot(
            [_label(c) for c in group],
            [c.requests_per_s for c in group],
            "o-",
            label=f"via {_via(instances)}",
        )
    if direct:
        ax.plot(
            [_label(c) for c in direct], [c.requests_per_s for c in direct], "^--", label="direct"
        )
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput per cell (one 2-core machine: everything shares it)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    names.append("throughput.png")
    return names
