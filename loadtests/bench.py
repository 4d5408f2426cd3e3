"""The benchmark: requests/s and latency through PgBouncer, side by side with baselines.

One PostgreSQL and one PgBouncer, and one replica (2 workers, pool 4 per worker) per
configuration, all started before the first run so every configuration is measured
in the same conditions. Then rounds: in each, wrk (fixed connections, Lua for random
ids and writes) runs every endpoint against every configuration in turn; the report
takes medians over the rounds.

- `pooled`: the service as deployed (through PgBouncer, metrics on);
- `pooled, metrics off`: the same with METRICS_ENABLED=false (the cost of metrics);
- `pooled, coalescing off`: the same with COALESCE_MAX=1, every request its own
  statement (what service/coalesce.py buys);
- `per-request connection`: a new connection per request, the naive pattern;
- `direct`: the pooled service pointed straight at PostgreSQL;
- `framework ceiling`: GET /healthz on the pooled replica (no database);
- `database ceiling`: pgbench running the same SELECT through the same PgBouncer with
  as many connections as the pooled replica holds (2 x 4);
- `driver ceiling`: psycopg alone running that SELECT the same way, from Python
  (loadtests/driver_ceiling.py): what the database path costs the service's side.

Also: how many requests each statement served (from the replica's own metrics), the
CPU each run cost per request, split by process (the replica's workers,
PgBouncer, PostgreSQL, the load generator), which says where a request's time goes on a
machine where they all share the cores; each configuration's time from process start
to /readyz 200; worker RSS at rest and under load; and (with --profile) a py-spy
profile of a pooled worker under load.

The machine's speed drifts by tens of percent from minute to minute, so the targets
that compare two runs (GET /items/{id} against the framework ceiling, POST against GET,
metrics on against off) are taken within each round, from runs made back to back, and
the report gives the median of those per-round ratios.

    .venv/bin/python -m loadtests.bench [--rounds 3] [--duration 8] [--connections 64]

`make bench` runs it and writes reports/bench/latest.json and latest.md.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from infra.localstack import procs
from infra.localstack.config import REPO
from infra.localstack.pgbouncer import PgBouncer
from infra.localstack.postgres import PG_BIN, Postgres
from infra.localstack.replicas import Replica
from loadtests.common.poll import Poll
from loadtests.common.prom import Scrape
from service import sql

REPORTS = REPO / "reports" / "bench"
FLUSH_WAIT_S = 1.2  # a little over the replicas' POOL_STATS_INTERVAL (1 s)
SEED_ITEMS = 1000
APP = "app"
WORKERS = 2
POOL = 4


class Endpoint(Enum):
    """What a run asks for; the value is what the report calls it."""

    GET_ITEM = "GET /items/{id}"
    LIST_ITEMS = "GET /items?limit=20"
    POST_VISIT = "POST /visits"
    HEALTHZ = "GET /healthz"
    PGBENCH_SELECT = "pgbench SELECT by id"
    PGBENCH_VISIT = "pgbench visit write"
    PSYCOPG_SELECT = "psycopg SELECT by id"


class Config(Enum):
    """What a run measures: a replica configuration, or one of the ceilings beside them."""

    POOLED = "pooled"
    NOMETRICS = "nometrics"
    SINGLE = "single"
    NAIVE = "naive"
    DIRECT = "direct"
    FRAMEWORK = "framework"  # GET /healthz on the pooled replica: no database
    DATABASE = "database"  # pgbench through the same PgBouncer
    DRIVER = "driver"  # psycopg alone (loadtests/driver_ceiling.py)

    @property
    def label(self) -> str:
        """What the report calls it."""
        return LABELS[self]

    @property
    def replica(self) -> Config:
        """The configuration whose replica serves this one's wrk runs."""
        return Config.POOLED if self is Config.FRAMEWORK else self


LABELS = {
    Config.POOLED: "pooled (as deployed)",
    Config.NOMETRICS: "pooled, metrics off",
    Config.SINGLE: "pooled, coalescing off",
    Config.NAIVE: "per-request connection",
    Config.DIRECT: "direct to PostgreSQL",
    Config.FRAMEWORK: "framework ceiling",
    Config.DATABASE: "database ceiling",
    Config.DRIVER: "driver ceiling",
}

# The replica configurations, one replica each: settings on top of the common ones.
REPLICA_SETTINGS: dict[Config, dict[str, str]] = {
    Config.POOLED: {},
    Config.NOMETRICS: {"METRICS_ENABLED": "false"},
    Config.SINGLE: {"COALESCE_MAX": "1"},
    Config.NAIVE: {"CONNECTION_STRATEGY": "per-request"},
    Config.DIRECT: {"VIA_PGBOUNCER": "false"},
}


@dataclass(frozen=True)
class RunKey:
    """Which run a result belongs to: configuration, endpoint, and the wrk connections
    when not --connections (GET /items/{id} as deployed at --also-connections)."""

    config: Config
    endpoint: Endpoint
    connections: int | None = None

    @property
    def label(self) -> str:
        """The report's configuration column."""
        if self.connections is None:
            return self.config.label
        return f"{self.config.label}, {self.connections} connections"


# wrk prints one JSON line at the end of every run (summary and latency in microseconds).
DONE = """
done = function(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d,'
    .. ' "p50_us": %d, "p99_us": %d, "mean_us": %f}\\n',
    summary.requests, summary.duration, non2xx,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""

SCRIPTS = {
    Endpoint.GET_ITEM: f"""
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
request = function()
  return wrk.format("GET", "/items/" .. math.random(1, {SEED_ITEMS}))
end
""",
    Endpoint.LIST_ITEMS: f"""
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
request = function()
  return wrk.format("GET", "/items?limit=20&after=" .. math.random(0, {SEED_ITEMS - 20}))
end
""",
    Endpoint.POST_VISIT: f"""
math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16))
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  local body = '{{"item_id": ' .. math.random(1, {SEED_ITEMS}) .. '}}'
  return wrk.format("POST", "/visits", headers, body)
end
""",
    Endpoint.HEALTHZ: """
request = function()
  return wrk.format("GET", "/healthz")
end
""",
}

# The database side of each endpoint, as pgbench runs it through the same PgBouncer.
# The service's own statements, with pgbench's :id for the parameter.
PICK_ID = f"\\set id random(1, {SEED_ITEMS})\n"
PGBENCH_SCRIPTS = {
    Endpoint.PGBENCH_SELECT: PICK_ID + " ".join(sql.GET_ITEM.split()).replace("%s", ":id") + ";\n",
    Endpoint.PGBENCH_VISIT: PICK_ID
    + "BEGIN;\nSET LOCAL statement_timeout = '5000ms';\n"
    + " ".join(sql.RECORD_VISIT.split()).replace("%s", ":id")
    + ";\nCOMMIT;\n",
}
CEILING_OF = {
    Endpoint.GET_ITEM: Endpoint.PGBENCH_SELECT,
    Endpoint.LIST_ITEMS: Endpoint.PGBENCH_SELECT,
    Endpoint.POST_VISIT: Endpoint.PGBENCH_VISIT,
}


@dataclass
class UnderTest:
    """One replica configuration's replica, and what it cost to start and to run."""

    config: Config
    env: dict[str, str]
    replica: Replica | None = None
    start_to_ready_s: float = 0.0
    rss_rest_mib: list[float] = field(default_factory=list)
    rss_load_mib: list[float] = field(default_factory=list)


@dataclass
class Result:
    key: RunKey
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    round: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per request, by process
    requests_per_statement: float | None = None  # coalesced endpoints, metrics on


# The coalesced statement (service/coalesce.py) behind each endpoint, by metrics label.
STATEMENT_OF = {Endpoint.GET_ITEM: "items by id", Endpoint.POST_VISIT: "visits"}

# Each round runs these in this order: the pairs a target compares are back to back.
PLAN = [
    RunKey(Config.POOLED, Endpoint.GET_ITEM),
    RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ),
    RunKey(Config.NOMETRICS, Endpoint.GET_ITEM),
    RunKey(Config.SINGLE, Endpoint.GET_ITEM),
    RunKey(Config.POOLED, Endpoint.POST_VISIT),
    RunKey(Config.SINGLE, Endpoint.POST_VISIT),
    RunKey(Config.NAIVE, Endpoint.GET_ITEM),
    RunKey(Config.DIRECT, Endpoint.GET_ITEM),
    RunKey(Config.POOLED, Endpoint.LIST_ITEMS),
    RunKey(Config.NOMETRICS, Endpoint.LIST_ITEMS),
    RunKey(Config.NAIVE, Endpoint.LIST_ITEMS),
    RunKey(Config.DIRECT, Endpoint.LIST_ITEMS),
    RunKey(Config.NOMETRICS, Endpoint.POST_VISIT),
    RunKey(Config.NAIVE, Endpoint.POST_VISIT),
    RunKey(Config.DIRECT, Endpoint.POST_VISIT),
]


class CPUMeter:
    """CPU seconds (user + system) spent by each group of processes during a run.

    Groups: a replica's workers (children of its gunicorn master), PgBouncer, every
    PostgreSQL process, and our own child processes (wrk or pgbench, from rusage).
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, bouncer_pid_file: Path, postgres_pid_file: Path) -> None:
        self.bouncer_pid_file = bouncer_pid_file
        self.postgres_pid_file = postgres_pid_file

    @classmethod
    def _cpu(cls, pid: int) -> float:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / cls.TICK

    def _read(self, master: int | None) -> dict[str, dict[int, float]]:
        groups: dict[str, list[int]] = {
            "workers": worker_pids(master) if master else [],
            "pgbouncer": [p for p in [procs.read_pid(self.bouncer_pid_file)] if p],
        }
        postmaster = procs.read_pid(self.postgres_pid_file)
        groups["postgres"] = [postmaster, *worker_pids(postmaster)] if postmaster else []
        return {name: {pid: self._cpu(pid) for pid in pids} for name, pids in groups.items()}

    @contextmanager
    def measuring(self, master: int | None) -> Iterator[dict[str, float]]:
        """CPU seconds by group spent while the block runs, filled in when it ends.

        `master`: the gunicorn master whose workers count (None: no replica). Our own
        children (wrk, pgbench, the driver ceiling) count as the load generator.
        """
        spent: dict[str, float] = {}
        before, children = self._read(master), self._children()
        yield spent
        after = self._read(master)
        for name, pids in after.items():
            # A process born in between counts from zero.
            earlier = before.get(name, {})
            spent[name] = sum(t - earlier.get(pid, 0.0) for pid, t in pids.items())
        spent["load generator"] = self._children() - children

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime


def say(line: str) -> None:
    print(line, flush=True)


def worker_pids(master: int) -> list[int]:
    try:
        text = Path(f"/proc/{master}/task/{master}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_rss(replica: Replica) -> list[float]:
    master = procs.read_pid(replica.pid_file)
    return [rss_mib(pid) for pid in worker_pids(master)] if master else []


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


def run_pgbench(
    bouncer: PgBouncer,
    password: str,
    endpoint: Endpoint,
    script: Path,
    duration: int,
    log_dir: Path,
) -> Result:
    """An endpoint's SQL run by pgbench through the same PgBouncer: what the database
    path can carry, with as many connections as the pooled replica holds."""
    for old in log_dir.glob("pgbench_log*"):
        old.unlink()
    clients = WORKERS * POOL
    result = subprocess.run(
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
            str(log_dir / "pgbench_log"),
            "-h",
            "127.0.0.1",
            "-p",
            str(bouncer.port),
            "-U",
            APP,
            APP,
        ],
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
        cwd=log_dir,
    )
    latencies = []
    for log in log_dir.glob("pgbench_log*"):
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]))  # microseconds
    tps = next(
        float(line.split("=")[1].split()[0])
        for line in result.stdout.splitlines()
        if line.startswith("tps =")
    )
    latencies.sort()
    return Result(
        key=RunKey(Config.DATABASE, endpoint),
        rps=tps,
        p50_ms=latencies[len(latencies) // 2] / 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] / 1000,
        non2xx=0,
        socket_errors=0,
    )


def start(config: UnderTest, root: Path, port: int, metrics_port: int, index: int) -> None:
    replica = Replica(root / "replicas", index, port, metrics_port, config.env)
    started = time.monotonic()
    replica.start()
    procs.wait_until(lambda: replica.ready() or not replica.running(), 30, interval=0.02)
    if not replica.ready():
        raise procs.StackError(f"{config.config.label} did not start:\n{procs.tail(replica.log)}")
    config.start_to_ready_s = time.monotonic() - started
    config.replica = replica


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS") or 3))
    parser.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION") or 8))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--also-connections",
        default="8,16,32",
        help="GET /items/{id} as deployed at these concurrencies too (comma-separated, or '')",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy a pooled worker")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 2:
        parser.error("--rounds must be >= 1 and --duration >= 2")
    try:
        also = [int(c) for c in args.also_connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--also-connections: not a list of numbers: {args.also_connections!r}")
    if any(c < 1 for c in also):
        parser.error("--also-connections: each must be >= 1")

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or REPORTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="pgscale-bench-"))
    scratch.chmod(0o755)
    # PostgreSQL, PgBouncer, then each configuration's replica port and metrics port.
    base = procs.free_port_block(2 + 2 * len(REPLICA_SETTINGS))
    password = secrets.token_urlsafe(16)
    pg = Postgres(scratch / "postgres", base, max_connections=100)
    bouncer = PgBouncer(
        scratch / "pgbouncer",
        base + 1,
        pg.port,
        APP,
        users={APP: password},
        admin_password=secrets.token_urlsafe(16),
        default_pool_size=20,
    )
    scripts: dict[Endpoint, Path] = {}
    for endpoint, body in SCRIPTS.items():
        scripts[endpoint] = scratch / f"{endpoint.name.lower()}.lua"
        scripts[endpoint].write_text(body + DONE)
    sql_scripts: dict[Endpoint, Path] = {}
    for endpoint, text in PGBENCH_SCRIPTS.items():
        sql_scripts[endpoint] = scratch / f"{endpoint.name.lower()}.sql"
        sql_scripts[endpoint].write_text(text)

    common = {
        "WORKERS": str(WORKERS),
        "POOL_MIN": str(POOL),
        "POOL_MAX": str(POOL),
        "REPLICAS": "1",
        "LOG_LEVEL": "warning",
    }
    configs = [UnderTest(config, dict(env)) for config, env in REPLICA_SETTINGS.items()]
    results: list[Result] = []
    paired: dict[Pair, float] = {}
    profile_text = ""
    try:
        pg.init()
        pg.start()
        pg.ensure_role(APP, password)
        pg.ensure_database(APP, APP)
        direct_url = f"postgresql://{APP}:{password}@127.0.0.1:{pg.port}/{APP}"
        subprocess.run(
            [sys.executable, "-m", "service.migrate", "--seed", str(SEED_ITEMS)],
            env={**os.environ, "DATABASE_URL": direct_url},
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        bouncer.start()
        for i, config in enumerate(configs, start=1):
            url = direct_url if config.config is Config.DIRECT else bouncer.app_conninfo(APP)
            config.env = {**common, "DATABASE_URL": url, **config.env}
            start(config, scratch, base + 1 + i, base + 1 + len(configs) + i, i)
            time.sleep(1)
            assert config.replica is not None
            config.rss_rest_mib = worker_rss(config.replica)
            say(
                f"{config.config.label:<26} ready in {config.start_to_ready_s:.2f}s,"
                f" workers at rest {', '.join(f'{r:.0f}' for r in config.rss_rest_mib)} MiB"
            )

        meter = CPUMeter(bouncer.pid_file, pg.pid_file)
        by_config = {c.config: c for c in configs}
        raw: dict[RunKey, list[Result]] = collections.defaultdict(list)
        for round_ in range(1, args.rounds + 1):
            # At lower concurrency too: the same rate with less queueing shows how much
            # of the latency at --connections is waiting, not work.
            main_runs = [(key, args.connections) for key in PLAN]
            extra = [
                (RunKey(Config.POOLED, Endpoint.GET_ITEM, c if c != args.connections else None), c)
                for c in also
            ]
            for key, connections in main_runs + extra:
                config = by_config[key.config.replica]
                assert config.replica is not None
                master = procs.read_pid(config.replica.pid_file)
                sampler = Poll(functools.partial(worker_rss, config.replica), 0.5)
                metrics_on = key.config is not Config.NOMETRICS
                statement = STATEMENT_OF.get(key.endpoint) if metrics_on else None
                shared = StatementCounter(config.replica, statement)
                with shared, meter.measuring(master) as cpu, sampler:
                    data = run_wrk(
                        config.replica.url, scripts[key.endpoint], connections, args.duration
                    )
                peak = max(sampler.readings, key=sum, default=[])
                config.rss_load_mib = max(config.rss_load_mib, peak, key=sum)
                result = Result(
                    key=key,
                    rps=data["requests"] / (data["duration_us"] / 1e6),
                    p50_ms=data["p50_us"] / 1000,
                    p99_ms=data["p99_us"] / 1000,
                    non2xx=data["non2xx"],
                    socket_errors=data["socket_errors"],
                    round=round_,
                    cpu_ms=per_request(cpu, data["requests"]),
                    requests_per_statement=shared.requests_per_statement,
                )
                raw[key].append(result)
                say(
                    f"round {round_}: {key.endpoint.value:<20} {key.label:<26}"
                    f" {result.rps:8.0f} req/s  p50 {result.p50_ms:6.1f} ms"
                    f"  p99 {result.p99_ms:6.1f} ms  non-2xx {result.non2xx}"
                    f"  CPU {sum(result.cpu_ms.values()):.2f} ms/req"
                )
            clients: list[Callable[[], Result]] = [
                functools.partial(
                    run_pgbench, bouncer, password, endpoint, path, args.duration, scratch
                )
                for endpoint, path in sql_scripts.items()
            ]
            clients.append(functools.partial(run_driver, bouncer.app_conninfo(APP), args.duration))
            for client in clients:
                with meter.measuring(None) as cpu:
                    run = client()
                run.round = round_
                run.cpu_ms = per_request(cpu, round(run.rps * args.duration))
                raw[run.key].append(run)
                say(
                    f"round {round_}: {run.key.endpoint.value:<20} {run.key.label:<26}"
                    f" {run.rps:8.0f} /s"
                )
        results = [median_of(runs) for runs in raw.values()]
        paired = paired_ratios(raw)
        if args.profile:
            pooled = configs[0].replica
            assert pooled is not None
            profile_text = profile(
                pooled, scripts[Endpoint.GET_ITEM], args.connections, args.duration, out
            )
    finally:
        for config in configs:
            if config.replica is not None:
                config.replica.stop()
        bouncer.stop()
        pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    report = build_report(args, configs, results, paired, profile_text)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    if args.out is None:
        shutil.copy(out / "bench.json", REPORTS / "latest.json")
        shutil.copy(out / "bench.md", REPORTS / "latest.md")
    say("")
    say(markdown(report))
    return 0


def statement_totals(metrics_url: str, statement: str) -> tuple[float, float]:
    """(statements run, requests they served) of one coalesced statement so far, from a
    replica's pgscale_db_requests_per_statement (`_count` and `_sum`, all workers)."""
    metrics = Scrape.get(metrics_url)
    family = "pgscale_db_requests_per_statement"
    return (
        metrics.total(family, "_count", statement=statement),
        metrics.total(family, "_sum", statement=statement),
    )


class StatementCounter:
    """Requests per statement of one coalesced statement over a run, from the replica's
    pgscale_db_requests_per_statement histogram (its `_sum` over its `_count`).

    Workers write their tallies once per POOL_STATS_INTERVAL, so it waits that long
    before the first reading and after the run; None when there is nothing to read.
    """

    def __init__(self, replica: Replica, statement: str | None) -> None:
        self.replica = replica
        self.statement = statement
        self.requests_per_statement: float | None = None
        self._before = (0.0, 0.0)

    def _read(self) -> tuple[float, float]:
        time.sleep(FLUSH_WAIT_S)
        assert self.statement is not None
        return statement_totals(self.replica.metrics_url, self.statement)

    def __enter__(self) -> StatementCounter:
        if self.statement is not None:
            self._before = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.statement is None or exc[0] is not None:
            return
        count, total = (a - b for a, b in zip(self._read(), self._before, strict=True))
        if count > 0:
            self.requests_per_statement = total / count


def median_of(runs: list[Result]) -> Result:
    groups = {name for r in runs for name in r.cpu_ms}
    return Result(
        key=runs[0].key,
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        non2xx=sum(r.non2xx for r in runs),
        socket_errors=sum(r.socket_errors for r in runs),
        cpu_ms={g: statistics.median(r.cpu_ms.get(g, 0.0) for r in runs) for g in sorted(groups)},
        requests_per_statement=_median_or_none([r.requests_per_statement for r in runs]),
    )


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def per_request(seconds: dict[str, float], requests: int) -> dict[str, float]:
    """CPU seconds by process group -> milliseconds per request."""
    return {name: 1000 * t / max(requests, 1) for name, t in seconds.items()}


class Pair(Enum):
    """A ratio a target compares; the value is its name in the report."""

    ITEM_VS_FRAMEWORK = "GET /items/{id} vs framework ceiling"
    VISIT_VS_ITEM = "POST /visits vs GET /items/{id}"
    ITEM_METRICS = "GET /items/{id} metrics on vs off"
    ITEM_COALESCING = "GET /items/{id} coalescing on vs off"
    VISIT_COALESCING = "POST /visits coalescing on vs off"


# Ratios a target compares, each taken between two runs of the same round.
PAIRS = {
    Pair.ITEM_VS_FRAMEWORK: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ),
    ),
    Pair.VISIT_VS_ITEM: (
        RunKey(Config.POOLED, Endpoint.POST_VISIT),
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
    ),
    Pair.ITEM_METRICS: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.NOMETRICS, Endpoint.GET_ITEM),
    ),
    Pair.ITEM_COALESCING: (
        RunKey(Config.POOLED, Endpoint.GET_ITEM),
        RunKey(Config.SINGLE, Endpoint.GET_ITEM),
    ),
    Pair.VISIT_COALESCING: (
        RunKey(Config.POOLED, Endpoint.POST_VISIT),
        RunKey(Config.SINGLE, Endpoint.POST_VISIT),
    ),
}


def paired_ratios(raw: dict[RunKey, list[Result]]) -> dict[Pair, float]:
    """The median over rounds of each PAIRS ratio (rounds missing either run are skipped)."""
    medians = {}
    for pair, (top, bottom) in PAIRS.items():
        tops = {r.round: r.rps for r in raw.get(top, [])}
        bottoms = {r.round: r.rps for r in raw.get(bottom, [])}
        ratios = [tops[n] / bottoms[n] for n in tops if bottoms.get(n)]
        if ratios:
            medians[pair] = statistics.median(ratios)
    return medians


def result_row(r: Result, by: dict[RunKey, Result]) -> dict[str, Any]:
    """One result as the report's JSON row, with its ratios to the baselines."""
    framework = by.get(RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ))
    naive = by.get(RunKey(Config.NAIVE, r.key.endpoint))
    database = by.get(RunKey(Config.DATABASE, CEILING_OF.get(r.key.endpoint, r.key.endpoint)))
    return {
        "config": r.key.label,
        "endpoint": r.key.endpoint.value,
        "rps": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "non2xx": r.non2xx,
        "socket_errors": r.socket_errors,
        "requests_per_statement": (
            None if r.requests_per_statement is None else round(r.requests_per_statement, 2)
        ),
        "cpu_ms_per_request": {k: round(v, 3) for k, v in r.cpu_ms.items()},
        "vs_framework_ceiling": round(r.rps / framework.rps, 3) if framework else None,
        "vs_database_ceiling": round(r.rps / database.rps, 3) if database else None,
        "vs_naive": round(r.rps / naive.rps, 2) if naive and naive.rps else None,
    }


def build_targets(
    by: dict[RunKey, Result], paired: dict[Pair, float], pooled: UnderTest
) -> list[dict[str, Any]]:
    """Each target: what was measured, the goal, whether it was met."""
    targets = []

    def target(name: str, value: float, goal: str, ok: bool) -> None:
        targets.append({"target": name, "measured": round(value, 3), "goal": goal, "met": ok})

    pooled_get = by[RunKey(Config.POOLED, Endpoint.GET_ITEM)]
    naive_get = by[RunKey(Config.NAIVE, Endpoint.GET_ITEM)]
    target(
        "GET /items/{id} vs naive",
        pooled_get.rps / naive_get.rps,
        ">= 1.6x",
        pooled_get.rps >= 1.6 * naive_get.rps,
    )
    ratio = paired.get(Pair.ITEM_VS_FRAMEWORK)
    if ratio is not None:
        target("GET /items/{id} vs framework ceiling (per round)", ratio, ">= 0.3x", ratio >= 0.3)
    target("GET /items/{id} non-2xx", pooled_get.non2xx, "0", pooled_get.non2xx == 0)
    target("GET /items/{id} p99 ms", pooled_get.p99_ms, "<= 40", pooled_get.p99_ms <= 40)
    ratio = paired.get(Pair.VISIT_VS_ITEM)
    if ratio is not None:
        target("POST /visits vs GET /items/{id} (per round)", ratio, ">= 0.5x", ratio >= 0.5)
    ratio = paired.get(Pair.ITEM_METRICS)
    if ratio is not None:
        cost = 1 - ratio
        target("metrics cost, GET /items/{id} req/s (per round)", cost, "<= 10%", cost <= 0.10)
    rss = max([*pooled.rss_rest_mib, *pooled.rss_load_mib], default=0.0)
    target("worker RSS MiB (max, rest and load)", rss, "<= 100", rss <= 100)
    target("start to ready s", pooled.start_to_ready_s, "<= 2", pooled.start_to_ready_s <= 2)
    return targets


def build_report(
    args: argparse.Namespace,
    configs: list[UnderTest],
    results: list[Result],
    paired: dict[Pair, float],
    profile_text: str,
) -> dict[str, Any]:
    by = {r.key: r for r in results}
    pooled = next(c for c in configs if c.config is Config.POOLED)
    return {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": {
            "machine_cores": os.cpu_count(),
            "workers": WORKERS,
            "pool_per_worker": POOL,
            "wrk_connections": args.connections,
            "rounds": args.rounds,
            "duration_s": args.duration,
            "pgbench_clients": WORKERS * POOL,
        },
        "results": [result_row(r, by) for r in results],
        "paired_ratios": {pair.value: round(v, 3) for pair, v in paired.items()},
        "latency_floor": latency_floor(
            args.connections,
            by[RunKey(Config.POOLED, Endpoint.GET_ITEM)],
            by.get(RunKey(Config.FRAMEWORK, Endpoint.HEALTHZ)),
            by.get(RunKey(Config.DRIVER, Endpoint.PSYCOPG_SELECT)),
        ),
        "processes": [
            {
                "config": c.config.label,
                "start_to_ready_s": round(c.start_to_ready_s, 2),
                "worker_rss_rest_mib": [round(x, 1) for x in c.rss_rest_mib],
                "worker_rss_load_mib": [round(x, 1) for x in c.rss_load_mib],
            }
            for c in configs
        ],
        "targets": build_targets(by, paired, pooled),
        "profile": profile_text,
    }


def latency_floor(
    connections: int,
    run: Result,
    framework: Result | None = None,
    driver: Result | None = None,
) -> dict[str, float]:
    """What CPU per request allows at this concurrency (Little's law, closed loop).

    wrk keeps `connections` requests in flight, so mean latency = connections / rate;
    the cores bound the rate at cores / CPU per request (every process counted). p99 is
    above the mean, so a p99 goal needs at least this CPU budget per request. With the
    framework ceiling (HTTP, FastAPI and wrk, no database) and the driver ceiling
    (psycopg, PgBouncer and PostgreSQL, no HTTP) it also gives the floor for a request
    whose service code cost nothing and that has a statement of its own; requests that
    share a statement (service/coalesce.py) split the database's part of it.
    """
    cores = os.cpu_count() or 1
    cpu = sum(run.cpu_ms.values())
    floor = {
        "cores": cores,
        "cpu_ms_per_request": round(cpu, 3),
        "max_rps": round(1000 * cores / cpu) if cpu else 0,
        "mean_latency_floor_ms": round(connections * cpu / cores, 1),
        "measured_mean_latency_ms": round(1000 * connections / run.rps, 1) if run.rps else 0,
        "cpu_budget_for_mean_40ms": round(40 * cores / connections, 3),
    }
    if run.requests_per_statement is not None:
        floor["requests_per_statement"] = round(run.requests_per_statement, 2)
    if framework and driver:
        bare = sum(framework.cpu_ms.values()) + sum(driver.cpu_ms.values())
        # One statement per request: coalescing (service/coalesce.py) goes below it.
        floor["bare_cpu_ms_per_request"] = round(bare, 3)
        floor["bare_max_rps"] = round(1000 * cores / bare) if bare else 0
        floor["bare_mean_latency_floor_ms"] = round(connections * bare / cores, 1)
        if framework.rps:
            # How far p99 sits above the mean when nothing but the framework runs: the
            # spread of the scheduling itself, which no service code can remove.
            spread = framework.p99_ms / (1000 * connections / framework.rps)
            floor["framework_p99_over_mean"] = round(spread, 2)
            floor["bare_p99_estimate_ms"] = round(spread * connections * bare / cores, 1)
    return floor


def markdown(report: dict[str, Any]) -> str:
    s = report["setup"]
    lines = [
        "# Benchmark",
        "",
        f"{s['machine_cores']} cores shared by everything; 1 replica of {s['workers']} workers,"
        f" pool {s['pool_per_worker']} per worker; wrk {s['wrk_connections']} connections;"
        f" medians of {s['rounds']} rounds of {s['duration_s']} s, configurations interleaved;"
        " the ratio targets are medians of ratios taken within each round."
        f" pgbench: {s['pgbench_clients']} clients, simple protocol, through the same PgBouncer.",
        "",
        "| endpoint | configuration | req/s | p50 ms | p99 ms | non-2xx |"
        " x framework ceiling | x database ceiling | x per-request | requests per statement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['endpoint']} | {r['config']} | {r['rps']:.0f} | {r['p50_ms']:.1f} |"
            f" {r['p99_ms']:.1f} | {r['non2xx']} | {_x(r['vs_framework_ceiling'])} |"
            f" {_x(r['vs_database_ceiling'])} | {_x(r['vs_naive'])} |"
            f" {_x(r['requests_per_statement'])} |"
        )
    lines += [
        "",
        "Requests per statement: how many requests one SQL statement served, from the"
        " replica's `pgscale_db_requests_per_statement` (blank: metrics off, or an endpoint"
        " that is never coalesced). Above 1, requests that queued for a connection"
        " together shared one (service/coalesce.py). pgbench, the database ceiling, runs"
        " one statement per transaction: requests that share statements can go past it.",
    ]
    groups = ["workers", "pgbouncer", "postgres", "load generator"]
    lines += [
        "",
        "CPU per request, ms (user + system, medians), by process: where the time goes"
        " on cores every process shares. For pgbench and the driver ceiling the load"
        " generator is the database client itself.",
        "",
        "| endpoint | configuration | " + " | ".join(groups) + " | total |",
        "|---|---|" + "---|" * (len(groups) + 1),
    ]
    for r in report["results"]:
        cpu = r["cpu_ms_per_request"]
        lines.append(
            f"| {r['endpoint']} | {r['config']} | "
            + " | ".join(f"{cpu.get(g, 0):.3f}" for g in groups)
            + f" | {sum(cpu.values()):.3f} |"
        )
    f = report["latency_floor"]
    lines += [
        "",
        f"Latency arithmetic for GET /items/{{id}} as deployed: {f['cpu_ms_per_request']} ms of"
        f" CPU per request over {f['cores']} cores caps the rate at {f['max_rps']} req/s; with"
        f" {s['wrk_connections']} requests always in flight the mean latency cannot be below"
        f" {f['mean_latency_floor_ms']} ms (measured: {f['measured_mean_latency_ms']} ms), and"
        f" p99 is above the mean. A mean of 40 ms needs at most"
        f" {f['cpu_budget_for_mean_40ms']} ms of CPU per request, all processes included.",
    ]
    if "bare_cpu_ms_per_request" in f:
        lines[-1] += (
            f" A request with a statement of its own costs at least the framework ceiling's"
            f" CPU plus the driver ceiling's, even if the service's code cost nothing:"
            f" {f['bare_cpu_ms_per_request']} ms, at most {f['bare_max_rps']} req/s, a mean"
            f" latency of at least {f['bare_mean_latency_floor_ms']} ms."
        )
    if "bare_p99_estimate_ms" in f:
        lines[-1] += (
            f" On the framework ceiling alone p99 is {f['framework_p99_over_mean']} times its"
            f" mean; at that spread such a request's p99 would be about"
            f" {f['bare_p99_estimate_ms']} ms."
        )
    if f.get("requests_per_statement"):
        lines[-1] += (
            f" As deployed, requests that queued together shared statements:"
            f" {f['requests_per_statement']} requests per statement, so the database path"
            f" (the driver's, PgBouncer's and PostgreSQL's share) is paid once per batch."
        )
    lines += ["", "| configuration | start to ready | worker RSS at rest | worker RSS under load |"]
    lines += ["|---|---|---|---|"]
    for p in report["processes"]:
        lines.append(
            f"| {p['config']} | {p['start_to_ready_s']} s |"
            f" {', '.join(f'{x:.0f}' for x in p['worker_rss_rest_mib'])} MiB |"
            f" {', '.join(f'{x:.0f}' for x in p['worker_rss_load_mib'])} MiB |"
        )
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'no'} |"
        )
    if report["profile"]:
        lines += ["", "## Profile", "", "```", report["profile"], "```"]
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
