"""gunicorn configuration: `gunicorn -c python:service.gunicorn_conf service.asgi:app`.

Worker count, bind address and timeouts come from the same Settings as the app. Before
any worker starts, the connection budget is checked (service/budget.py): a replica
that alone cannot fit refuses to start; one that fits only below the declared REPLICAS
starts with a warning. The master serves the workers' metrics on METRICS_PORT
(multiprocess mode), away from the public port, and forgets a worker's gauges when
it dies.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from service import logs
from service.budget import BudgetExceeded, deployment_topology, guard
from service.prepared import (
    PreparedStatementsUnsafe,
    describe_prepared_statements,
    prepare_threshold,
)
from service.rules import timeout_problems
from service.settings import DeploymentSettings, get_settings

_settings = get_settings()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "uvicorn_worker.UvicornWorker"  # `uvicorn.workers` is deprecated
graceful_timeout = _settings.graceful_timeout
timeout = max(30, int(_settings.db_deadline * 3))  # a worker silent this long is restarted
keepalive = 5
proc_name = f"pgscale-{_settings.replica_name}"
accesslog = None  # one line per request costs more than it tells at this scale
errorlog = "-"
loglevel = _settings.log_level

# prometheus_client picks multiprocess mode at import time from this variable, so it is
# set here, in the master, before anything imports the client; workers inherit it.
if _settings.metrics_enabled:
    _metrics_dir = _settings.prometheus_multiproc_dir or Path(
        tempfile.mkdtemp(prefix=f"pgscale-metrics-{_settings.replica_name}-")
    )
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)
    # Samples a previous run left behind would be summed into ours. Wiped here, while
    # the config loads: the preloaded app writes its first samples right after.
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)
else:
    # Metrics off: samples stay in each process's memory, nothing is written.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

# Import the app once in the master, then fork: workers start in milliseconds and share
# the imported code's memory. Nothing connects at import: each worker opens its own
# pool in the lifespan, after the fork. (prometheus_client notices the fork by itself.)
preload_app = True


def on_starting(server: Any) -> None:
    """Refuse a replica that cannot fit the deployment, or prepared statements unsafe here."""
    deployment = DeploymentSettings()
    problems = timeout_problems(
        query_wait_timeout=deployment.pgbouncer_query_wait_timeout,
        db_deadline=_settings.db_deadline,
        via_pgbouncer=deployment.via_pgbouncer,
    )
    if problems:
        raise SystemExit("; ".join(problems))
    try:
        guard(deployment_topology(_settings, deployment), server.log)
        threshold = prepare_threshold(_settings, deployment)
    except (BudgetExceeded, PreparedStatementsUnsafe) as exc:
        raise SystemExit(str(exc)) from None
    server.log.info("%s", describe_prepared_statements(threshold, deployment))


def pre_fork(server: Any, worker: Any) -> None:
    """Freeze what the master has built (the preloaded app) out of the workers' GC.

    Without it every full collection in a worker walks the whole imported app, some
    hundreds of thousands of objects that never die: `make bench` measured about 25 ms
    per collection, several a second per worker under load, each one a stall of every
    request in flight on that worker (most of GET /items/{id}'s p99). Frozen objects
    are never examined again, so a full collection walks only what the worker made
    itself, and the shared pages are not written to (gc.freeze's documented use before
    fork).
    """
    gc.freeze()


def when_ready(server: Any) -> None:
    """Serve every worker's metrics from the master, on the replica's metrics port."""
    if not _settings.metrics_enabled:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    # The preloaded app created its gauges here in the master, which serves no request:
    # drop its series, or every replica would show an idle "worker" with the master's pid.
    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(_settings.metrics_port, addr=_settings.host, registry=registry)
    server.log.info("metrics on http://%s:%d/metrics", _settings.host, _settings.metrics_port)


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's gauges must not linger as if it still held connections."""
    if _settings.metrics_enabled:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


# Every logger, gunicorn's own included, through one handler: text or JSON lines, each
# naming its request (service/logs.py).
logconfig_dict = logs.logconfig(_settings)
