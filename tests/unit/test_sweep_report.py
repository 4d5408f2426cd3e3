"""The sweep report says when the machine was not the stack's own, and how evenly the
workers shared the users."""

from __future__ import annotations

import json
from dataclasses import replace

from infra.localstack.config import REPO
from loadtests.sweep.cells import Cell
from loadtests.sweep.plan import Mode
from loadtests.sweep.probes import Pressure, in_flight_by_worker
from loadtests.sweep.report import QUIET_CORES, shared_note

# The first cell of the documented sweep, as the runner builds them.
_ROW = json.loads((REPO / "docs" / "sweep" / "summary.json").read_text())["cells"][0]
CELL = Cell(
    **{**_ROW, "mode": Mode(_ROW["mode"]), "background_cores": 0.04, "in_flight_by_worker": ""}
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
