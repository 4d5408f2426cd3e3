"""Server-Timing in a Locust run: the parts of every response, per endpoint.

Each response's Server-Timing (queue, db, app: service/context.py) is tallied per
endpoint (server_timing.py); workers send their tallies with their stats reports, so
the master (or a standalone run) holds the whole run's. At the end the table goes
beside Locust's CSVs as `PREFIX_server_timing.csv` (with `--csv PREFIX`), and during the
run the web UI's Server-Timing tab shows it (webui.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from locust import events
from locust.env import Environment

from loadtests.common.hooks import on
from loadtests.common.server_timing import PERCENTILES, Key, Tally, parse, write_csv

logger = logging.getLogger("loadtests.timing")

# This process's tally: of its own requests, or on a master of its workers' reports.
TALLY = Tally()
_REPORT_KEY = "server_timing"


@on(events.request)
def _tally(request_type: str, name: str, response: Any = None, **_: Any) -> None:
    headers = getattr(response, "headers", None)
    if headers is not None:
        TALLY.add(request_type, name, parse(headers.get("server-timing")))


@on(events.report_to_master)
def _report(client_id: str, data: dict[str, Any]) -> None:
    data[_REPORT_KEY] = TALLY.export()
    TALLY.clear()


@on(events.worker_report)
def _merge(client_id: str, data: dict[str, Any]) -> None:
    TALLY.merge(data.get(_REPORT_KEY) or [])


@on(events.reset_stats)
def _reset() -> None:
    TALLY.clear()


def locust_percentiles(environment: Environment) -> dict[Key, dict[float, float | None]]:
    """Locust's own response-time percentiles (ms) per endpoint, to print beside ours."""
    found: dict[Key, dict[float, float | None]] = {}
    for (name, method), entry in environment.stats.entries.items():
        found[(method, name)] = {
            p: (entry.get_response_time_percentile(p) if entry.num_requests else None)
            for p in PERCENTILES
        }
    return found


@on(events.quitting)
def _write(environment: Environment, **_: Any) -> None:
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix and TALLY.parts:
        path = Path(f"{prefix}_server_timing.csv")
        write_csv(path, TALLY, locust_percentiles(environment))
        logger.info("Server-Timing per endpoint in %s", path)
