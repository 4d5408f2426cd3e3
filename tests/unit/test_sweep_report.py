"""The sweep report says when the machine was not the stack's own, and how evenly the
workers shared the users."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psutil

from infra.localstack.config import REPO
from infra.localstack.procs import wait_until
from loadtests.common.server_timing import Tally, write_csv
from loadtests.sweep.cells import Cell
from loadtests.sweep.plan import Mode
from loadtests.sweep.probes import (
    CpuReading,
    Pressure,
    cpu_seconds,
    in_flight_by_worker,
    ms_per_request,
    parse_parts,
    read_server_timing,
)
from loadtests.sweep.report import QUIET_CORES, shared_note

# The first cell of the documented sweep, as the runner builds them.
_ROW = json.loads((REPO / "docs" / "sweep" / "summary.json").read_text())["cells"][0]
CELL = Cell(
    **{
        **_ROW,
        "mode": Mode(_ROW["mode"]),
        "background_cores": 0.04,
        "in_flight_by_worker": "",
        "read_server_timing": "",
        "locust_ms_per_request": 0.0,
        "haproxy_ms_per_request": 0.0,
    }
)


def test_a_quiet_machine_is_said_to_be_the_stacks_own() -> None:
    note = shared_note([CELL, replace(CELL, background_cores=0.1)])
    assert "the machine was the stack's own" in note
    assert "0.10" in note


def test_cells_that_shared_the_machine_are_counted() -> None:
    busy = replace(CELL, background_cores=QUIET_CORES + 0.7)
    note = shared_note([CELL, busy, busy])
    assert note.startswith("Other load: 2 of 3 cells")
    assert "compare them with a quiet run" in note


def test_each_workers_mean_in_flight_is_reported_largest_first() -> None:
    readings = [
        Pressure(0, 0, ({"1": 99.0, "2": 99.0}, None)),  # users still starting: left out
        Pressure(0, 0, ({"1": 99.0, "2": 99.0}, None)),
        Pressure(3, 0, ({"1": 4.0, "2": 20.0}, {"7": 12.0})),
        Pressure(5, 0, ({"1": 6.0, "2": 24.0}, None)),  # replica 2's port did not answer
    ]
    assert in_flight_by_worker(readings) == "replica-1=22.0,5.0;replica-2=12.0"


def test_a_reads_server_timing_is_kept_from_the_plugins_csv(tmp_path: Path) -> None:
    """The timing plugin's own CSV (written by its own writer), read back for the read by
    id only: the page's row, and a file that is not there, give nothing of theirs."""
    tally = Tally()
    for queue, db, app in ((1.0, 2.0, 3.0), (1.0, 2.0, 3.0), (40.0, 9.0, 5.0)):
        tally.add("GET", "/items/[id]", {"queue": queue, "db": db, "app": app})
    tally.add("GET", "/items?limit=[n]&after=[id]", {"queue": 99.0, "db": 99.0, "app": 99.0})
    locust = {("GET", "/items/[id]"): {0.5: 7.0, 0.95: 50.0, 0.99: 60.0}}
    path = tmp_path / "cell_server_timing.csv"
    write_csv(path, tally, locust)
    kept = read_server_timing(path)
    assert kept == "queue=1/40;db=2/9;app=3/5;locust=7/60"
    assert parse_parts(kept) == {
        "queue": (1.0, 40.0),
        "db": (2.0, 9.0),
        "app": (3.0, 5.0),
        "locust": (7.0, 60.0),
    }
    assert read_server_timing(tmp_path / "missing.csv") == ""
    assert parse_parts("") == {}


def test_the_rigs_cpu_per_request_comes_from_the_steady_part() -> None:
    """Startup (Locust's imports) and the stop are left out; the rest over the rate."""
    readings = [
        CpuReading(1.0, 0.9, 0.0),  # imports
        CpuReading(2.0, 1.6, 0.05),  # users starting
        CpuReading(3.0, 2.5, 0.15),  # steady from here: 0.5 s of Locust CPU a second
        CpuReading(5.0, 3.5, 0.25),
        CpuReading(6.0, 9.0, 0.3),  # stopping: left out
    ]
    assert ms_per_request(readings, rps=1000) == (0.5, 0.05)
    assert ms_per_request(readings[:4], rps=1000) == (0.0, 0.0)  # too few to say
    assert ms_per_request(readings, rps=0) == (0.0, 0.0)


def test_a_processs_cpu_counts_its_running_children() -> None:
    """haproxy -W serves from a child of its master: the child's CPU is counted."""
    assert cpu_seconds(None) == 0.0

    def beyond_our_own() -> float:
        own = psutil.Process().cpu_times()
        return cpu_seconds(os.getpid()) - (own.user + own.system)

    with subprocess.Popen([sys.executable, "-c", "while True: pass"]) as spinner:
        try:
            assert wait_until(lambda: beyond_our_own() > 0.2, timeout=60)
        finally:
            spinner.kill()
            spinner.wait()
    assert cpu_seconds(spinner.pid) == 0.0  # gone
