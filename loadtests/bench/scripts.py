"""The load scripts: wrk's Lua per endpoint, and the SQL pgbench runs through PgBouncer."""

from __future__ import annotations

from pathlib import Path

from loadtests.bench.plan import SEED_ITEMS, Endpoint
from service import sql

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


def write_scripts(directory: Path) -> tuple[dict[Endpoint, Path], dict[Endpoint, Path]]:
    """Every wrk script and pgbench script as a file in `directory`: (Lua, SQL) by endpoint."""
    lua: dict[Endpoint, Path] = {}
    for endpoint, body in SCRIPTS.items():
        lua[endpoint] = directory / f"{endpoint.name.lower()}.lua"
        lua[endpoint].write_text(body + DONE)
    pgbench: dict[Endpoint, Path] = {}
    for endpoint, text in PGBENCH_SCRIPTS.items():
        pgbench[endpoint] = directory / f"{endpoint.name.lower()}.sql"
        pgbench[endpoint].write_text(text)
    return lua, pgbench
