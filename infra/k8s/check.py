"""k8s overlays against the connection budget: `python -m infra.k8s.check [OVERLAY...]`.

Renders each overlay with `kubectl kustomize` (offline) and reads the deployment's shape
from what would really be applied: the API HorizontalPodAutoscaler's maxReplicas plus the
rollout's maxSurge, WORKERS and POOL_MAX from the API's environment, the PgBouncer
Deployment's replicas and the limits its config is filled with, PostgreSQL's limits.
Then service/budget.py checks it at the two extremes a PgBouncer rollout (or a node
drain the PodDisruptionBudget allows) goes through:

- clients: with maxUnavailable instances out, the rest must hold every client;
- servers: with every instance up and one more draining (maxSurge 0 and
  minReadySeconds >= terminationGracePeriodSeconds let only one drain at a time), their
  pools together must fit PostgreSQL.

It also checks what must agree: the numbers PgBouncer and PostgreSQL run with are the
ones the API's start-up guard checks, PgBouncer runs infra/pgbouncer/pgbouncer.ini in
transaction mode on a version whose SIGTERM drains (>= 1.23), and the API's pooled
connections retire (POOL_MAX_LIFETIME) within PgBouncer's drain window, and no
database hop is left at sslmode disable, allow or prefer. An overlay
that states its target (capacity-target.env: TARGET_RPS, WRITE_RATIO, P99_MS,
POSTGRES_CORES, MAX_CONNECTIONS) must also agree with the capacity planner's shape for
it (service/planner.py): the HPA's maxReplicas, the PgBouncer replicas, the workers and
pool sizes. Exit code 0 when every overlay passes, 1 when one does not, 2 when one
cannot be rendered.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from service.budget import (
    SHARED_LIMITS,
    AppShape,
    BouncerLimits,
    Budget,
    PostgresLimits,
    Topology,
    check,
    environment_topology,
    max_safe_replicas,
)
from service.budget import render as render_budget
from service.calibration import load as load_calibration
from service.planner import NoShape, Target, plan
from service.rules import (
    pool_mode_problems,
    postgres_sslmode,
    service_sslmode,
    sslmode_in,
    timeout_problems,
    tls_problems,
)
from service.settings import Settings

Manifest = dict[str, Any]

INFRA = Path(__file__).resolve().parent.parent
REPO = INFRA.parent
OVERLAYS = REPO / "k8s" / "overlays"
PGBOUNCER_INI = INFRA / "pgbouncer" / "pgbouncer.ini"
CAPACITY_TARGET = "capacity-target.env"  # the target an overlay is sized for
# SIGTERM became the draining shutdown (SHUTDOWN WAIT_FOR_CLIENTS) in PgBouncer 1.23.
DRAINING_SIGTERM_SINCE = (1, 23)


class KubectlMissing(RuntimeError):
    """No kubectl on PATH: overlays cannot be rendered here."""


def overlays() -> list[Path]:
    """Every overlay under k8s/overlays."""
    return sorted(path.parent for path in OVERLAYS.glob("*/kustomization.yaml"))


def render(overlay: Path) -> list[Manifest]:
    """The overlay as `kubectl kustomize` renders it, one dict per object."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise KubectlMissing("kubectl is not on PATH: it renders the kustomize overlays")
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    """The one object of `kind` named `name` (a LookupError names what is missing)."""
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise LookupError(f"no {kind} named {name!r}")


def configmap(docs: list[Manifest], name: str) -> dict[str, str]:
    """A ConfigMap's data (names as rendered, hash suffix included)."""
    data: dict[str, str] = find(docs, "ConfigMap", name).get("data", {})
    return data


def container(workload: Manifest, name: str) -> Manifest:
    """A container of a Deployment, StatefulSet or Job, by name."""
    spec = workload["spec"]["template"]["spec"]
    for item in spec.get("containers", []) + spec.get("initContainers", []):
        if item["name"] == name:
            found: Manifest = item
            return found
    raise LookupError(f"{workload['kind']} {workload['metadata']['name']} has no container {name}")


def container_env(docs: list[Manifest], workload: Manifest, name: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it (env wins over envFrom).

    Values from Secrets and the downward API stand as `<secret NAME/KEY>` / `<field>`.
    """
    item = container(workload, name)
    env: dict[str, str] = {}
    for source in item.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmap(docs, source["configMapRef"]["name"]))
    for var in item.get("env", []):
        ref = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            env[var["name"]] = configmap(docs, key["name"])[key["key"]]
        elif "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            env[var["name"]] = f"<secret {key['name']}/{key['key']}>"
        else:
            env[var["name"]] = "<field>"
    return env


def _count(value: int | str | None, total: int, round_up: bool) -> int:
    """A rolling-update bound (an int or a percentage of `total`) as a pod count."""
    if value is None:
        value = "25%"
    if isinstance(value, int):
        return value
    share = total * int(value.rstrip("%")) / 100
    return math.ceil(share) if round_up else math.floor(share)


def _rolling(workload: Manifest, total: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) of a Deployment as pod counts."""
    rolling = workload["spec"].get("strategy", {}).get("rollingUpdate", {})
    return (
        _count(rolling.get("maxSurge"), total, round_up=True),
        _count(rolling.get("maxUnavailable"), total, round_up=False),
    )


def prestop_pause(item: Manifest) -> int:
    """Seconds a container's preStop hook pauses (`sleep N`), 0 without one."""
    hook = item.get("lifecycle", {}).get("preStop", {})
    command = hook.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return int(command[1])
    return int(hook.get("sleep", {}).get("seconds", 0))


@dataclass(frozen=True)
class Shape:
    """What the budget depends on, as an overlay renders it."""

    api_max_replicas: int  # the HorizontalPodAutoscaler's maxReplicas
    api_surge: int  # extra replicas during an API rollout
    workers: int
    pool_min: int
    pool_max: int
    bouncers: int  # PgBouncer Deployment replicas
    bouncers_out: int  # instances a rollout or disruption may take away (maxUnavailable)
    bouncers_draining: int  # instances that may drain beside the others at once
    bouncer: BouncerLimits
    postgres: PostgresLimits

    @property
    def api_peak(self) -> int:
        return self.api_max_replicas + self.api_surge

    def topology(self, instances: int) -> Topology:
        limits = replace(self.bouncer, instances=max(1, instances))
        app = AppShape(self.api_peak, self.workers, self.pool_min, self.pool_max)
        return Topology(app=app, postgres=self.postgres, bouncer=limits)

    def serving(self) -> Topology:
        """Fewest instances serving: a rollout or disruption has taken some away."""
        return self.topology(self.bouncers - self.bouncers_out)

    def most(self) -> Topology:
        """Most instances holding server connections: all up, plus the draining ones."""
        return self.topology(self.bouncers + self.bouncers_draining)


def shape(docs: list[Manifest]) -> Shape:
    """The overlay's shape; what the API's start-up guard sees is what counts."""
    api = find(docs, "Deployment", "api")
    hpa = find(docs, "HorizontalPodAutoscaler", "api")
    bouncer = find(docs, "Deployment", "pgbouncer")
    env = container_env(docs, api, "api")
    max_replicas = int(hpa["spec"]["maxReplicas"])
    api_surge, _ = _rolling(api, max_replicas)
    bouncers = int(bouncer["spec"].get("replicas", 1))
    bouncer_surge, bouncer_out = _rolling(bouncer, bouncers)
    pod = bouncer["spec"]["template"]["spec"]
    grace = int(pod.get("terminationGracePeriodSeconds", 30))
    one_at_a_time = int(bouncer["spec"].get("minReadySeconds", 0)) >= grace
    seen = environment_topology(env, replicas=max_replicas)
    assert seen.bouncer is not None  # environment_topology always has one
    return Shape(
        api_max_replicas=max_replicas,
        api_surge=api_surge,
        workers=seen.app.workers,
        pool_min=seen.app.pool_min,
        pool_max=seen.app.pool_max,
        bouncers=bouncers,
        bouncers_out=bouncer_out,
        bouncers_draining=bouncer_surge + (1 if one_at_a_time else bouncers),
        bouncer=seen.bouncer,
        postgres=seen.postgres,
    )


def budgets(docs: list[Manifest]) -> tuple[Budget, Budget]:
    """The budget with the fewest PgBouncers serving, and with the most holding servers."""
    s = shape(docs)
    return check(s.serving()), check(s.most())


def budget_problems(docs: list[Manifest]) -> list[str]:
    """The budget at both rollout extremes, and the numbers that must agree."""
    s = shape(docs)
    found: list[str] = []
    serving = s.bouncers - s.bouncers_out
    if serving < 1:
        found.append(
            f"PgBouncer: {s.bouncers} replicas with maxUnavailable {s.bouncers_out} leave none"
            " serving during a rollout"
        )
    allowed = max_safe_replicas(s.serving())
    if s.api_peak > allowed:
        found.append(
            f"HorizontalPodAutoscaler api: maxReplicas {s.api_max_replicas} + maxSurge"
            f" {s.api_surge} = {s.api_peak} replicas may run, the budget holds {allowed} with"
            f" {serving} of {s.bouncers} PgBouncers serving"
        )
    low, high = budgets(docs)
    found += [f"with {serving} PgBouncer(s) serving: {problem}" for problem in low.problems]
    found += [
        f"with {s.bouncers + s.bouncers_draining} PgBouncer(s) holding server connections"
        f" (rollout): {problem}"
        for problem in high.problems
    ]
    api = container_env(docs, find(docs, "Deployment", "api"), "api")
    if api.get("VIA_PGBOUNCER", "true").lower() != "true":
        found.append("the API must reach PostgreSQL through PgBouncer (VIA_PGBOUNCER)")
    if api.get("REPLICAS") != str(s.api_max_replicas):
        found.append(
            f"REPLICAS={api.get('REPLICAS')} (the API's start-up guard) differs from the"
            f" HorizontalPodAutoscaler's maxReplicas {s.api_max_replicas}"
        )
    if api.get("PGBOUNCER_INSTANCES") != str(s.bouncers):
        found.append(
            f"PGBOUNCER_INSTANCES={api.get('PGBOUNCER_INSTANCES')} (the API's start-up guard)"
            f" differs from the PgBouncer Deployment's replicas {s.bouncers}"
        )
    others = [("Deployment", "pgbouncer", "pgbouncer"), ("StatefulSet", "postgres", "postgres")]
    for kind, name, item in others:
        try:
            theirs = container_env(docs, find(docs, kind, name), item)
        except LookupError:
            continue
        for var in SHARED_LIMITS:
            if var in theirs and theirs[var] != api.get(var):
                found.append(
                    f"{kind} {name} runs with {var}={theirs[var]} but the API's guard checks"
                    f" {api.get(var)}"
                )
    return found


def _version(image: str) -> tuple[int, int] | None:
    found = re.search(r":v?(\d+)\.(\d+)", image)
    return (int(found[1]), int(found[2])) if found else None


def pgbouncer_problems(docs: list[Manifest]) -> list[str]:
    """PgBouncer's config, version, placement and drain, against what the issue asks."""
    found: list[str] = []
    deployment = find(docs, "Deployment", "pgbouncer")
    pod = deployment["spec"]["template"]["spec"]
    item = container(deployment, "pgbouncer")
    if int(deployment["spec"].get("replicas", 1)) < 2:
        found.append("PgBouncer Deployment: fewer than 2 replicas")
    if deployment["spec"].get("strategy", {}).get("type", "RollingUpdate") != "RollingUpdate":
        found.append("PgBouncer Deployment: not a rolling update")
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    if not anti:
        found.append("PgBouncer Deployment: no pod anti-affinity")
    version = _version(item["image"])
    if version is None or version < DRAINING_SIGTERM_SINCE:
        found.append(
            f"PgBouncer image {item['image']}: before 1.23 SIGTERM stops at once instead of"
            " draining (SHUTDOWN WAIT_FOR_CLIENTS)"
        )
    # The config: infra's file, in transaction mode, every placeholder filled.
    mounts = {mount["name"]: mount["mountPath"] for mount in item.get("volumeMounts", [])}
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    command = item.get("command", []) + item.get("args", [])
    sources = {
        mounts[name]: volumes[name]["configMap"]["name"]
        for name in mounts
        if "configMap" in volumes.get(name, {})
    }
    env = container_env(docs, deployment, "pgbouncer")
    for path in (p for p in command if p.endswith((".ini", ".txt")) and p.startswith("/etc/")):
        directory, _, key = path.rpartition("/")
        if directory not in sources:
            found.append(f"PgBouncer reads {path}, which no ConfigMap provides")
            continue
        text = configmap(docs, sources[directory]).get(key)
        if text is None:
            found.append(f"ConfigMap {sources[directory]} has no {key}")
            continue
        if key == "pgbouncer.ini":
            if text != PGBOUNCER_INI.read_text():
                found.append(f"ConfigMap {sources[directory]}: {key} differs from infra's")
            found += pool_mode_problems(text, f"ConfigMap {sources[directory]} {key}")
        missing = sorted(
            {
                m.group("braced")
                for m in string.Template.pattern.finditer(text)
                if m.group("braced") and m.group("braced") not in env
            }
        )
        if missing:
            found.append(f"{key}: no value in PgBouncer's environment for {', '.join(missing)}")
    if not any(p.endswith("pgbouncer.ini") and p.startswith("/etc/") for p in command):
        found.append("PgBouncer's command does not render a pgbouncer.ini from a ConfigMap")
    # The drain: pause while the Service forgets the pod, then SIGTERM; clients retire
    # (POOL_MAX_LIFETIME) and finish their last call (DB_DEADLINE) before the kill.
    grace = int(pod.get("terminationGracePeriodSeconds", 30))
    pause = prestop_pause(item)
    if pause <= 0:
        found.append("PgBouncer: no preStop pause before SIGTERM")
    api = container_env(docs, find(docs, "Deployment", "api"), "api")
    lifetime = float(api.get("POOL_MAX_LIFETIME", 1800))
    deadline = float(api.get("DB_DEADLINE", 8))
    if lifetime + deadline >= grace - pause:
        found.append(
            f"POOL_MAX_LIFETIME {lifetime:g}s + DB_DEADLINE {deadline:g}s do not fit PgBouncer's"
            f" drain window ({grace}s grace - {pause}s preStop): clients would be cut off"
        )
    if int(deployment["spec"].get("minReadySeconds", 0)) < grace:
        found.append(
            "PgBouncer: minReadySeconds below terminationGracePeriodSeconds lets several"
            " instances drain at once"
        )
    return found


def timeout_order_problems(docs: list[Manifest]) -> list[str]:
    """The API's deadline against PgBouncer's query_wait_timeout (service/rules.py)."""
    env = container_env(docs, find(docs, "Deployment", "api"), "api")
    return timeout_problems(
        query_wait_timeout=float(env["PGBOUNCER_QUERY_WAIT_TIMEOUT"]),
        db_deadline=float(env.get("DB_DEADLINE") or Settings().db_deadline),
        via_pgbouncer=env.get("VIA_PGBOUNCER", "true").lower() == "true",
    )


def tls_hops(docs: list[Manifest]) -> dict[str, str | None]:
    """Every database hop of a rendered overlay, with the sslmode it runs at."""
    default = Settings.model_fields["db_sslmode"].default
    api = find(docs, "Deployment", "api")
    bouncer = find(docs, "Deployment", "pgbouncer")
    pgbouncer = container_env(docs, bouncer, "pgbouncer")
    exporter = container_env(docs, find(docs, "Deployment", "postgres-exporter"), "exporter")
    hops: dict[str, str | None] = {
        "api -> pgbouncer": service_sslmode(container_env(docs, api, "api"), default),
        "wait-for-schema -> pgbouncer": service_sslmode(
            container_env(docs, api, "wait-for-schema"), default
        ),
        "migrate -> postgres": service_sslmode(
            container_env(docs, find(docs, "Job", "migrate"), "migrate"), default
        ),
        "pgbouncer clients (PGBOUNCER_CLIENT_TLS_SSLMODE)": pgbouncer.get(
            "PGBOUNCER_CLIENT_TLS_SSLMODE"
        ),
        "pgbouncer -> postgres (PGBOUNCER_SERVER_TLS_SSLMODE)": pgbouncer.get(
            "PGBOUNCER_SERVER_TLS_SSLMODE"
        ),
        "pgbouncer exporter -> pgbouncer": container_env(docs, bouncer, "exporter").get(
            "PGBOUNCER_SSLMODE"
        ),
        "postgres-exporter -> postgres": sslmode_in(exporter.get("DATA_SOURCE_URI", "")),
    }
    if any(d["kind"] == "StatefulSet" and d["metadata"]["name"] == "postgres" for d in docs):
        env = container_env(docs, find(docs, "StatefulSet", "postgres"), "postgres")
        hops["postgres (POSTGRES_SSL, POSTGRES_HBA_HOST)"] = postgres_sslmode(env)
    return hops


def overlay_problems(docs: list[Manifest]) -> list[str]:
    """Every problem the checks above find in one rendered overlay."""
    return (
        budget_problems(docs)
        + pgbouncer_problems(docs)
        + timeout_order_problems(docs)
        + tls_problems(tls_hops(docs))
    )


def capacity_target(overlay: Path) -> Target | None:
    """The target an overlay states (its capacity-target.env), or None."""
    path = overlay / CAPACITY_TARGET
    if not path.exists():
        return None
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return Target(
        rps=float(values["TARGET_RPS"]),
        write_ratio=float(values.get("WRITE_RATIO", Target.write_ratio)),
        p99_ms=float(values.get("P99_MS", Target.p99_ms)),
        postgres_cores=int(values.get("POSTGRES_CORES", Target.postgres_cores)),
        max_connections=int(values["MAX_CONNECTIONS"]) if "MAX_CONNECTIONS" in values else None,
    )


def capacity_problems(docs: list[Manifest], target: Target) -> list[str]:
    """Where the overlay's shape disagrees with the planner's for its target."""
    try:
        planned = plan(target, load_calibration()).shape
    except NoShape as exc:
        return [f"the planner finds no shape for the overlay's target: {exc}"]
    hpa = find(docs, "HorizontalPodAutoscaler", "api")["spec"]
    env = container_env(docs, find(docs, "Deployment", "api"), "api")
    bouncers = int(find(docs, "Deployment", "pgbouncer")["spec"].get("replicas", 1))
    exact = [
        ("HorizontalPodAutoscaler maxReplicas", int(hpa["maxReplicas"]), planned.replicas),
        ("PgBouncer Deployment replicas", bouncers, planned.instances),
        ("WORKERS", int(env["WORKERS"]), planned.workers),
        ("POOL_MIN", int(env["POOL_MIN"]), planned.pool_min),
        ("POOL_MAX", int(env["POOL_MAX"]), planned.pool_max),
        (
            "PGBOUNCER_DEFAULT_POOL_SIZE",
            int(env["PGBOUNCER_DEFAULT_POOL_SIZE"]),
            planned.default_pool_size,
        ),
        (
            "PGBOUNCER_RESERVE_POOL_SIZE",
            int(env["PGBOUNCER_RESERVE_POOL_SIZE"]),
            planned.reserve_pool_size,
        ),
        (
            "PGBOUNCER_MAX_DB_CONNECTIONS",
            int(env["PGBOUNCER_MAX_DB_CONNECTIONS"]),
            planned.max_db_connections,
        ),
    ]
    at_least = [
        ("HorizontalPodAutoscaler minReplicas", int(hpa.get("minReplicas", 1)), planned.hpa_min),
        (
            "PGBOUNCER_MAX_CLIENT_CONN",
            int(env["PGBOUNCER_MAX_CLIENT_CONN"]),
            planned.max_client_conn,
        ),
        ("POSTGRES_MAX_CONNECTIONS", int(env["POSTGRES_MAX_CONNECTIONS"]), planned.max_connections),
    ]
    wanted = f"the planner's for {target.rps:g} req/s"
    found = [
        f"{name} is {value}, {wanted} is {plan_value}"
        for name, value, plan_value in exact
        if value != plan_value
    ]
    found += [
        f"{name} is {value}, below {wanted} ({plan_value})"
        for name, value, plan_value in at_least
        if value < plan_value
    ]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("overlay", nargs="*", type=Path, help="default: every k8s/overlays/*")
    args = parser.parse_args(argv)
    failed = False
    for overlay in args.overlay or overlays():
        try:
            docs = render(overlay)
        except (KubectlMissing, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        s = shape(docs)
        low, high = budgets(docs)
        print(f"== {overlay}")
        print(f"-- {s.bouncers - s.bouncers_out} of {s.bouncers} PgBouncers serving:\n")
        print(render_budget(low))
        print(f"\n-- {s.bouncers + s.bouncers_draining} PgBouncers holding server connections:\n")
        print(render_budget(high))
        problems = overlay_problems(docs)
        target = capacity_target(overlay)
        if target is not None:
            print(f"-- capacity target: {target.rps:g} req/s ({overlay / CAPACITY_TARGET})")
            problems += capacity_problems(docs, target)
        for problem in problems:
            print(f"problem: {problem}")
        print()
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
