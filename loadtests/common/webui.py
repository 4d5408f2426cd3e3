"""The sampler in Locust's web UI: a Connections tab, a chart page, the samples as JSON and CSV.

Routes, added to the web UI's Flask app (behind `--web-login` when it is on):

- `/connections`: a page charting users and connection counts over time;
- `/connections/samples`: the recent samples as JSON (`?last=N`, default 900);
- `/connections/csv`: the sampler's CSV file;
- `/server-timing/csv`: the Server-Timing tally per endpoint (timing.py) as CSV.

The web UI (2.22+, React) shows extra tabs declared in its template arguments
(`extended_tabs`, `extended_tables`) and fills them from an `extended_stats` list in
its `/stats/requests` polls; the Connections tab is a table of current and peak counts,
the Server-Timing tab each endpoint's queue, db and app percentiles beside Locust's own,
and the Download Data tab links to the chart and the CSVs.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from flask import Response, request, send_file
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.web import WebUI

from loadtests.common import sampler, server_timing, timing
from loadtests.common.hooks import on

TAB = "connections"
PAGE = (Path(__file__).parent / "connections.html").read_text(encoding="utf-8")
DEFAULT_LAST = 900

# The Connections tab's rows: (column, label).
TAB_ROWS = (
    ("users", "Locust users"),
    ("cl_active", "PgBouncer clients active (cl_active)"),
    ("cl_waiting", "PgBouncer clients waiting (cl_waiting)"),
    ("maxwait_ms", "PgBouncer longest wait, ms (maxwait)"),
    ("sv_active", "PgBouncer servers active (sv_active)"),
    ("sv_idle", "PgBouncer servers idle (sv_idle)"),
    ("pgb_clients", "PgBouncer client connections (all)"),
    ("pg_client_backends", "PostgreSQL client backends"),
    ("pg_active", "PostgreSQL backends active"),
    ("pg_max_connections", "PostgreSQL max_connections"),
    ("saturated_503", "503s shed on purpose"),
)


TIMING_TAB = "server_timing"
# The Server-Timing tab's columns (ms): each part's percentiles, then Locust's own.
TIMING_COLUMNS = (
    ("name", "Endpoint"),
    ("count", "Responses"),
    *(
        (f"{part}_{int(p * 100)}", f"{part} p{int(p * 100)}")
        for part in server_timing.PARTS
        for p in server_timing.PERCENTILES
    ),
    *((f"locust_{int(p * 100)}", f"Locust p{int(p * 100)}") for p in server_timing.PERCENTILES),
)


def timing_rows(environment: Environment) -> list[dict[str, Any]]:
    """The Server-Timing tab: per endpoint, where its time went beside Locust's total."""
    table = server_timing.rows(timing.TALLY, timing.locust_percentiles(environment))
    if not table:
        return [{"name": "no Server-Timing seen yet"}]
    keys = [key for key, _ in TIMING_COLUMNS]
    return [dict(zip(keys, [f"{row[0]} {row[1]}", *row[2:]], strict=True)) for row in table]


def _recent(last: int) -> list[dict[str, Any]]:
    current = sampler.current
    if current is None:
        return []
    samples = list(current.samples)[-last:] if last > 0 else []
    return [sample.row() for sample in samples]


def tab_rows() -> list[dict[str, Any]]:
    """Now and peak of each counted column, as rows of the Connections tab."""
    rows = _recent(sampler.KEEP)
    if not rows:
        return [{"name": "no samples yet (is the sampler on? see the log)", "now": "", "peak": ""}]
    latest = rows[-1]
    table = []
    for column, label in TAB_ROWS:
        values = [row[column] for row in rows if row[column] is not None]
        peak = max(values) if values else ""
        now = latest[column] if latest[column] is not None else "n/a"
        table.append({"name": label, "now": now, "peak": peak})
    return table


View = TypeVar("View", bound=Callable[..., Response])


def _protect(web_ui: WebUI) -> Callable[[View], View]:
    """Locust's login check on a view (when --web-login is on), keeping its type."""

    def protect(view: View) -> View:
        return cast(View, web_ui.auth_required_if_enabled(view))  # type: ignore[no-untyped-call]

    return protect


def install(web_ui: WebUI) -> None:
    """Add the routes and the tab to a master's or a standalone run's web UI."""
    app = web_ui.app
    assert app is not None  # set by WebUI.__init__
    protect = _protect(web_ui)
    web_ui.template_args["extended_tabs"] = [
        {"title": "Connections", "key": TAB},
        {"title": "Server-Timing", "key": TIMING_TAB},
    ]
    web_ui.template_args["extended_tables"] = [
        {
            "key": TAB,
            "structure": [
                {"key": "name", "title": "Count"},
                {"key": "now", "title": "Now"},
                {"key": "peak", "title": "Peak this run"},
            ],
        },
        {
            "key": TIMING_TAB,
            "structure": [{"key": key, "title": title} for key, title in TIMING_COLUMNS],
        },
    ]
    web_ui.template_args["extended_csv_files"] = [
        {"href": "./connections", "title": "Connections chart (PgBouncer and PostgreSQL)"},
        {"href": "./connections/csv", "title": "Download connection samples CSV"},
        {"href": "./server-timing/csv", "title": "Download Server-Timing per endpoint CSV"},
    ]

    @app.route("/connections")
    @protect
    def connections_page() -> Response:
        return Response(PAGE, mimetype="text/html")

    @app.route("/connections/samples")
    @protect
    def connections_samples() -> Response:
        last = request.args.get("last", default=DEFAULT_LAST, type=int) or 0
        body = {"samples": _recent(min(last, sampler.KEEP))}
        return Response(json.dumps(body), mimetype="application/json")

    @app.route("/connections/csv")
    @protect
    def connections_csv() -> Response:
        current = sampler.current
        if current is None or not current.config.csv.exists():
            return Response("the sampler is off\n", status=404, mimetype="text/plain")
        return send_file(current.config.csv.resolve(), mimetype="text/csv", as_attachment=True)

    @app.route("/server-timing/csv")
    @protect
    def server_timing_csv() -> Response:
        table = server_timing.rows(timing.TALLY, timing.locust_percentiles(web_ui.environment))
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(server_timing.columns())
        writer.writerows(table)
        headers = {"Content-Disposition": "attachment; filename=server_timing.csv"}
        return Response(out.getvalue(), mimetype="text/csv", headers=headers)

    @app.after_request
    def add_tab_rows(response: Response) -> Response:
        if not request.path.endswith("/stats/requests") or response.status_code != 200:
            return response
        body = response.get_json(silent=True)
        if isinstance(body, dict):
            mine = (TAB, TIMING_TAB)
            extended = [e for e in body.get("extended_stats") or [] if e.get("key") not in mine]
            body["extended_stats"] = [
                *extended,
                {"key": TAB, "data": tab_rows()},
                {"key": TIMING_TAB, "data": timing_rows(web_ui.environment)},
            ]
            response.set_data(json.dumps(body))
        return response


@on(events.init)
def _install(environment: Environment, web_ui: WebUI | None = None, **_: Any) -> None:
    if web_ui is not None and not isinstance(environment.runner, WorkerRunner):
        install(web_ui)
