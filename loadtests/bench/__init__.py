"""The benchmark: requests/s and latency through PgBouncer, side by side with baselines.

One PostgreSQL and one PgBouncer, and one replica (2 workers, pool 4 per worker) per
configuration, all started before the first run so every configuration is measured
in the same conditions. Then rounds: in each, wrk (fixed connections, Lua for random
ids and writes) runs every endpoint against every configuration in turn; the report
takes medians over the rounds.

- `pooled`: the service as deployed (through PgBouncer, metrics on);
- `pooled, metrics off`: the same with METRICS_ENABLED=false (the cost of metrics);
- `pooled, Server-Timing off`: the same with SERVER_TIMING=false (the cost of timing
  each request's parts and sending them; GET /items/{id} only);
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
metrics on against off, Server-Timing on against off) are taken within each round,
from runs made back to back, and the report gives the median of those per-round ratios.

    .venv/bin/python -m loadtests.bench [--rounds 4] [--duration 8] [--connections 64]

`make bench` runs it and writes reports/bench/latest.json and latest.md.
"""

# The modules, each importing only those above it (the docstring above is the command's
# --help, so the map lives here):
#   plan.py      the configurations, endpoints, RunKey, the plan of a round, Options
#   scripts.py   wrk's Lua and pgbench's SQL
#   probes.py    CPU by process group, worker RSS, requests per statement
#   results.py   a run's Result, a configuration's Footprint, medians, per-round ratios
#   runners.py   wrk, pgbench, psycopg alone, py-spy
#   rig.py       PostgreSQL, PgBouncer and a replica per configuration, started and stopped
#   rounds.py    the rounds of runs
#   report.py    bench.json and bench.md
#   __main__.py  the command line

# tests/integration/test_coalesce_live.py reads a replica's statements from here.
from loadtests.bench.probes import statement_totals as statement_totals
