"""The soak's report: charts over time, a growth fit per worker, and the verdict.

Growth: for each worker seen from the end of the warm-up to the end of the run, a
least-squares line through its RSS and its open fds; the rise it predicts over that
span must stay within `RSS_TOLERANCE_MB` + `RSS_TOLERANCE_SHARE` of the worker's
median RSS, and within `FDS_TOLERANCE` fds (a pool of POOL_MAX connections and a few
client sockets come and go with the load and the faults). A worker that leaves before
the end was replaced, which no fault of the rotation does: that fails the soak too.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg")

from tests.faults.report import RECOVER_WITHIN, Row

WARMUP_SHARE = 0.1  # of the run, at least WARMUP_MIN_S: left out of the growth fit
WARMUP_MIN_S = 60.0
RSS_TOLERANCE_MB = 8.0
RSS_TOLERANCE_SHARE = 0.05
FDS_TOLERANCE = 8.0


@dataclass(frozen=True)
class FaultRun:
    """One fault of the rotation: when it ran (seconds into the soak) and its row."""

    at: float
    ended: float
    row: Row


@dataclass(frozen=True)
class Growth:
    """The fitted rise of one series of one worker over the fitted span."""

    replica: int
    pid: int
    series: str
    samples: int
    span_s: float
    median: float
    rise: float  # slope x span
    per_hour: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rise <= self.tolerance


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def num(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def growth(workers: list[dict[str, str]], duration: float) -> tuple[list[Growth], list[str]]:
    """Each worker's fitted RSS and fds rise after the warm-up; and workers that left."""
    warmup = max(WARMUP_MIN_S, WARMUP_SHARE * duration)
    by_pid: dict[tuple[int, int], list[dict[str, str]]] = defaultdict(list)
    for row in workers:
        by_pid[(int(row["replica"]), int(row["pid"]))].append(row)
    last = max((float(r["elapsed_s"]) for r in workers), default=0.0)
    fits, left = [], []
    for (replica, pid), rows in sorted(by_pid.items()):
        seen_until = float(rows[-1]["elapsed_s"])
        if seen_until < last - 30:
            left.append(f"replica-{replica} worker {pid} last seen at {seen_until:.0f} s")
        kept = [r for r in rows if float(r["elapsed_s"]) >= warmup]
        if len(kept) < 3:
            continue
        xs = [float(r["elapsed_s"]) for r in kept]
        span = xs[-1] - xs[0]
        for series in ("rss_mb", "fds"):
            ys = [float(r[series]) for r in kept]
            k = slope(xs, ys)
            median = statistics.median(ys)
            tolerance = (
                RSS_TOLERANCE_MB + RSS_TOLERANCE_SHARE * median
                if series == "rss_mb"
                else FDS_TOLERANCE
            )
            fits.append(
                Growth(replica, pid, series, len(ys), span, median, k * span, k * 3600, tolerance)
            )
    return fits, left


def charts(
    out: Path, workers: list[dict[str, str]], conns: list[dict[str, str]], runs: list[FaultRun]
) -> list[str]:
    """PNG charts over time, fault windows shaded; their file names."""
    by_pid: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in workers:
        by_pid[f"replica-{row['replica']} pid {row['pid']}"].append(row)

    def shade(ax: Any) -> None:
        for run in runs:
            ax.axvspan(run.at / 60, run.ended / 60, color="tab:red", alpha=0.12, lw=0)

    made = []
    for series, title, unit in (
        ("rss_mb", "worker RSS", "MiB"),
        ("fds", "worker open file descriptors", "fds"),
        (
            "waiting",
            "requests waiting for a connection (pgscale_pool_requests_waiting)",
            "requests",
        ),
        ("in_flight", "requests in flight per worker", "requests"),
    ):
        fig, ax = plt.subplots(figsize=(10, 4))
        for label, rows in sorted(by_pid.items()):
            points = [(float(r["elapsed_s"]) / 60, num(r[series])) for r in rows]
            xs = [x for x, y in points if y is not None]
            ys = [y for _, y in points if y is not None]
            ax.plot(xs, ys, label=label, lw=1)
        shade(ax)
        ax.set(title=title, xlabel="minutes (faults shaded)", ylabel=unit)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
        name = f"{series}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        made.append(name)
    fig, ax = plt.subplots(figsize=(10, 4))
    for column, label in (
        ("pgb_clients", "PgBouncer clients (SHOW CLIENTS)"),
        ("cl_waiting", "PgBouncer clients waiting"),
        ("pgb_servers", "PgBouncer server connections"),
        ("pg_client_backends", "PostgreSQL client backends"),
    ):
        points = [(float(r["elapsed_s"]) / 60, num(r[column])) for r in conns]
        ax.plot(
            [x for x, y in points if y is not None],
            [y for _, y in points if y is not None],
            label=label,
            lw=1,
        )
    shade(ax)
    ax.set(title="connections", xlabel="minutes (faults shaded)", ylabel="connections")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "connections.png", dpi=100)
    plt.close(fig)
    made.append("connections.png")
    return made


def write_report(out: Path, meta: dict[str, Any], runs: list[FaultRun]) -> bool:
    """report.md and the charts in `out`; True when the verdict holds."""
    workers = read_csv(out / "workers.csv")
    conns = read_csv(out / "connections.csv")
    fits, left = growth(workers, float(meta["duration_s"]))
    grew = [g for g in fits if not g.ok]
    failed = [r for r in runs if not r.row.ok]
    ok = bool(fits) and not grew and not left and not failed and bool(runs)
    images = charts(out, workers, conns, runs)
    lines = [
        "# Soak",
        "",
        f"{meta['finished']}: {meta['duration_s'] / 60:.0f} minutes, Locust"
        f" {' + '.join(meta['scenarios'])} with {meta['users']} users through haproxy,"
        f" a fault every {meta['every_s']:.0f} s, samples every"
        f" {meta['interval_s']:g} s: **{'the soak holds' if ok else 'THE SOAK FAILS'}**.",
        "",
        "## Verdict",
        "",
        f"- growth: {len(fits) - len(grew)} of {len(fits)} fits within tolerance"
        f" (fitted after the first {max(WARMUP_MIN_S, WARMUP_SHARE * meta['duration_s']):.0f} s;"
        f" RSS rise <= {RSS_TOLERANCE_MB:g} MiB + {RSS_TOLERANCE_SHARE:.0%} of the median,"
        f" fds rise <= {FDS_TOLERANCE:g})",
        f"- workers replaced: {'; '.join(left) if left else 'none'}",
        f"- faults: {len(runs) - len(failed)} of {len(runs)} rows hold (recovery and every"
        f" replica ready within {RECOVER_WITHIN:g} s, nothing lost or created twice)",
        f"- Locust exit code {meta['locust_exit']} (thresholds off: faults shed load on"
        " purpose; its CSVs are beside this report)",
        "",
        "## Growth per worker",
        "",
        "| worker | series | samples | median | fitted rise | per hour | tolerance | ok |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| replica-{g.replica} {g.pid} | {g.series} | {g.samples} | {g.median:.1f} |"
        f" {g.rise:+.2f} | {g.per_hour:+.2f} | {g.tolerance:.1f} | {'yes' if g.ok else 'NO'} |"
        for g in fits
    ]
    lines += [
        "",
        "## Faults",
        "",
        "| at min | fault | requests | errors | lost | dup | recovery s"
        " | every replica ready s | ok |",
        "|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        row = r.row
        errors = " ".join(f"{k}:{v}" for k, v in sorted(row.errors.items())) or "-"
        lines.append(
            f"| {r.at / 60:.1f} | {row.fault} | {row.requests} | {errors} | {row.lost} |"
            f" {row.duplicated} | {_s(row.recovery)} | {_s(row.ready)} |"
            f" {'yes' if row.ok else 'NO: ' + '; '.join(row.failures())} |"
        )
    lines += ["", "## Over time", ""]
    lines += [f"![{name}]({name})" for name in images]
    lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    return ok


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"
