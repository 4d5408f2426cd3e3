"""The sweep's runs: a private stack reshaped for each cell, Locust against it, the cells."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from infra.localstack import procs
from infra.localstack.config import REPO, StackSettings, private_settings
from infra.localstack.stack import Stack
from loadtests.common.poll import Poll
from loadtests.common.sampling import join_dsns
from loadtests.sweep.cells import Cell, judge
from loadtests.sweep.plan import CellKey, Mode, Plan
from loadtests.sweep.probes import (
    CpuReading,
    cpu_seconds,
    in_flight_by_worker,
    locust_totals,
    ms_per_request,
    peaks,
    pool_pressure,
    read_server_timing,
    write_cpu_csv,
)
from service.budget import check, deployment_topology
from service.settings import Settings

SCENARIO = REPO / "loadtests" / "saturate.py"
SEED_ITEMS = 1000


def say(line: str) -> None:
    print(line, flush=True)


# ---- one cell -----------------------------------------------------------------------------


def run_locust(
    stack: Stack, users: int, duration: int, prefix: Path
) -> tuple[str, list[CpuReading]]:
    """Locust's output, and its and haproxy's CPU read once a second while it ran."""
    env = {
        **os.environ,
        "SAMPLER_PGBOUNCER_URL": join_dsns(b.admin_conninfo() for b in stack.pgbouncers()),
        "SAMPLER_POSTGRES_URL": stack.postgres().superuser_conninfo(),
        "SEED_ITEMS": str(SEED_ITEMS),
        "LOADTEST_MAX_FAIL_RATIO": "1",  # the sweep reports failures; it does not gate on them
        "LOADTEST_MAX_P95_MS": "1000000",
    }
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(SCENARIO),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{duration}s",
        "--host",
        stack.haproxy().url,
        "--csv",
        str(prefix),
        "--only-summary",
        # Every user starts within the first second; the pools grow from POOL_MIN
        # meanwhile. The cell's numbers are the steady state after that.
        "--reset-stats",
        "--stop-timeout",
        "5",
    ]
    haproxy_pid = procs.read_pid(stack.haproxy().pid_file)
    with subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as locust:

        def reading() -> CpuReading:
            return CpuReading(time.monotonic(), cpu_seconds(locust.pid), cpu_seconds(haproxy_pid))

        with Poll(reading, 1.0) as cpu:
            try:
                output, _ = locust.communicate(timeout=duration + 120)
            except subprocess.TimeoutExpired:
                locust.kill()
                raise
    return output, cpu.readings


def fresh_server_connections(stack: Stack, timeout: float = 30.0) -> None:
    """Close every server connection the PgBouncers hold before a cell's load.

    PgBouncer keeps an idle server connection for server_idle_timeout (60 s), and the
    stack is reshaped in place between cells, so a small cell would otherwise count
    connections an earlier, larger one opened. RECONNECT closes each as it is released
    (idle ones at once); new ones open as the cell needs them (haproxy's health checks
    open one or two before the load starts). Waits until none of the old is left.
    """

    def server_pids() -> set[tuple[int, str]]:
        return {(b.port, pid) for b in stack.pgbouncers() for pid in b.server_pids()}

    old = server_pids()
    for bouncer in stack.pgbouncers():
        bouncer.admin("RECONNECT")
    if not procs.wait_until(lambda: not old & server_pids(), timeout, interval=0.2):
        left = sorted(old & server_pids())
        raise procs.StackError(f"PgBouncer kept server connections after RECONNECT: {left}")


def busy_cores(seconds: float = 2.0) -> float:
    """Cores the whole machine kept busy over the next `seconds` (psutil, /proc/stat)."""
    return psutil.cpu_percent(interval=seconds) / 100 * (psutil.cpu_count() or 1)


def run_cell(stack_settings: StackSettings, key: CellKey, plan: Plan, out: Path) -> Cell:
    os.environ.update(
        {
            "WORKERS": str(key.workers),
            "POOL_MIN": "1",
            "POOL_MAX": str(plan.pool_max),
            # Coalescing off: every queued request needs a connection of its own, so the
            # pools grow to POOL_MAX, the peak the budget must hold. (Coalesced, requests
            # that queue together share one, and the same load fills fewer.)
            "COALESCE_MAX": "1",
        }
    )
    settings = stack_settings.model_copy(
        update={
            "replicas": key.replicas,
            "via_pgbouncer": key.mode is Mode.PGBOUNCER,
            "pgbouncer_instances": key.instances,
        }
    )
    stack = Stack(settings)
    budget = check(deployment_topology(Settings(), settings))
    log = out / "stack.log"
    with log.open("a") as stack_log, contextlib.redirect_stdout(stack_log):
        print(f"\n=== {key.mode} W={key.workers} R={key.replicas} PgBouncers={key.instances}")
        stack.up(enforce_budget=False)
    if key.mode is Mode.PGBOUNCER:
        fresh_server_connections(stack)
    background = busy_cores()  # the stack at rest: what else runs here
    users = min(400, plan.users_per_connection * budget.clients_at_peak)
    prefix = out / key.prefix
    metrics_urls = [stack.replica(i).metrics_url for i in range(1, key.replicas + 1)]
    with (
        httpx.Client(timeout=2) as http,
        Poll(functools.partial(pool_pressure, http, metrics_urls), 1.0) as pressure,
    ):
        output, cpu = run_locust(stack, users, plan.duration, prefix)
    (prefix.parent / f"{prefix.name}.locust.log").write_text(output)
    write_cpu_csv(Path(f"{prefix}_cpu.csv"), cpu)
    measured = peaks(Path(f"{prefix}_connections.csv"), key.mode)
    totals = locust_totals(Path(f"{prefix}_stats.csv"))
    locust_ms, haproxy_ms = ms_per_request(cpu, totals["rps"])
    cell = Cell(
        mode=key.mode,
        workers=key.workers,
        replicas=key.replicas,
        pgbouncer_instances=key.instances,
        pool_max=plan.pool_max,
        predicted_clients=budget.clients_at_peak,
        budget_fits=budget.ok,
        budget_server_at_peak=budget.server_at_peak,
        measured_clients=measured["clients"],
        pgbouncer_servers=measured["servers"] if key.mode is Mode.PGBOUNCER else 0,
        clients_by_instance=measured["clients_by_instance"],
        servers_by_instance=measured["servers_by_instance"],
        postgres_backends=measured["backends"],
        postgres_max_connections=settings.postgres_max_connections,
        requests=int(totals["requests"]),
        requests_per_s=round(totals["rps"], 1),
        p50_ms=totals["p50"],
        p95_ms=totals["p95"],
        p99_ms=totals["p99"],
        failures=int(totals["failures"]),
        shed_503=measured["shed"],
        pool_waiters=max((r.waiting for r in pressure.readings), default=0),
        connection_errors=max((r.errors for r in pressure.readings), default=0),
        in_flight_by_worker=in_flight_by_worker(pressure.readings),
        read_server_timing=read_server_timing(Path(f"{prefix}_server_timing.csv")),
        locust_ms_per_request=locust_ms,
        haproxy_ms_per_request=haproxy_ms,
        background_cores=round(background, 2),
        verdict="",
        as_predicted=False,
    )
    cell.verdict, cell.as_predicted = judge(cell, budget)
    return cell


# ---- the whole sweep ----------------------------------------------------------------------


def mode_settings(base: StackSettings, mode: Mode, plan: Plan) -> StackSettings:
    """The private stack of one mode: direct mode runs PostgreSQL with a small
    max_connections (so the stack restarts it between modes)."""
    return base.model_copy(
        update={
            "postgres_max_connections": plan.direct_max_connections
            if mode is Mode.DIRECT
            else base.postgres_max_connections,
            # A small server pool: PostgreSQL's side stays flat once
            # clients outnumber it, whatever the grid adds.
            "pgbouncer_default_pool_size": plan.pgbouncer_pool_size,
            "pgbouncer_reserve_pool_size": 0,
        }
    )


def sweep(plan: Plan, out: Path) -> list[Cell]:
    """Every cell of the plan, in order, on a private stack in a scratch directory;
    the environment is restored and the stack stopped whatever happens."""
    cells: list[Cell] = []
    total = len(plan.cells())
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="pgscale-sweep-"))
    scratch.chmod(0o755)
    saved_env = dict(os.environ)
    try:
        base, _ = private_settings(
            scratch / "stack", most_pgbouncers=max(plan.instances), seed_items=SEED_ITEMS
        )
        for mode in plan.modes:
            settings = mode_settings(base, mode, plan)
            try:
                for key in plan.cells(mode):
                    say(
                        f"[{len(cells) + 1}/{total}] {key.mode:<9} W={key.workers}"
                        f" R={key.replicas} PgBouncers={key.instances}"
                        f" ({time.monotonic() - started:.0f}s elapsed) ..."
                    )
                    cells.append(run_cell(settings, key, plan, out))
                    say(progress(cells[-1]))
            finally:
                with (out / "stack.log").open("a") as log, contextlib.redirect_stdout(log):
                    Stack(settings).down()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(scratch, ignore_errors=True)
    return cells


def progress(cell: Cell) -> str:
    """The line printed after each cell."""
    mark = "ok " if cell.as_predicted else "OFF"
    split = f" ({cell.clients_by_instance})" if cell.pgbouncer_instances > 1 else ""
    return (
        f"      {mark} predicted {cell.predicted_clients:>3}"
        f" measured {cell.measured_clients:>3}{split}"
        f" | PgBouncer servers {cell.pgbouncer_servers:>2}"
        f" | PostgreSQL backends {cell.postgres_backends:>3}"
        f" | {cell.requests_per_s:>6.1f} req/s p99 {cell.p99_ms:.0f} ms"
        f" | failures {cell.failures} shed {cell.shed_503}"
    )
