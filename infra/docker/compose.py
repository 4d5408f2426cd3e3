"""compose.yaml's numbers against the connection budget: `python -m infra.docker.compose`.

Reads compose.yaml as `docker compose` would (YAML anchors and merge keys, then `${VAR}`
interpolation from the environment and an env file), takes the shape of the deployment
from it (API_MAX_REPLICAS replicas of WORKERS x POOL_MAX, PGBOUNCER_INSTANCES PgBouncers,
their limits, PostgreSQL's) and checks it with service/budget.py, together with what must agree
across services: the numbers PgBouncer and PostgreSQL run with are the ones every
replica's start-up guard checks, haproxy has a slot for every replica the budget
allows, the PgBouncer config mounted is in transaction mode, and no database hop is
left at sslmode disable, allow or prefer. Exit code 0 when all
holds, 1 when not. tests/integration/test_deploy.py runs the same checks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from service.budget import SHARED_LIMITS, Topology, check, environment_topology
from service.budget import render as render_budget
from service.rules import (
    pool_mode_problems,
    postgres_sslmode,
    service_sslmode,
    sslmode_in,
    timeout_problems,
    tls_problems,
)
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"

# `$$`, `$NAME`, `${NAME}` and `${NAME<op>word}` with op one of :- - :? ? :+ +.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<word>[^}]*))?\})"
)


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset: compose refuses to start too."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file; comments and blank lines skipped."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with compose's variable syntax replaced from `env`."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["plain"] or match["braced"]
        op, word = match["op"], match["word"] or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return interpolate(word, env) if unset_or_empty else str(value)
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {word or 'required variable is not set'}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset_or_empty else interpolate(word, env)
        return value or ""

    return _VARIABLE.sub(replace, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose model as `docker compose config` would see it (values as strings)."""
    model = yaml.safe_load(path.read_text())
    result: dict[str, Any] = _interpolate_tree(model, env)
    return result


def environment(model: Mapping[str, Any], service: str) -> dict[str, str]:
    """A service's environment as strings (compose allows a mapping or a list)."""
    env = model["services"][service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def topology(model: Mapping[str, Any]) -> Topology:
    """The deployment's shape: the most replicas it may run, as every replica sees it."""
    api = environment(model, "api")
    bouncers = int(model["services"]["pgbouncer"].get("deploy", {}).get("replicas", 1))
    return environment_topology(api, replicas=int(api["REPLICAS"]), instances=bouncers)


def _host_path(model: Mapping[str, Any], service: str, target: str) -> Path | None:
    """The host file bind-mounted at `target` in `service`, if any."""
    for volume in model["services"][service].get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == target and source.startswith((".", "/")):
            return (COMPOSE_FILE.parent / source).resolve()
    return None


def tls_hops(model: Mapping[str, Any]) -> dict[str, str | None]:
    """Every database hop of the compose model, with the sslmode it runs at."""
    default = Settings.model_fields["db_sslmode"].default
    bouncer = environment(model, "pgbouncer")
    hops: dict[str, str | None] = {
        "api -> pgbouncer": service_sslmode(environment(model, "api"), default),
        "migrate -> postgres": service_sslmode(environment(model, "migrate"), default),
        "pgbouncer clients (PGBOUNCER_CLIENT_TLS_SSLMODE)": bouncer.get(
            "PGBOUNCER_CLIENT_TLS_SSLMODE"
        ),
        "pgbouncer -> postgres (PGBOUNCER_SERVER_TLS_SSLMODE)": bouncer.get(
            "PGBOUNCER_SERVER_TLS_SSLMODE"
        ),
        "postgres (POSTGRES_SSL, POSTGRES_HBA_HOST)": postgres_sslmode(
            environment(model, "postgres")
        ),
        "pgbouncer-exporter -> pgbouncer": environment(model, "pgbouncer-exporter").get(
            "PGBOUNCER_SSLMODE"
        ),
        "postgres-exporter -> postgres": sslmode_in(
            environment(model, "postgres-exporter").get("DATA_SOURCE_URI", "")
        ),
    }
    sampler = environment(model, "locust-master") if "locust-master" in model["services"] else {}
    for name in ("SAMPLER_PGBOUNCER_URL", "SAMPLER_POSTGRES_URL"):
        if name in sampler:
            hops[f"locust-master {name}"] = sslmode_in(sampler[name])
    return hops


def problems(model: Mapping[str, Any]) -> list[str]:
    """Everything in the compose model that breaks the budget or disagrees with itself."""
    found: list[str] = []
    api = environment(model, "api")
    budget = check(topology(model))
    found += [f"API_MAX_REPLICAS={api['REPLICAS']}: {problem}" for problem in budget.problems]
    started = int(model["services"]["api"].get("deploy", {}).get("replicas", 1))
    if started > int(api["REPLICAS"]):
        found.append(
            f"API_REPLICAS={started} is above API_MAX_REPLICAS={api['REPLICAS']},"
            " the count the budget and the replicas' start-up guard check"
        )
    bouncers = int(model["services"]["pgbouncer"].get("deploy", {}).get("replicas", 1))
    if int(api.get("PGBOUNCER_INSTANCES", "1")) != bouncers:
        found.append(
            f"pgbouncer runs {bouncers} instance(s) but the replicas' guard counts"
            f" PGBOUNCER_INSTANCES={api.get('PGBOUNCER_INSTANCES', '1')}"
        )
    if api.get("VIA_PGBOUNCER", "true").lower() != "true":
        found.append("the replicas must reach PostgreSQL through PgBouncer (VIA_PGBOUNCER)")
    for service in ("pgbouncer", "postgres"):
        theirs = environment(model, service)
        for name in SHARED_LIMITS:
            if name in theirs and theirs[name] != api.get(name):
                found.append(
                    f"{service} runs with {name}={theirs[name]} but the replicas' guard"
                    f" checks {api.get(name)}"
                )
    found += timeout_problems(
        query_wait_timeout=float(api["PGBOUNCER_QUERY_WAIT_TIMEOUT"]),
        db_deadline=float(api["DB_DEADLINE"]),
    )
    servers = environment(model, "lb").get("HAPROXY_SERVERS", "")
    slots = re.search(r"server-template\s+\S+\s+1-(\d+)\s", servers)
    if not slots or slots[1] != api["REPLICAS"]:
        found.append(
            f"haproxy's server-template must have API_MAX_REPLICAS={api['REPLICAS']} slots"
            f" (got {servers.strip()!r})"
        )
    ini = _host_path(model, "pgbouncer", "/pgscale/infra/pgbouncer/pgbouncer.ini")
    if ini is None or not ini.is_file():
        found.append("pgbouncer must mount infra/pgbouncer/pgbouncer.ini")
    else:
        found += pool_mode_problems(ini.read_text(), str(ini))
    found += tls_problems(tls_hops(model))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--env-file",
        type=Path,
        default=REPO / ".env",
        help="compose's env file (default .env; .env.example when .env is missing)",
    )
    args = parser.parse_args(argv)
    env_file = args.env_file if args.env_file.exists() else ENV_EXAMPLE
    # As compose does: the shell's variables win over the file's. An empty one (make
    # exports WORKERS and the rest empty when unset) counts as unset, as `${VAR:-x}` does.
    env = {**read_env_file(env_file), **{k: v for k, v in os.environ.items() if v}}
    # Secrets do not change the arithmetic: stand-ins let an unfilled file be checked.
    env = {key: value or "unset-secret" for key, value in env.items()}
    try:
        model = load(env)
    except MissingVariable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"compose.yaml with {env_file.name}:\n")
    print(render_budget(check(topology(model))))
    found = problems(model)
    for problem in found:
        print(f"problem: {problem}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
