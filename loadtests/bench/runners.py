"""The load generators: wrk against a replica, pgbench and psycopg alone through PgBouncer,
and py-spy on a worker under wrk's load."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from infra.localstack import procs
from infra.localstack.config import REPO
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.postgres import PG_BIN
from infra.localstack.replicas import Replica
from loadtests.bench.plan import APP, POOL, SEED_ITEMS, WORKERS, Config, Endpoint, RunKey
from loadtests.bench.probes import worker_pids
from loadtests.bench.results import Result


def run_wrk(url: str, script: Path, connections: int, duration: int) -> dict[str, Any]:
    result = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    )
    line = result.stdout.strip().splitlines()[-1]
    data: dict[str, Any] = json.loads(line)
    return data


def run_driver(url: str, duration: int) -> Result:
    """psycopg alone running GET /items/{id}'s SELECT (loadtests/driver_ceiling.py)."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "loadtests.driver_ceiling", url),
            *("--clients", str(WORKERS * POOL), "--duration", str(duration)),
            *("--ids", str(SEED_ITEMS)),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
        cwd=REPO,
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return Result(
        key=RunKey(Config.DRIVER, Endpoint.PSYCOPG_SELECT),
        rps=data["queries"] / data["seconds"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        non2xx=0,
        socket_errors=0,
    )


def libpq_env(params: dict[str, str]) -> dict[str, str]:
    """libpq parameters as the environment variables libpq reads (PGSSLMODE, ...)."""
    return {f"PG{name.upper()}": value for name, value in params.items()}


def run_pgbench(
    bouncers: list[PgBouncer],
    password: str,
    endpoint: Endpoint,
    script: Path,
    duration: int,
    log_dir: Path,
    config: Config = Config.DATABASE,
) -> Result:
    """An endpoint's SQL run by pgbench through the same PgBouncer: what the database
    path can carry, with as many connections as the pooled replica holds.

    With several PgBouncers, one pgbench per instance at once, the clients split evenly
    (Debian's pgbench links libpq 15: no load_balance_hosts), their rates added.
    """
    for old in log_dir.glob("pgbench_log*"):
        old.unlink()
    clients = WORKERS * POOL // len(bouncers)
    running = [
        subprocess.Popen(
            [
                str(PG_BIN / "pgbench"),
                "-n",
                "-M",
                "simple",  # no server-side prepared statements: transaction pooling
                f"-c{clients}",
                "-j2",
                f"-T{duration}",
                "-f",
                str(script),
                "-l",
                "--log-prefix",
                str(log_dir / f"pgbench_log_{bouncer.name}"),
                "-h",
                "127.0.0.1",
                "-p",
                str(bouncer.port),
                "-U",
                APP,
                APP,
            ],
            env={**os.environ, "PGPASSWORD": password, **libpq_env(bouncer.client_tls())},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=log_dir,
        )
        for bouncer in bouncers
    ]
    tps = 0.0
    for process in running:
        stdout, stderr = process.communicate(timeout=duration + 60)
        if process.returncode != 0:
            raise subprocess.CalledProcessError(process.returncode, process.args, stdout, stderr)
        tps += next(
            float(line.split("=")[1].split()[0])
            for line in stdout.splitlines()
            if line.startswith("tps =")
        )
    latencies = []
    for log in log_dir.glob("pgbench_log*"):
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]))  # microseconds
    latencies.sort()
    return Result(
        key=RunKey(config, endpoint),
        rps=tps,
        p50_ms=latencies[len(latencies) // 2] / 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] / 1000,
        non2xx=0,
        socket_errors=0,
    )


def profile(replica: Replica, script: Path, connections: int, duration: int, out: Path) -> str:
    """py-spy on one pooled worker under load: where a request's time goes."""
    pid = worker_pids(procs.read_pid(replica.pid_file) or 0)[0]
    raw = out / "profile.txt"
    load = threading.Thread(
        target=run_wrk, args=(replica.url, script, connections, duration + 2), daemon=True
    )
    load.start()
    time.sleep(1)
    subprocess.run(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ],
        capture_output=True,
        check=False,
    )
    load.join()
    if not raw.exists():
        return "(py-spy could not attach)"
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for module in {_module(frame) for frame in frames}:
            inclusive[module] += n
    lines = [f"{total} samples of one worker under GET /items/{{id}} load", "", "Self time:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(12)]
    lines += ["", "Inclusive time by package:"]
    lines += [f"  {n / total:6.1%}  {mod}" for mod, n in inclusive.most_common(12)]
    return "\n".join(lines)


def _module(frame: str) -> str:
    """`func (psycopg/cursor.py:12)` -> `psycopg`; the interpreter's own frames -> `python`."""
    inside = frame.rpartition("(")[2].rstrip(")")
    if inside.startswith("<frozen") or "/" not in inside:
        return "python"
    return inside.split("/")[0]
