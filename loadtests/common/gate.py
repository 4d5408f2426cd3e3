"""Thresholds that turn a load test into a pass/fail exit code, so it can gate CI.

Custom Locust arguments (also settable in locust.conf or through the environment):

| Argument | Environment | Default | Fails the run when |
|---|---|---|---|
| `--max-fail-ratio` | `LOADTEST_MAX_FAIL_RATIO` | `0.01` | failed / all requests is above it |
| `--max-p95-ms` | `LOADTEST_MAX_P95_MS` | `1000` | the 95th percentile response time is above it |

A run also fails when it made no request at all, or when a task or event handler raised
an exception. The gate sets the exit code either way, so failures within
`--max-fail-ratio` pass (Locust alone exits 1 on any). Shed 503s (see checks.py) are
successes: never failures, though their response times count toward the p95. In
distributed mode only the master judges, over every worker's statistics.
"""

from __future__ import annotations

import logging
from typing import Any

import locust.log
from locust import events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtests.common.hooks import on

logger = logging.getLogger("loadtests.gate")

DEFAULT_MAX_FAIL_RATIO = 0.01
DEFAULT_MAX_P95_MS = 1000.0


@on(events.init_command_line_parser)
def _add_arguments(parser: LocustArgumentParser, **_: Any) -> None:
    # On the parser itself (not a group), so the web UI offers them as custom parameters.
    parser.add_argument(
        "--max-fail-ratio",
        type=float,
        env_var="LOADTEST_MAX_FAIL_RATIO",
        default=DEFAULT_MAX_FAIL_RATIO,
        help="Exit 1 when more than this fraction of requests failed.",
    )
    parser.add_argument(
        "--max-p95-ms",
        type=float,
        env_var="LOADTEST_MAX_P95_MS",
        default=DEFAULT_MAX_P95_MS,
        help="Exit 1 when the 95th percentile response time exceeds this many ms.",
    )


def verdict(environment: Environment) -> list[str]:
    """What broke a threshold (empty: the run passes), each naming its numbers."""
    options = environment.parsed_options
    max_fail_ratio = getattr(options, "max_fail_ratio", DEFAULT_MAX_FAIL_RATIO)
    max_p95_ms = getattr(options, "max_p95_ms", DEFAULT_MAX_P95_MS)
    total = environment.stats.total
    problems: list[str] = []
    if total.num_requests == 0:
        problems.append("no request was made")
    if total.fail_ratio > max_fail_ratio:
        problems.append(
            f"fail ratio {total.fail_ratio:.2%} ({total.num_failures} of {total.num_requests})"
            f" is above --max-fail-ratio {max_fail_ratio:.2%}"
        )
    p95 = total.get_response_time_percentile(0.95)
    if total.num_requests and p95 > max_p95_ms:
        problems.append(f"p95 {p95} ms is above --max-p95-ms {max_p95_ms:g}")
    runner = environment.runner
    if runner is not None and runner.exceptions:
        count = sum(int(e["count"]) for e in runner.exceptions.values())
        problems.append(f"{count} exception(s) raised in tasks (see the exceptions table)")
    if locust.log.unhandled_greenlet_exception:
        problems.append("an event handler or greenlet raised an exception (see the log)")
    return problems


@on(events.quitting)
def _gate(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master judges the whole run
    problems = verdict(environment)
    total = environment.stats.total
    if problems:
        for problem in problems:
            logger.error("threshold broken: %s", problem)
        environment.process_exit_code = 1
        return
    logger.info(
        "thresholds met: fail ratio %.2f%%, p95 %d ms over %d requests",
        total.fail_ratio * 100,
        total.get_response_time_percentile(0.95),
        total.num_requests,
    )
    if not environment.process_exit_code:
        environment.process_exit_code = 0
