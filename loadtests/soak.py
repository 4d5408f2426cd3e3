"""`make soak [DURATION=30m]`: mixed load for a long while, a fault every few minutes,
and whether anything grows.

A private stack (the fault suite's: 2 replicas x 2 workers behind haproxy, a TCP proxy
in front of PgBouncer, POOL_RECONNECT_TIMEOUT 3 s) carries Locust's browse, visits and
crud scenarios together through the load balancer for the whole run. Every `--every`
seconds one fault of the suite runs, in rotation (PgBouncer killed, the network cut,
PostgreSQL restarted, PgBouncer down past the reconnect timeout, ...), as the suite
runs it: its own audited writes beside Locust's, then lost, dup, recovery and every
replica's readiness. (Locust does not pause, so here the "no traffic" outage has
Locust's traffic; the suite's own row runs it quiet.)

Every `--interval` seconds it samples each worker from outside: RSS and threads
(/proc/<pid>/status), open file descriptors (/proc/<pid>/fd), and from the replica's
metrics its requests in flight, requests waiting for a connection
(pgscale_pool_requests_waiting) and pool connections. An asyncio task count cannot be
read from outside a process without stopping it (py-spy shows threads, not tasks), so
requests in flight and waiting stand for it: every request is a task. Beside them
PgBouncer's SHOW POOLS/CLIENTS/SERVERS and pg_stat_activity, with the connection
sampler's own code.

The verdict (soak_report.py): for each worker, a least-squares line through its RSS
and fds after the warm-up; the rise it predicts over the run must stay within
tolerance; no worker replaced; and every fault's row holds (recovered within 5 s,
every replica ready within 5 s, nothing lost or doubled). Report under
reports/soak/<timestamp>/ (reports/soak/latest points at the newest).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from infra.localstack import procs
from infra.localstack.config import REPO
from loadtests.common.poll import Poll
from loadtests.common.prom import Scrape
from loadtests.common.sampling import Probe, join_dsns
from loadtests.soak_report import FaultRun, write_report
from tests.faults.faults import Timing, by_name, run_phase
from tests.faults.harness import SEED_ITEMS, Harness, Tuning, fault_stack
from tests.faults.suite import keep_logs, say

REPORTS = REPO / "reports" / "soak"
SCENARIOS = ("browse.py", "visits.py", "crud.py")
# The rotation: one after another, every --every seconds, round again when the list ends.
ROTATION = (
    "pgbouncer-sigkill",
    "network-cut",
    "postgres-fast",
    "pgbouncer-outage-quiet",
    "network-blackhole-long",
    "pgbouncer-flapping",
    "postgres-immediate",
)
# The fault's own load is light: Locust is the main load here.
FAULT_TIMING = Timing(threads=2, think=0.05)
WORKER_COLUMNS = (
    "elapsed_s",
    "replica",
    "pid",
    "rss_mb",
    "fds",
    "threads",
    "in_flight",
    "waiting",
    "in_use",
    "available",
    "connections",
)
CONNECTION_COLUMNS = (
    "elapsed_s",
    "cl_active",
    "cl_waiting",
    "sv_active",
    "sv_idle",
    "pgb_clients",
    "pgb_servers",
    "pg_client_backends",
)


def parse_duration(text: str) -> float:
    """`30m`, `90s`, `1h`, `1h30m` or plain seconds, in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 30m, 90s or 1h)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@dataclass(frozen=True)
class WorkerSample:
    """One worker at one moment."""

    elapsed_s: float
    replica: int
    pid: int
    rss_mb: float
    fds: int
    threads: int
    in_flight: float | None
    waiting: float | None
    in_use: float | None
    available: float | None
    connections: float | None


def sample_workers(harness: Harness, elapsed: float) -> list[WorkerSample]:
    """Every worker of every replica now; a worker that exits mid-read is skipped."""
    samples = []
    for index in range(1, harness.tuning.replicas + 1):
        try:
            # One reading of the replica's metrics for the pool gauges and in-flight.
            scrape = Scrape.get(harness.replica(index).metrics_url)
            workers = harness.worker_pids(index)
        except (OSError, httpx.HTTPError, AssertionError, ValueError):
            continue  # replica restarting, or its metrics port not answering
        gauges = scrape.gauges_by_pid("pgscale_pool_")
        flights = scrape.by_pid("pgscale_http_requests_in_flight")
        for pid in sorted(workers):
            try:
                status = proc_status(pid)
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            mine = gauges.get(str(pid), {})
            samples.append(
                WorkerSample(
                    elapsed_s=round(elapsed, 2),
                    replica=index,
                    pid=pid,
                    rss_mb=round(int(status["VmRSS"].split()[0]) / 1024, 2),
                    fds=fds,
                    threads=int(status["Threads"]),
                    in_flight=flights.get(str(pid)),
                    waiting=mine.get("pgscale_pool_requests_waiting"),
                    in_use=mine.get("pgscale_pool_connections_in_use"),
                    available=mine.get("pgscale_pool_connections_available"),
                    connections=mine.get("pgscale_pool_connections"),
                )
            )
    return samples


class Sampler:
    """Samples every `interval` s (a `Poll`) into two CSV files, while the block runs."""

    def __init__(self, harness: Harness, out: Path, interval: float, started: float) -> None:
        self.harness = harness
        self.started = started
        self.workers_csv = out / "workers.csv"
        self.connections_csv = out / "connections.csv"
        self._poll = Poll(self._sample, interval)
        self._files = contextlib.ExitStack()
        stack = harness.stack
        self.probe = Probe(
            pgbouncer=join_dsns(b.admin_conninfo() for b in stack.pgbouncers()),
            postgres=stack.postgres().superuser_conninfo(),
        )

    def __enter__(self) -> Sampler:
        self._w = self._files.enter_context(self.workers_csv.open("w", newline=""))
        self._c = self._files.enter_context(self.connections_csv.open("w", newline=""))
        self._workers = _writer(self._w, WORKER_COLUMNS)
        self._conns = _writer(self._c, CONNECTION_COLUMNS)
        self._poll.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._poll.__exit__(*exc)
        self._files.close()
        self.probe.close()

    def _sample(self) -> None:
        elapsed = time.monotonic() - self.started
        for sample in sample_workers(self.harness, elapsed):
            self._workers.writerow(asdict(sample))
        bouncer, postgres = self.probe.read()
        self._conns.writerow(
            {
                "elapsed_s": round(elapsed, 2),
                **{k: (bouncer or {}).get(k) for k in CONNECTION_COLUMNS[1:7]},
                "pg_client_backends": (postgres or {}).get("pg_client_backends"),
            }
        )
        self._w.flush()
        self._c.flush()


def _writer(f: TextIO, columns: tuple[str, ...]) -> csv.DictWriter[str]:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    return writer


def start_locust(
    harness: Harness, users: int, seconds: float, prefix: Path
) -> subprocess.Popen[bytes]:
    """Locust headless with the three scenarios together, for `seconds`, through haproxy."""
    stack = harness.stack
    env = {
        **os.environ,
        "SAMPLER_PGBOUNCER_URL": join_dsns(b.admin_conninfo() for b in stack.pgbouncers()),
        "SAMPLER_POSTGRES_URL": stack.postgres().superuser_conninfo(),
        "SEED_ITEMS": str(SEED_ITEMS),
        "LOADTEST_MAX_FAIL_RATIO": "1",  # faults shed load on purpose; the rows judge them
        "LOADTEST_MAX_P95_MS": "1000000",
    }
    log = prefix.parent / "locust.log"
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                ",".join(str(REPO / "loadtests" / name) for name in SCENARIOS),
                "--headless",
                "--users",
                str(users),
                "--spawn-rate",
                str(max(1, users // 4)),
                "--run-time",
                f"{int(seconds)}s",
                "--host",
                harness.lb_url,
                "--csv",
                str(prefix),
                "--only-summary",
                "--stop-timeout",
                "10",
            ],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def soak(duration: float, every: float, interval: float, users: int, out: Path) -> bool:
    """Run the soak; write the report in `out`; True when its verdict holds."""
    tuning = Tuning()
    faults = by_name(list(ROTATION))
    runs: list[FaultRun] = []
    say(f"soak: {duration:.0f} s, a fault every {every:.0f} s; starting a private stack ...")
    with fault_stack(tuning) as harness:
        started = time.monotonic()
        locust = start_locust(harness, users, duration, out / "locust")
        try:
            with Sampler(harness, out, interval, started):
                n = 0
                # The next fault starts `every` s after the last one started, and only
                # when it can end (about a minute) before the run does.
                next_at = started + min(every, 60.0)
                while max(next_at, time.monotonic()) + 60 < started + duration:
                    time.sleep(max(0.0, next_at - time.monotonic()))
                    fault = faults[n % len(faults)]
                    at = time.monotonic() - started
                    say(f"[{at:6.0f} s] {fault.name}: {fault.description}")
                    row = run_phase(harness, fault, FAULT_TIMING)
                    runs.append(FaultRun(at, time.monotonic() - started, row))
                    verdict = "ok" if row.ok else "FAILED: " + "; ".join(row.failures())
                    say(f"          recovery {row.recovery} s, ready {row.ready} s: {verdict}")
                    n += 1
                    next_at = started + at + every
                time.sleep(max(0.0, started + duration - time.monotonic()))
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                locust.wait(60)
            if locust.poll() is None:
                locust.terminate()
                locust.wait(30)
            keep_logs(harness, out)
        meta: dict[str, Any] = {
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": duration,
            "every_s": every,
            "interval_s": interval,
            "users": users,
            "scenarios": list(SCENARIOS),
            "tuning": asdict(tuning),
            "locust_exit": locust.returncode,
        }
    (out / "faults.json").write_text(
        json.dumps([{"at": r.at, "ended": r.ended, **asdict(r.row)} for r in runs], indent=2)
    )
    return write_report(out, meta, runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__)
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    parser.add_argument("--every", type=parse_duration, default=180.0, help="between faults")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--users", type=int, default=24, help="Locust users")
    args = parser.parse_args(argv)
    out = REPORTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    try:
        ok = soak(args.duration, args.every, args.interval, args.users, out)
    except procs.StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    latest = REPORTS / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(out.name)
    say(f"{'the soak holds' if ok else 'THE SOAK FAILS'}; report: {out / 'report.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
