"""The workers x replicas sweep: how connections grow, with and without PgBouncer.

For every cell of WORKERS_GRID x REPLICAS_GRID x INSTANCES_GRID (PgBouncer instances,
default "1 2"; fixed POOL_MAX) it reshapes a private
local stack and runs Locust headless with loadtests/saturate.py (browse.py's reads, with
no pause between them) and four users per pooled connection, so that every pool is full
with more requests waiting, however fast the machine; with coalescing off
(COALESCE_MAX=1), so that every waiting request needs a connection of its own: the peak
the budget is for. It samples PgBouncer and PostgreSQL once a second (the sampler
plugin) and compares what it measured with service/budget.py's prediction. Then the
same grid with the replicas pointed straight at PostgreSQL and a deliberately small
max_connections: the cells the budget says cannot fit must fail, the others must not.

    .venv/bin/python -m loadtests.sweep [--workers 1 2 4] [--replicas 1 2 3] [--instances 1 2]
        [--duration 20]

`make sweep WORKERS_GRID="1 2" REPLICAS_GRID="1" DURATION=10` runs it. The report goes to
reports/sweep/<timestamp>/ (report.md, cells.csv, summary.json, PNG charts), and
reports/sweep/latest points at the newest.
"""

# The modules, each importing only those above it (the docstring above is the command's
# --help, so the map lives here):
#   plan.py     the modes, the grid, each cell's key (CellKey)
#   cells.py    a cell's numbers, and the verdict against service/budget.py
#   probes.py   what a cell reads: the pools' metrics, the sampler's and Locust's CSVs
#   runners.py  a private stack reshaped per cell, Locust against it, the whole sweep
#   charts.py   the PNG charts; report.py: cells.csv, summary.json, report.md
#   __main__.py the command line
