"""The whole fault suite on one private stack: every fault in turn, one row each."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from infra.localstack.procs import StackError
from tests.faults.faults import Fault, Timing, run_phase
from tests.faults.harness import Harness, Tuning, fault_stack
from tests.faults.report import Row, table


def say(line: str) -> None:
    print(line, flush=True)


def durability(harness: Harness) -> dict[str, str]:
    """The settings the durability claims rest on, as PostgreSQL reports them."""
    with psycopg.connect(harness.direct_url, autocommit=True) as conn:
        return {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("fsync", "synchronous_commit", "full_page_writes")
        }


def pgbouncer_version() -> str:
    out = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "PgBouncer (unknown version)"


def keep_logs(harness: Harness, out: Path) -> None:
    """The stack's logs, copied beside the report before the stack is removed."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack = harness.stack
    sources = [
        stack.postgres().log,
        *(stack.pgbouncer(i).log for i in stack.recorded_pgbouncers()),
        stack.haproxy().log,
        harness.log,
        *(harness.replica(i).log for i in range(1, harness.tuning.replicas + 1)),
    ]
    for source in sources:
        if source.exists():
            shutil.copyfile(source, logs / source.name)


def run_suite(
    faults: list[Fault],
    *,
    tuning: Tuning | None = None,
    timing: Timing | None = None,
    logs_to: Path | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Run `faults` in order, each group needing one stack shape on a private stack of
    its own (one PgBouncer behind the proxy, or several); return the rows and the facts."""
    tuning = tuning or Tuning()
    started = time.monotonic()
    rows: list[Row] = []
    aborted = ""
    postgres: dict[str, str] = {}
    groups: list[tuple[int, list[Fault]]] = []
    for fault in faults:
        if not groups or groups[-1][0] != fault.pgbouncer_instances:
            groups.append((fault.pgbouncer_instances, []))
        groups[-1][1].append(fault)
    n = 0
    for instances, group in groups:
        if aborted:
            break
        shape = replace(tuning, pgbouncer_instances=instances)
        say(
            f"fault suite: {len(group)} faults; starting a private stack ({instances} PgBouncer"
            f"{'s' if instances > 1 else ''}) ..."
        )
        with fault_stack(shape) as harness:
            say(f"stack up in {time.monotonic() - started:.0f} s at {harness.lb_url}")
            postgres = durability(harness)
            if (postgres["fsync"], postgres["synchronous_commit"]) != ("on", "on"):
                raise StackError(
                    f"durability claims need fsync and synchronous_commit on: {postgres}"
                )
            try:
                for fault in group:
                    n += 1
                    say(f"[{n}/{len(faults)}] {fault.name}: {fault.description}")
                    try:
                        row = run_phase(harness, fault, timing)
                    except Exception as exc:  # the stack could not be brought back: stop here
                        aborted = f"{fault.name}: {type(exc).__name__}: {exc}"
                        say(f"      aborted: {aborted}")
                        break
                    rows.append(row)
                    verdict = "ok" if row.ok else "FAILED: " + "; ".join(row.failures())
                    recovery = "none" if row.recovery is None else f"{row.recovery:.2f}"
                    say(
                        f"      {row.requests} requests, errors {row.errors or '-'},"
                        f" {row.acknowledged} acked, lost {row.lost}, dup {row.duplicated},"
                        f" max {row.max_latency:.2f} s, recovery {recovery} s: {verdict}"
                    )
            finally:
                if logs_to is not None:
                    own = logs_to if instances == 1 else logs_to / f"{instances}-pgbouncers"
                    keep_logs(harness, own)
    several = [f.name for f in faults if f.pgbouncer_instances > 1]
    meta = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "shape": (
            f"{tuning.replicas} replicas x {tuning.workers} workers, pools"
            f" {tuning.pool_min}..{tuning.pool_max}, through a TCP proxy to PgBouncer"
            + (
                f" ({', '.join(several)}: two PgBouncers the replicas reach themselves)"
                if several
                else ""
            )
        ),
        "bound": tuning.bound,
        "tuning": asdict(tuning),
        "timing": asdict(timing or Timing()),
        "postgres": postgres,
        "pgbouncer_version": pgbouncer_version(),
        "aborted": aborted,
    }
    return rows, meta


def print_table(rows: list[Row]) -> None:
    say("")
    say(table(rows))
    say("")
