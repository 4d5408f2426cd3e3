"""compose.yaml, k8s/ and the images, proved offline: nothing here can run a container.

Schemas (the compose spec, Kubernetes 1.32 through kubernetes-validate), rendering
(`kubectl kustomize` for every overlay; without kubectl those tests are skipped, saying
so), the connection budget (service/budget.py) on the numbers each deployment really
runs with, one source for every config file, and the scripts the containers run,
executed for real here. Each check is also shown failing on a deliberately broken copy.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]  # no stubs installed
import psycopg
import pytest
import yaml

from infra.docker import compose, targets
from infra.k8s import check as k8s
from infra.k8s import rendered, sync
from infra.localstack import procs
from infra.localstack.config import REPO
from infra.localstack.render import render
from service.budget import max_safe_replicas
from tests.support.stack import Databases

Manifest = dict[str, Any]

INFRA = REPO / "infra"
DOCKER = INFRA / "docker"
RENDER_CONFIG = DOCKER / "render-config"
K8S_VERSION = "1.32.0"  # the image's kubectl
CRD_KINDS = {"PodMonitor", "PrometheusRule"}  # no schema in kubernetes-validate
CERT_MANAGER_KINDS = {"Certificate", "Issuer"}  # nor for these (components/cert-manager)
PROMETHEUS_YML = INFRA / "prometheus" / "prometheus.yml"
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def run(*argv: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=False, **kwargs
    )


def rule_groups() -> list[Any]:
    return [
        group
        for path in sorted((INFRA / "prometheus" / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
    ]


# ---- render-config: the containers' template filler ------------------------------------

SHARED_TEMPLATES = [
    "pgbouncer/pgbouncer.ini",
    "pgbouncer/exporter.yml",
    "postgres/postgresql.conf",
    "postgres/pg_hba.conf",
    "haproxy/haproxy.cfg",
]


def awks() -> list[str]:
    """The awk implementations here: Debian's, and busybox's (Alpine images) if present."""
    return ["awk"] + (["busybox"] if shutil.which("busybox") else [])


def awk_path(tmp_path: Path, awk: str) -> str:
    """A PATH on which `awk` is the implementation under test."""
    if awk == "awk":
        return os.environ["PATH"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "awk").symlink_to(shutil.which(awk) or awk)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize("awk", awks())
@pytest.mark.parametrize("template", SHARED_TEMPLATES)
def test_render_config_fills_templates_as_the_local_stack_does(
    tmp_path: Path, template: str, awk: str
) -> None:
    """Containers and `make up` fill the same file the same way, awkward values included."""
    names = set(PLACEHOLDER.findall((INFRA / template).read_text()))
    values = {name: f"{name.lower()}&\\1 $HOME ${{X}}" for name in names}
    out = tmp_path / "out" / "rendered"
    result = run(
        "sh",
        RENDER_CONFIG,
        "-o",
        out,
        INFRA / template,
        env={"PATH": awk_path(tmp_path, awk), **values},
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text() == render(template, values)
    assert out.stat().st_mode & 0o777 == 0o600  # may hold passwords


def test_render_config_refuses_an_unset_placeholder(tmp_path: Path) -> None:
    """A missing setting stops the container, naming itself, and leaves no file behind."""
    out = tmp_path / "pgbouncer.ini"
    result = run(
        "sh",
        RENDER_CONFIG,
        "-o",
        out,
        INFRA / "pgbouncer" / "pgbouncer.ini",
        "--",
        "true",
        env={"PATH": os.environ["PATH"], "APP_DATABASE": "app"},
    )
    assert result.returncode != 0
    assert "no value for placeholder ${POSTGRES_HOST}" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_render_config_concatenates_templates_then_execs(tmp_path: Path) -> None:
    """pg_hba.conf in containers is infra's rules plus the network line, then the program."""
    out = tmp_path / "run" / "pg_hba.conf"
    hba = {
        "POSTGRES_CLIENT_NETWORK": "samenet",
        "APP_USER": "app",
        "POSTGRES_HBA_HOST": "hostssl",
        "POSTGRES_HBA_APP_OPTIONS": "clientcert=verify-full",
    }
    result = run(
        "sh",
        RENDER_CONFIG,
        "-o",
        out,
        INFRA / "postgres" / "pg_hba.conf",
        DOCKER / "pg_hba-network.conf",
        "--",
        "cat",
        out,
        env={"PATH": os.environ["PATH"], **hba},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == render("postgres/pg_hba.conf", hba) + render(
        "docker/pg_hba-network.conf", hba
    )
    assert "hostssl  all  all          samenet  scram-sha-256" in result.stdout
    assert "hostssl  all  app  samenet  scram-sha-256  clientcert=verify-full" in result.stdout


# ---- the API image ---------------------------------------------------------------------


def test_start_api_wipes_the_metrics_directory_and_runs_gunicorn(tmp_path: Path) -> None:
    """Stale samples go before gunicorn starts (here: checks its config and exits)."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "counter_1.db").write_bytes(b"stale")
    env = {
        **os.environ,
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "PYTHONPATH": str(REPO),
    }
    result = run("sh", DOCKER / "start-api", "--check-config", env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert metrics.is_dir()
    assert not (metrics / "counter_1.db").exists()

    env.pop("PROMETHEUS_MULTIPROC_DIR")
    result = run("sh", DOCKER / "start-api", "--check-config", env=env, cwd=REPO)
    assert result.returncode != 0
    assert "PROMETHEUS_MULTIPROC_DIR" in result.stderr


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each stage of infra/docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = [line]
            stages[line.split()[-1]] = current
        else:
            current.append(line)
    return stages


def test_dockerfile_builds_slim_non_root_images_from_pyproject() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "api", "the service must be the default (last) target"
    for name in ("api", "loadtest", "pgbouncer-exporter"):
        users = [line for line in stages[name] if line.startswith("USER ")]
        assert users == ["USER 10001:10001"], name
    api = stages["api"]
    assert any(line.startswith("HEALTHCHECK ") and "/healthz" in line for line in api)
    assert 'CMD ["start-api"]' in api
    # Both scripts are run by name in the images: git must keep them executable.
    for script in (DOCKER / "start-api", RENDER_CONFIG):
        assert os.access(script, os.X_OK), script
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert base
    assert "-slim" in base[1]
    deps = " ".join(stages["deps"])
    assert "COPY pyproject.toml" in deps
    assert "['dependencies']" in deps
    # Every file the images copy exists, and the build context lets it in.
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line]
    ignore = [line for line in ignore if not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert not allowed & {".stack", ".venv", ".git", ".env", "reports"}
    for stage in stages.values():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), source
                    assert source.split("/")[0] in allowed, f"{source} is outside the context"


def test_exporter_image_pins_the_local_stacks_exporter() -> None:
    """The same prometheus-pgbouncer-exporter (and pins) in the image as in `make up`."""
    pins = {
        line
        for line in (DOCKER / "pgbouncer-exporter.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    makefile = re.sub(r"\\\n", " ", (REPO / "Makefile").read_text())
    found = re.search(r"^EXPORTER_PACKAGES\s*:=\s*(.+)$", makefile, re.MULTILINE)
    assert found
    if "infra/docker/pgbouncer-exporter.txt" not in found[1]:  # else: the file is the source
        assert pins == set(found[1].split())


# ---- compose ---------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    """.env.example's values, secrets given stand-ins (they do not change any number)."""
    return {
        k: v or f"stand-in-{k.lower()}"
        for k, v in compose.read_env_file(compose.ENV_EXAMPLE).items()
    }


@pytest.fixture(scope="module")
def compose_model() -> dict[str, Any]:
    return compose.load(env_example())


def compose_spec_errors(document: Any) -> list[str]:
    """Errors against the compose-spec schema check-jsonschema ships (vendor.compose-spec)."""
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.fail("check-jsonschema is missing: `make setup` installs the dev dependencies")
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_spec(compose_model: Any) -> None:
    """As written (with `${VAR}`s) and as compose sees it once .env.example fills them."""
    assert compose_spec_errors(yaml.safe_load(compose.COMPOSE_FILE.read_text())) == []
    assert compose_spec_errors(compose_model) == []
    # The CLI the README names agrees.
    result = run(
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        compose.COMPOSE_FILE,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_can_fail(compose_model: Any) -> None:
    broken = copy.deepcopy(compose_model)
    broken["services"]["api"]["exposes"] = broken["services"]["api"].pop("expose")
    assert any("exposes" in error for error in compose_spec_errors(broken))


def test_env_example_lists_every_compose_variable() -> None:
    """Required ones empty (compose refuses to start without them), the rest at their default."""
    text = compose.COMPOSE_FILE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))
    example = compose.ENV_EXAMPLE.read_text()
    set_lines = dict(re.findall(r"^(\w+)=(.*)$", example, re.MULTILINE))
    commented = dict(re.findall(r"^# (\w+)=(.*)$", example, re.MULTILINE))
    assert set_lines == dict.fromkeys(required, "")
    assert commented == defaults
    assert {"POSTGRES_PASSWORD", "APP_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= required


def test_compose_refuses_to_start_without_its_secrets() -> None:
    with pytest.raises(compose.MissingVariable, match="APP_PASSWORD"):
        compose.load({k: v for k, v in env_example().items() if k != "APP_PASSWORD"})


def test_compose_passes_the_budget_and_its_own_consistency_checks(compose_model: Any) -> None:
    assert compose.problems(compose_model) == []


def test_compose_check_fails_beyond_the_budget() -> None:
    model = compose.load({**env_example(), "API_MAX_REPLICAS": "200"})
    found = compose.problems(model)
    assert any("above the" in p and "max_client_conn" in p for p in found), found


def test_compose_check_fails_when_more_replicas_start_than_the_budget_checks() -> None:
    model = compose.load({**env_example(), "API_REPLICAS": "9", "API_MAX_REPLICAS": "8"})
    assert any("API_REPLICAS=9 is above API_MAX_REPLICAS=8" in p for p in compose.problems(model))


def test_compose_runs_pgbouncer_instances_the_budget_counts() -> None:
    model = compose.load({**env_example(), "PGBOUNCER_INSTANCES": "2"})
    assert int(model["services"]["pgbouncer"]["deploy"]["replicas"]) == 2
    assert compose.topology(model).bouncer.instances == 2  # type: ignore[union-attr]
    assert compose.problems(model) == []
    model["services"]["pgbouncer"]["deploy"]["replicas"] = 3
    found = compose.problems(model)
    assert any("pgbouncer runs 3 instance(s)" in p for p in found), found


def test_compose_check_fails_on_a_wrong_pool_mode(tmp_path: Path, compose_model: Any) -> None:
    ini = tmp_path / "pgbouncer.ini"
    text = (INFRA / "pgbouncer" / "pgbouncer.ini").read_text()
    ini.write_text(text.replace("pool_mode = transaction", "pool_mode = session"))
    model = copy.deepcopy(compose_model)
    volumes = model["services"]["pgbouncer"]["volumes"]
    volumes[0] = f"{ini}:/pgscale/infra/pgbouncer/pgbouncer.ini:ro"
    assert any("pool_mode = session" in p for p in compose.problems(model))


@pytest.mark.parametrize(
    ("service", "variable", "weak"),
    [
        ("api", "DB_SSLMODE", "prefer"),
        ("api", "DATABASE_URL", "postgresql://app@pgbouncer:6432/app?sslmode=disable"),
        ("migrate", "DATABASE_URL", "postgresql://app@postgres:5432/app?sslmode=allow"),
        ("pgbouncer", "PGBOUNCER_CLIENT_TLS_SSLMODE", "allow"),
        ("pgbouncer", "PGBOUNCER_SERVER_TLS_SSLMODE", "prefer"),
        ("postgres", "POSTGRES_SSL", "off"),
        ("postgres", "POSTGRES_HBA_HOST", "host"),
        ("pgbouncer-exporter", "PGBOUNCER_SSLMODE", "disable"),
        ("postgres-exporter", "DATA_SOURCE_URI", "postgres:5432/postgres?sslmode=disable"),
        ("locust-master", "SAMPLER_PGBOUNCER_URL", "host=pgbouncer dbname=pgbouncer"),
    ],
)
def test_compose_check_fails_on_a_hop_left_in_plain_text(
    compose_model: Any, service: str, variable: str, weak: str
) -> None:
    model = copy.deepcopy(compose_model)
    model["services"][service]["environment"][variable] = weak
    [problem] = compose.problems(model)
    assert "can run this hop in plain text" in problem
    assert service in problem


def test_compose_api_is_scalable_and_gated(compose_model: Any) -> None:
    services = compose_model["services"]
    assert not any("container_name" in service for service in services.values())
    api = services["api"]
    assert "ports" not in api, "host ports would stop `--scale api=N`"
    assert set(api["expose"]) == {"8001", "9101"}
    assert api["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert api["depends_on"]["pgbouncer"] == {"condition": "service_healthy"}
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "healthcheck" in services["postgres"]
    assert "healthcheck" in services["pgbouncer"]
    assert compose.environment(compose_model, "api")["DATABASE_URL"].endswith(
        "@pgbouncer:6432/app?load_balance_hosts=random"
    )
    # Migrations go straight to PostgreSQL (they set the role's statement_timeout), with
    # the client pair pg_hba.conf asks of the application role there.
    migrate_url = compose.environment(compose_model, "migrate")["DATABASE_URL"]
    assert "@postgres:5432/app?sslcert=" in migrate_url
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["postgres"]["depends_on"]["certs"] == {
        "condition": "service_completed_successfully"
    }
    for name in ("locust-master", "locust-worker"):
        assert services[name]["profiles"] == ["loadtest"]


def mounts(service: Any) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = (REPO / source).resolve()
    return found


def test_compose_runs_infras_config_files_as_they_are(compose_model: Any) -> None:
    """One source: the local stack's files, mounted read-only, filled at start."""
    services = compose_model["services"]
    provider = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/pgscale.yml").read_text())
    expected = {
        "prometheus": {
            "/etc/prometheus/prometheus.yml": PROMETHEUS_YML,
            "/etc/prometheus/rules": INFRA / "prometheus" / "rules",
        },
        "grafana": {
            "/etc/grafana/provisioning": INFRA / "grafana" / "provisioning",
            provider["providers"][0]["options"]["path"]: INFRA / "grafana" / "dashboards",
        },
    }
    for service, wanted in expected.items():
        for target, source in wanted.items():
            assert mounts(services[service]).get(target) == source, (service, target)
    # Each template render-config fills is a mounted infra/ file.
    for name, service in services.items():
        argv = service.get("entrypoint") or []
        if "/pgscale/docker/render-config" not in argv:
            continue
        mounted = mounts(service)
        templates = [a for a in argv if a.startswith("/pgscale/") and a != argv[1]]
        assert templates, name
        for template in templates:
            assert mounted[template].is_relative_to(INFRA), (name, template)
            assert mounted[template].is_file(), (name, template)
    assert mounts(services["pgbouncer"])["/pgscale/infra/pgbouncer/pgbouncer.ini"] == (
        INFRA / "pgbouncer" / "pgbouncer.ini"
    )


def rendered_templates(argv: list[str]) -> list[str]:
    """The TEMPLATE arguments of a render-config command line."""
    start = next(i for i, arg in enumerate(argv) if arg.endswith("render-config")) + 1
    end = argv.index("--") if "--" in argv else len(argv)
    templates, skip = [], False
    for arg in argv[start:end]:
        if skip:
            skip = False
        elif arg == "-o":
            skip = True
        else:
            templates.append(arg)
    return templates


def test_compose_sets_every_placeholder_its_templates_need(compose_model: Any) -> None:
    """render-config stops a container on an unset placeholder: none is left unset."""
    checked = []
    for name, service in compose_model["services"].items():
        argv = service.get("entrypoint") or []
        if not any(str(arg).endswith("render-config") for arg in argv):
            continue
        env = compose.environment(compose_model, name)
        for template in rendered_templates(argv):
            needed = set(PLACEHOLDER.findall(mounts(service)[template].read_text()))
            assert needed <= set(env), (name, template, needed - set(env))
            checked.append(name)
    # The exporter image renders infra/pgbouncer/exporter.yml from its environment.
    needed = set(PLACEHOLDER.findall((INFRA / "pgbouncer" / "exporter.yml").read_text()))
    assert needed <= set(compose.environment(compose_model, "pgbouncer-exporter"))
    assert set(checked) == {"postgres", "pgbouncer", "lb"}


def test_compose_haproxy_config_is_valid(tmp_path: Path, compose_model: Any) -> None:
    """infra/haproxy/haproxy.cfg with compose's DNS-filled server slots, checked by haproxy."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (`make setup` installs it): cannot check its config")
    env = compose.environment(compose_model, "lb")
    env["HAPROXY_ADMIN_SOCKET"] = str(tmp_path / "admin.sock")
    cfg = tmp_path / "haproxy.cfg"
    result = run(
        "sh",
        RENDER_CONFIG,
        "-o",
        cfg,
        INFRA / "haproxy" / "haproxy.cfg",
        env={"PATH": os.environ["PATH"], **env},
    )
    assert result.returncode == 0, result.stderr
    assert "server-template api- 1-8 api:8001" in cfg.read_text()
    result = run(haproxy, "-c", "-f", cfg)
    assert result.returncode == 0, result.stdout + result.stderr


# The process exporter (PgBouncer CPU per instance) runs in the local stack only: its job
# reads a glob no compose file matches, and in k8s cAdvisor has the same numbers.
LOCAL_ONLY_JOBS = {"process": "targets/process*.json"}


def test_compose_prometheus_gets_every_job_of_prometheus_yml(compose_model: Any) -> None:
    """prometheus.yml is used unchanged: the targets writer fills each file_sd file it reads."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    files = {
        job["job_name"]: job["file_sd_configs"][0]["files"][0] for job in config["scrape_configs"]
    }
    assert files == {job: f"targets/{job}.json" for job in files} | LOCAL_ONLY_JOBS
    writer = compose_model["services"]["prometheus-targets"]["command"]
    jobs = {"api"} | {arg.split("=")[0] for arg in writer if "=" in arg}
    assert jobs == set(files) - set(LOCAL_ONLY_JOBS)
    volume = writer[writer.index("--dir") + 1]
    assert (
        f"prometheus-targets:{volume}" in compose_model["services"]["prometheus-targets"]["volumes"]
    )
    assert (
        "prometheus-targets:/etc/prometheus/targets:ro"
        in compose_model["services"]["prometheus"]["volumes"]
    )


def test_targets_writer_labels_each_replica(tmp_path: Path) -> None:
    """Real name resolution: every address of the service is a target with a replica label."""
    assert targets.api_groups("localhost", 9101) == [
        {"targets": ["127.0.0.1:9101"], "labels": {"replica": targets.replica_name("127.0.0.1")}}
    ]
    assert targets.api_groups("no-such-service.invalid", 9101) == []
    assert (
        targets.main(
            [
                "--dir",
                str(tmp_path),
                "--api",
                "localhost:9101",
                "--job",
                "postgres=pe:9187",
                "--once",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "postgres.json").read_text()) == [{"targets": ["pe:9187"]}]
    api = json.loads((tmp_path / "api.json").read_text())
    assert [group["targets"] for group in api] == [["127.0.0.1:9101"]]
    assert not list(tmp_path.glob("*.tmp"))


# ---- the scripts containers run against PostgreSQL -------------------------------------


def test_postgres_init_creates_the_roles_the_local_stack_creates(databases: Databases) -> None:
    """The first-start script, run twice (it must be idempotent) against a real server."""
    pg = databases.postgres
    env = {
        "PATH": os.environ["PATH"],
        "PGHOST": str(pg.socket_dir),
        "PGPORT": str(pg.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": "postgres",
        "APP_USER": "deploy_app",
        "APP_PASSWORD": "deploy app 'password'",
        "APP_DATABASE": "deploy_db",
        "EXPORTER_USER": "deploy_exporter",
        "EXPORTER_PASSWORD": "deploy-exporter-password",
    }
    try:
        for _ in range(2):
            result = run("sh", DOCKER / "postgres-init.sh", env=env)
            assert result.returncode == 0, result.stderr
        with psycopg.connect(pg.superuser_conninfo(), autocommit=True) as conn:
            app = conn.execute(
                "SELECT rolsuper, rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%'"
                " FROM pg_authid WHERE rolname = 'deploy_app'"
            ).fetchone()
            assert app == (False, True, True)
            owner = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'deploy_db'"
            ).fetchone()
            assert owner == ("deploy_app",)
            monitor = conn.execute(
                "SELECT pg_has_role('deploy_exporter', 'pg_monitor', 'member')"
            ).fetchone()
            assert monitor == (True,)
        # Over TCP, as PgBouncer logs in: SCRAM with the password just set.
        with psycopg.connect(
            host="127.0.0.1",
            port=pg.port,
            user="deploy_app",
            password=env["APP_PASSWORD"],
            dbname="deploy_db",
        ) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("deploy_app",)
            # Its own public schema only: no schema or temporary table beside it.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE SCHEMA intruder")
    finally:
        with psycopg.connect(pg.superuser_conninfo(), autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS deploy_db")
            conn.execute("DROP ROLE IF EXISTS deploy_app")
            conn.execute("DROP ROLE IF EXISTS deploy_exporter")


def test_wait_schema_waits_for_the_migration(databases: Databases) -> None:
    """Through PgBouncer, as the API's init container: at once when migrated, else a timeout."""
    command = [sys.executable, "-m", "infra.docker.wait_schema"]
    ready = run(
        *command,
        "--timeout",
        "10",
        env={**os.environ, "DATABASE_URL": databases.pooled_url},
        cwd=REPO,
    )
    assert ready.returncode == 0, ready.stderr
    assert "schema at version" in ready.stdout
    nowhere = f"postgresql://app:x@127.0.0.1:{procs.free_port_block(1)}/app"
    late = run(
        *command,
        "--timeout",
        "1",
        "--interval",
        "0.2",
        env={**os.environ, "DATABASE_URL": nowhere},
        cwd=REPO,
    )
    assert late.returncode == 1
    assert "has the migration Job run?" in late.stderr


# ---- k8s -------------------------------------------------------------------------------

OVERLAY_NAMES = [path.name for path in k8s.overlays()]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[Manifest]]:
    """Every overlay rendered once; skipped (not passed) where kubectl is missing."""
    if shutil.which("kubectl") is None:
        pytest.skip(
            "kubectl is not on PATH: the k8s/ overlays cannot be rendered, so they are"
            " NOT checked here (the image's kubectl v1.32 with kustomize v5.5 renders them)"
        )
    return {path.name: k8s.render(path) for path in k8s.overlays()}


@pytest.fixture(params=OVERLAY_NAMES)
def docs(request: pytest.FixtureRequest, manifests: dict[str, list[Manifest]]) -> list[Manifest]:
    """One overlay's objects, a private copy a test may break."""
    return copy.deepcopy(manifests[request.param])


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        pytest.fail("kubernetes-validate is missing: `make setup` installs the dev dependencies")
    return kubernetes_validate


def test_there_are_dev_and_prod_overlays() -> None:
    assert {"dev", "prod"} <= set(OVERLAY_NAMES)


def test_overlay_objects_are_valid_kubernetes(docs: list[Manifest]) -> None:
    """Strict schemas of Kubernetes 1.32; the two operator CRDs are checked by the tests below."""
    kv = kubernetes_validate()
    crds = set()
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            crds.add(doc["kind"])
            continue
        if doc["kind"] in CERT_MANAGER_KINDS:
            assert doc["apiVersion"] == "cert-manager.io/v1"
            continue
        kv.validate(doc, K8S_VERSION, strict=True)
    assert crds == CRD_KINDS


def test_validation_rejects_a_misspelt_field(docs: list[Manifest]) -> None:
    kv = kubernetes_validate()
    api = k8s.find(docs, "Deployment", "api")
    api["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kv.ValidationError):
        kv.validate(api, K8S_VERSION, strict=True)


def test_overlay_passes_the_budget_and_pgbouncer_checks(docs: list[Manifest]) -> None:
    assert k8s.overlay_problems(docs) == []


def test_k8s_check_fails_on_a_hop_left_in_plain_text(docs: list[Manifest]) -> None:
    tls = next(d for d in docs if d["metadata"]["name"].startswith("pgscale-tls"))
    tls["data"]["PGBOUNCER_SERVER_TLS_SSLMODE"] = "prefer"
    exporter = next(d for d in docs if d["metadata"]["name"].startswith("postgres-exporter"))
    exporter["data"]["DATA_SOURCE_URI"] = "postgres:5432/postgres?sslmode=disable"
    found = k8s.overlay_problems(docs)
    assert [p.split(":")[0] for p in found] == [
        "pgbouncer -> postgres (PGBOUNCER_SERVER_TLS_SSLMODE)",
        "postgres-exporter -> postgres",
    ], found


def test_k8s_tls_secrets_are_the_ones_cert_manager_makes(docs: list[Manifest]) -> None:
    """Every Secret a pod mounts for TLS is one a Certificate writes (dev), or one the
    operator creates (prod, which has no Certificates)."""
    mounted = {
        source["secret"]["name"]
        for _, template in pod_templates(docs)
        for volume in template["spec"].get("volumes", [])
        for source in volume.get("projected", {}).get("sources", [])
        if "secret" in source
    } | {
        volume["secret"]["secretName"]
        for _, template in pod_templates(docs)
        for volume in template["spec"].get("volumes", [])
        if "secret" in volume
    }
    assert {"pgscale-tls-pgbouncer", "pgscale-tls-pgbouncer-client"} <= mounted
    written = {d["spec"]["secretName"] for d in docs if d["kind"] == "Certificate"}
    if written:
        assert mounted <= written | {"pgscale-db"}, mounted - written


def test_budget_check_fails_when_max_replicas_exceeds_the_budget(docs: list[Manifest]) -> None:
    allowed = max_safe_replicas(k8s.shape(docs).serving())
    hpa = k8s.find(docs, "HorizontalPodAutoscaler", "api")
    hpa["spec"]["maxReplicas"] = allowed  # + maxSurge 1: one over
    found = k8s.budget_problems(docs)
    assert any(p.startswith("HorizontalPodAutoscaler api: maxReplicas") for p in found), found
    assert any("max_client_conn" in p for p in found), found


def test_budget_check_fails_when_postgres_cannot_hold_every_pgbouncer(
    docs: list[Manifest],
) -> None:
    topology = next(d for d in docs if d["metadata"]["name"].startswith("pgscale-topology"))
    topology["data"]["POSTGRES_MAX_CONNECTIONS"] = "30"
    found = k8s.budget_problems(docs)
    assert any("holding server connections" in p and "PostgreSQL" in p for p in found), found


def test_budget_check_fails_when_the_guard_sees_other_numbers(docs: list[Manifest]) -> None:
    k8s.find(docs, "Deployment", "pgbouncer")["spec"]["replicas"] += 1
    assert any("PGBOUNCER_INSTANCES" in p for p in k8s.budget_problems(docs))


def test_pgbouncer_check_fails_on_a_wrong_pool_mode(docs: list[Manifest]) -> None:
    config = next(d for d in docs if d["metadata"]["name"].startswith("pgbouncer-config"))
    config["data"]["pgbouncer.ini"] = config["data"]["pgbouncer.ini"].replace(
        "pool_mode = transaction", "pool_mode = session"
    )
    found = k8s.pgbouncer_problems(docs)
    assert any("pool_mode = session" in p for p in found), found


def test_pgbouncer_check_fails_when_clients_outlive_the_drain(docs: list[Manifest]) -> None:
    settings = next(d for d in docs if d["metadata"]["name"].startswith("api-settings"))
    settings["data"]["POOL_MAX_LIFETIME"] = "1800"
    assert any("drain window" in p for p in k8s.pgbouncer_problems(docs))


def test_pgbouncer_check_fails_on_a_version_whose_sigterm_does_not_drain(
    docs: list[Manifest],
) -> None:
    k8s.container(k8s.find(docs, "Deployment", "pgbouncer"), "pgbouncer")["image"] = (
        "edoburu/pgbouncer:1.18.0"
    )
    assert any("before 1.23" in p for p in k8s.pgbouncer_problems(docs))


def test_prod_states_its_target_and_agrees_with_the_planner(
    manifests: dict[str, list[Manifest]],
) -> None:
    target = k8s.capacity_target(REPO / "k8s" / "overlays" / "prod")
    assert target is not None
    assert k8s.capacity_problems(copy.deepcopy(manifests["prod"]), target) == []


def test_capacity_check_fails_when_the_overlay_disagrees_with_the_planner(
    manifests: dict[str, list[Manifest]],
) -> None:
    target = k8s.capacity_target(REPO / "k8s" / "overlays" / "prod")
    assert target is not None
    docs = copy.deepcopy(manifests["prod"])
    k8s.find(docs, "HorizontalPodAutoscaler", "api")["spec"]["maxReplicas"] += 4
    k8s.find(docs, "Deployment", "pgbouncer")["spec"]["replicas"] += 1
    topology = next(d for d in docs if d["metadata"]["name"].startswith("pgscale-topology"))
    topology["data"]["PGBOUNCER_DEFAULT_POOL_SIZE"] = "20"
    found = k8s.capacity_problems(docs, target)
    assert [p.split(" is ")[0] for p in found] == [
        "HorizontalPodAutoscaler maxReplicas",
        "PgBouncer Deployment replicas",
        "PGBOUNCER_DEFAULT_POOL_SIZE",
    ], found
    # A target past what the calibrated PostgreSQL can do is a problem of its own.
    past = k8s.capacity_problems(docs, replace(target, rps=10 * target.rps))
    assert past[0].startswith("the planner finds no shape"), past


def configmap_data(docs: list[Manifest], prefix: str) -> dict[str, str]:
    found = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)
    ]
    assert len(found) == 1, prefix
    data: dict[str, str] = found[0]["data"]
    return data


RENDERED = REPO / "tests" / "fixtures" / "k8s-rendered.json"


def test_k8s_renders_the_objects_the_fixture_records(manifests: dict[str, list[Manifest]]) -> None:
    """Same kinds, names (hash suffixes aside) and contents as tests/fixtures/k8s-rendered.json.

    The fixture was written by `python -m infra.k8s.rendered` before k8s/ read infra/
    through kustomizations of its own: a layout change must leave this test alone.
    """
    recorded = json.loads(RENDERED.read_text())
    now = {"base": rendered.digests(k8s.render(REPO / "k8s" / "base"))}
    now.update({f"overlays/{name}": rendered.digests(docs) for name, docs in manifests.items()})
    assert sorted(now) == sorted(recorded)
    for target, digests in now.items():
        wanted = recorded[target]
        assert sorted(digests) == sorted(wanted), target
        changed = sorted(name for name in digests if digests[name] != wanted[name])
        assert changed == [], (
            f"{target} renders {changed} differently; if meant, rewrite the fixture:"
            " python -m infra.k8s.rendered > tests/fixtures/k8s-rendered.json"
        )


def test_rendered_digests_ignore_name_hashes_but_not_contents(docs: list[Manifest]) -> None:
    before = rendered.digests(docs)
    config = next(d for d in docs if d["metadata"]["name"].startswith("pgbouncer-config-"))
    hashed = config["metadata"]["name"]
    for doc in docs:  # another hash, the way kustomize would rename it and its references
        for volume in doc.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if volume.get("configMap", {}).get("name") == hashed:
                volume["configMap"]["name"] = "pgbouncer-config-bcdfghkmt2"
    config["metadata"]["name"] = "pgbouncer-config-bcdfghkmt2"
    assert rendered.digests(docs) == before
    config["data"]["pgbouncer.ini"] += "\n"
    assert rendered.digests(docs).keys() == before.keys()
    assert rendered.digests(docs) != before


def infra_copies(directory: Path) -> dict[str, str]:
    """Files under `directory` whose bytes are an infra/ file's -> that file."""
    infra = {path.read_bytes(): path for path in INFRA.rglob("*") if path.is_file()}
    return {
        str(path.relative_to(directory)): str(infra[path.read_bytes()].relative_to(REPO))
        for path in directory.rglob("*")
        if path.is_file() and path.read_bytes() in infra
    }


def test_k8s_holds_no_copy_of_an_infra_file(tmp_path: Path) -> None:
    """k8s/ reads infra/ through kustomizations in infra/: no file of it is infra's again."""
    assert infra_copies(REPO / "k8s") == {}
    shutil.copy(RENDER_CONFIG, tmp_path / "render-config")
    assert infra_copies(tmp_path) == {"render-config": "infra/docker/render-config"}


def test_prometheusrule_is_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one file written from infra/ (kustomize cannot nest the rules), and its control."""
    assert sync.differences() == []
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(sync.prometheus_rule().replace("for: 5m", "for: 6m", 1))
    monkeypatch.setattr(sync, "PROMETHEUS_RULE", stale)
    monkeypatch.setattr(sync, "REPO", tmp_path)
    assert sync.differences() == ["prometheusrule.yaml: differs from infra/prometheus/rules/"]
    assert sync.main([]) == 0
    assert sync.differences() == []


def test_k8s_runs_infras_config_files(docs: list[Manifest]) -> None:
    """What the ConfigMaps deliver is infra's bytes, read by the kustomizations in infra/."""
    pgbouncer = configmap_data(docs, "pgbouncer-config")
    assert pgbouncer == {
        "pgbouncer.ini": (INFRA / "pgbouncer" / "pgbouncer.ini").read_text(),
        "pgbouncer-userlist.txt": (DOCKER / "pgbouncer-userlist.txt").read_text(),
        "render-config": RENDER_CONFIG.read_text(),
    }
    if any(d["kind"] == "StatefulSet" for d in docs):
        assert configmap_data(docs, "postgres-config") == {
            "postgresql.conf": (INFRA / "postgres" / "postgresql.conf").read_text(),
            "pg_hba.conf": (INFRA / "postgres" / "pg_hba.conf").read_text(),
            "pg_hba-network.conf": (DOCKER / "pg_hba-network.conf").read_text(),
            "postgres-init.sh": (DOCKER / "postgres-init.sh").read_text(),
            "render-config": RENDER_CONFIG.read_text(),
        }


def test_k8s_containers_set_every_placeholder_their_templates_need(docs: list[Manifest]) -> None:
    """Each template a container renders comes from a ConfigMap and has all its values."""
    checked = []
    for name, template in pod_templates(docs):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        workload = next(d for d in docs if f"{d['kind']} {d['metadata']['name']}" == name)
        for item in pod["containers"]:
            argv = item.get("command", []) + item.get("args", [])
            if not any(arg.endswith("render-config") for arg in argv):
                continue
            env = k8s.container_env(docs, workload, item["name"])
            sources = {
                m["mountPath"]: volumes[m["name"]]["configMap"]["name"]
                for m in item["volumeMounts"]
                if "configMap" in volumes.get(m["name"], {})
            }
            for path in rendered_templates(argv):
                directory, _, key = path.rpartition("/")
                text = k8s.configmap(docs, sources[directory])[key]
                needed = set(PLACEHOLDER.findall(text))
                assert needed <= set(env), (name, path, needed - set(env))
            checked.append(name)
    assert "Deployment pgbouncer" in checked
    assert ("StatefulSet postgres" in checked) == any(d["kind"] == "StatefulSet" for d in docs)
    # The exporter image renders infra/pgbouncer/exporter.yml from its environment.
    exporter = k8s.container_env(docs, k8s.find(docs, "Deployment", "pgbouncer"), "exporter")
    assert set(PLACEHOLDER.findall((INFRA / "pgbouncer" / "exporter.yml").read_text())) <= set(
        exporter
    )


def test_dashboards_configmap_is_infras(docs: list[Manifest]) -> None:
    dashboards = next(d for d in docs if d["metadata"]["name"] == "pgscale-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["data"] == {
        path.name: path.read_text() for path in (INFRA / "grafana" / "dashboards").glob("*.json")
    }


def test_prometheusrule_groups_are_infras(tmp_path: Path, docs: list[Manifest]) -> None:
    rule = k8s.find(docs, "PrometheusRule", "pgscale")
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pgscale"
    assert rule["spec"]["groups"] == rule_groups()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (`make setup` installs it)")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = run(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def pod_templates(docs: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"]


def test_podmonitors_label_series_as_prometheus_yml_does(docs: list[Manifest]) -> None:
    """Same jobs and interval as the local Prometheus, `replica` on the API; ports exist."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    jobs = {}
    for monitor in monitors:
        labels = monitor["spec"]["selector"]["matchLabels"]
        pods = [
            t for _, t in pod_templates(docs) if labels.items() <= t["metadata"]["labels"].items()
        ]
        assert pods, f"PodMonitor {monitor['metadata']['name']} selects no pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["interval"] == config["global"]["scrape_interval"]
            ports = {
                port["name"]
                for t in pods
                for c in t["spec"]["containers"]
                for port in c.get("ports", [])
            }
            assert endpoint["port"] in ports
            relabel = {r["targetLabel"]: r for r in endpoint["relabelings"] if "targetLabel" in r}
            jobs[relabel["job"]["replacement"]] = relabel
    assert set(jobs) == {job["job_name"] for job in config["scrape_configs"]} - {
        "prometheus",
        *LOCAL_ONLY_JOBS,
    }
    assert jobs["api"]["replica"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]


def test_api_deployment_shape(docs: list[Manifest]) -> None:
    api = k8s.find(docs, "Deployment", "api")
    pod = api["spec"]["template"]["spec"]
    item = k8s.container(api, "api")
    env = k8s.container_env(docs, api, "api")
    assert {p["name"]: p["containerPort"] for p in item["ports"]} == {
        "http": int(env["PORT"]),
        "metrics": int(env["METRICS_PORT"]),
    }
    assert item["resources"]["requests"]
    assert item["resources"]["limits"]
    assert item["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert item["livenessProbe"]["httpGet"]["path"] == "/healthz"  # never the database
    assert item["startupProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"]: m["name"] for m in item["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]]
    pause = k8s.prestop_pause(item)
    assert pause > 0
    assert pod["terminationGracePeriodSeconds"] >= pause + int(env["GRACEFUL_TIMEOUT"]) + 5
    assert env["DATABASE_URL"].endswith("@pgbouncer:6432/app")
    assert env["REPLICA_NAME"] == "<field>"
    hpa = k8s.find(docs, "HorizontalPodAutoscaler", "api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "api",
    }
    assert "replicas" not in api["spec"], "the HorizontalPodAutoscaler owns the count"
    for name in ("api", "pgbouncer"):
        pdb = k8s.find(docs, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}


def test_pods_meet_the_restricted_pod_security_standard(docs: list[Manifest]) -> None:
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, template in pod_templates(docs):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork"), name
        assert not pod.get("hostPID"), name
        assert pod.get("automountServiceAccountToken") is False, name
        for volume in pod.get("volumes", []):
            # The volume types the restricted standard allows that these pods use.
            assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected"}, name
        for item in pod["containers"] + pod.get("initContainers", []):
            security = item["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (name, item["name"])
            assert security["readOnlyRootFilesystem"] is True, (name, item["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (name, item["name"])
            assert "privileged" not in security, (name, item["name"])


def test_postgres_is_external_in_base_and_in_cluster_in_dev(
    manifests: dict[str, list[Manifest]],
) -> None:
    prod = k8s.find(manifests["prod"], "Service", "postgres")
    assert prod["spec"]["type"] == "ExternalName"
    dev = k8s.find(manifests["dev"], "Service", "postgres")
    assert dev["spec"]["selector"] == {"app.kubernetes.io/name": "postgres"}
    statefulset = k8s.find(manifests["dev"], "StatefulSet", "postgres")
    env = k8s.container_env(manifests["dev"], statefulset, "postgres")
    api = k8s.container_env(
        manifests["dev"], k8s.find(manifests["dev"], "Deployment", "api"), "api"
    )
    assert env["POSTGRES_MAX_CONNECTIONS"] == api["POSTGRES_MAX_CONNECTIONS"]
    assert "StatefulSet" not in {d["kind"] for d in manifests["prod"]}
    assert {"locust-master", "locust-worker"} <= {
        d["metadata"]["name"] for d in manifests["dev"] if d["kind"] == "Deployment"
    }


def test_secrets_referenced_are_the_ones_documented(manifests: dict[str, list[Manifest]]) -> None:
    """dev generates the Secret; prod expects it, with no key dev does not show."""
    dev_keys = set(compose.read_env_file(REPO / "k8s" / "overlays" / "dev" / "dev.secrets.env"))
    for overlay, docs in manifests.items():
        refs = set()
        for _, template in pod_templates(docs):
            for item in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                for var in item.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
        assert {key for _, key in refs} <= dev_keys, overlay
        secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
        if overlay == "dev":
            for name, key in refs:
                assert key in secrets[name]["data"], (name, key)
        else:
            assert secrets == {}, "production secrets are not kept in the repository"
            assert {name for name, _ in refs} == {"pgscale-db"}


# NetworkPolicies: a small evaluator of the rules the manifests use (matchLabels,
# namespaceSelector {}, port numbers, a rule without peers meaning everyone).


@dataclass(frozen=True)
class Endpoint:
    """A pod (by its name label), here or in another namespace, or a host outside."""

    name: str
    here: bool = True
    external: bool = False

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/part-of": "pgscale"}


OUTSIDE = Endpoint("outside", here=False, external=True)


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector
    matched: bool = selector.get("matchLabels", {}).items() <= labels.items()
    return matched


def peer_matches(peer: Manifest, other: Endpoint) -> bool:
    if other.external or "ipBlock" in peer:
        return other.external and "ipBlock" in peer
    if "namespaceSelector" in peer:
        # {} is every namespace; a selector with labels is another one (kube-system).
        return not peer["namespaceSelector"] and selects(peer.get("podSelector", {}), other.labels)
    return other.here and selects(peer["podSelector"], other.labels)


def allowed(docs: list[Manifest], source: Endpoint, dest: Endpoint, port: int) -> bool:
    """Whether `source` may open a connection to `dest` on `port` under the policies."""
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]

    def permits(pod: Endpoint, kind: str, peers: str, other: Endpoint) -> bool:
        if not pod.here:
            return True  # another namespace's policies are not ours
        mine = [
            p
            for p in policies
            if kind in p["policyTypes"] and selects(p["podSelector"], pod.labels)
        ]
        return not mine or any(
            (not rule.get("ports") or any(p.get("port") == port for p in rule["ports"]))
            and (not rule.get(peers) or any(peer_matches(peer, other) for peer in rule[peers]))
            for policy in mine
            for rule in policy.get(kind.lower(), [])
        )

    return permits(source, "Egress", "to", dest) and permits(dest, "Ingress", "from", source)


def test_network_policies_fence_pgbouncer_and_postgres(docs: list[Manifest]) -> None:
    api, bouncer, postgres = Endpoint("api"), Endpoint("pgbouncer"), Endpoint("postgres")
    assert allowed(docs, api, bouncer, 6432)
    for other in ("locust", "postgres-exporter", "migrate", "postgres", "stranger"):
        assert not allowed(docs, Endpoint(other), bouncer, 6432), other
    assert not allowed(docs, Endpoint("api", here=False), bouncer, 6432)
    # The API reaches nothing but PgBouncer: not PostgreSQL, in the cluster or outside.
    assert not allowed(docs, api, postgres, 5432)
    assert not allowed(docs, api, OUTSIDE, 5432)
    for client in ("pgbouncer", "postgres-exporter", "migrate"):
        assert allowed(docs, Endpoint(client), OUTSIDE, 5432), client
        assert not allowed(docs, Endpoint(client), OUTSIDE, 443), client
    if any(d["kind"] == "StatefulSet" for d in docs):
        for client in ("pgbouncer", "postgres-exporter", "migrate"):
            assert allowed(docs, Endpoint(client), postgres, 5432), client
        for other in ("api", "locust", "stranger"):
            assert not allowed(docs, Endpoint(other), postgres, 5432), other
        assert not allowed(docs, Endpoint("anyone", here=False), postgres, 5432)
        assert allowed(docs, Endpoint("locust"), api, 8001)
    # Prometheus, in its own namespace, scrapes the metrics ports.
    prometheus = Endpoint("prometheus", here=False)
    assert allowed(docs, prometheus, api, 9101)
    assert allowed(docs, prometheus, bouncer, 9127)
    assert not allowed(docs, prometheus, bouncer, 6432)


def test_network_policy_evaluator_sees_an_opened_door(docs: list[Manifest]) -> None:
    """Dropping the API's egress fence would let it reach PostgreSQL: the test would say so."""
    policy = next(
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "api"
    )
    policy["spec"]["egress"].append({"ports": [{"protocol": "TCP", "port": 5432}]})
    assert allowed(docs, Endpoint("api"), OUTSIDE, 5432)


def test_k8s_check_holds_the_deadline_above_pgbouncers_query_wait(docs: list[Manifest]) -> None:
    """The same rule the replica's start-up, the local stack and compose apply."""
    assert k8s.timeout_order_problems(docs) == []
    api = k8s.container(k8s.find(docs, "Deployment", "api"), "api")
    api.setdefault("env", []).append({"name": "DB_DEADLINE", "value": "1"})
    problems = k8s.overlay_problems(docs)
    assert any("must be below DB_DEADLINE (1s)" in p for p in problems), problems
