"""The stack's observers: the PgBouncer and PostgreSQL exporters, and Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from infra.localstack import procs
from infra.localstack.certs import TlsFiles
from infra.localstack.config import REPO
from infra.localstack.render import INFRA, render, write_private

# prometheus-pgbouncer-exporter pins old libraries, so it lives in a virtualenv of its
# own (`make setup` builds it).
PGBOUNCER_EXPORTER = REPO / ".venv-exporter" / "bin" / "pgbouncer-exporter"
POSTGRES_EXPORTER = "prometheus-postgres-exporter"
PROCESS_EXPORTER = "prometheus-process-exporter"


@dataclass
class Daemon:
    """A long-running helper process with one HTTP port that says when it is ready."""

    name: str
    root: Path
    port: int
    port_variable: str
    ready_path: str = "/metrics"

    @property
    def pid_file(self) -> Path:
        return self.root / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return procs.alive(procs.read_pid(self.pid_file))

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def prepare(self) -> bool:
        """Write whatever config the process reads; True when a running one must restart."""
        return False

    def start(self, timeout: float = 20.0) -> None:
        """Start it (restart it when a config it does not reload by itself changed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.prepare() and self.running():
            print(f"{self.name:<12} configuration changed: restarting", flush=True)
            self.stop()
        if not self.running():
            procs.ensure_port_free(self.port, self.port_variable)
            argv, env = self.command()
            procs.spawn(argv, self.log, self.pid_file, env={**_base_env(), **env})

        def ready_or_dead() -> bool:
            return self.ready() or not self.running()

        procs.wait_until(ready_or_dead, timeout, interval=0.2)
        if not self.ready():
            raise procs.StackError(f"{self.name} did not start:\n{procs.tail(self.log)}")

    def ready(self) -> bool:
        return procs.http_status(f"{self.url}{self.ready_path}") == 200

    def stop(self) -> bool:
        return procs.stop_recorded(self.pid_file, signal.SIGTERM, timeout=10)


def _base_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG")}


@dataclass
class PgBouncerExporter(Daemon):
    """One exporter reading every PgBouncer instance, each series labelled with its name."""

    pgbouncers: dict[str, int] = field(default_factory=dict)  # instance name -> port
    stats_user: str = ""
    stats_password: str = ""
    tls: TlsFiles | None = None

    @property
    def config(self) -> Path:
        return self.root / "pgbouncer-exporter.yml"

    def prepare(self) -> bool:
        # The shared template describes one PgBouncer; the stack's config lists them all.
        merged: dict[str, object] = {}
        entries: list[object] = []
        for name, port in self.pgbouncers.items():
            one = yaml.safe_load(
                render(
                    "pgbouncer/exporter.yml",
                    {
                        "PGBOUNCER_EXPORTER_LISTEN": "127.0.0.1",
                        "PGBOUNCER_EXPORTER_PORT": self.port,
                        "PGBOUNCER_STATS_USER": self.stats_user,
                        "PGBOUNCER_STATS_PASSWORD": self.stats_password,
                        "PGBOUNCER_HOST": "127.0.0.1",
                        "PGBOUNCER_PORT": port,
                        "PGBOUNCER_NAME": name,
                        "PGBOUNCER_SSLMODE": "verify-full" if self.tls else "disable",
                        "TLS_DIR": self.tls.directory if self.tls else "",
                    },
                )
            )
            entries.extend(one.pop("pgbouncers"))
            merged = one
        merged["pgbouncers"] = entries
        return _write_if_changed(self.config, yaml.safe_dump(merged, sort_keys=False))

    def command(self) -> tuple[list[str], dict[str, str]]:
        if not PGBOUNCER_EXPORTER.exists():
            raise procs.StackError(f"{PGBOUNCER_EXPORTER} is missing: run `make setup`")
        return [str(PGBOUNCER_EXPORTER), "--config", str(self.config)], {}


@dataclass
class ProcessExporter(Daemon):
    """CPU per PgBouncer instance: each is one process on one core at most."""

    pgbouncer_dir: Path = Path()  # where the instances' `pgbouncer-N.ini` files live

    @property
    def config(self) -> Path:
        return self.root / "process-exporter.yml"

    def prepare(self) -> bool:
        # Anchored on this stack's directory: other stacks on the machine are not ours.
        pattern = re.escape(str(self.pgbouncer_dir.resolve()))
        text = render("pgbouncer/process-exporter.yml", {"PGBOUNCER_CONFIG_DIR": pattern})
        return _write_if_changed(self.config, text)

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [
            PROCESS_EXPORTER,
            f"-config.path={self.config}",
            f"-web.listen-address=127.0.0.1:{self.port}",
            "-threads=false",
            "-gather-smaps=false",
        ], {}


def _write_if_changed(path: Path, text: str) -> bool:
    """Write `text` (owner-only); True when the file existed with other content."""
    try:
        before: str | None = path.read_text()
    except FileNotFoundError:
        before = None
    if before != text:
        write_private(path, text)
    return before is not None and before != text


@dataclass
class PostgresExporter(Daemon):
    dsn: str = ""

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [
            POSTGRES_EXPORTER,
            f"--web.listen-address=127.0.0.1:{self.port}",
        ], {"DATA_SOURCE_NAME": self.dsn}


@dataclass
class Prometheus(Daemon):
    """Prometheus with infra/prometheus's config and rules, copied as they are."""

    ready_path: str = "/-/ready"
    targets: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def prepare(self) -> bool:
        source = INFRA / "prometheus"
        rules = self.config_dir / "rules"
        shutil.rmtree(rules, ignore_errors=True)
        rules.mkdir(parents=True)
        shutil.copy2(source / "prometheus.yml", self.config_dir / "prometheus.yml")
        for rule_file in sorted((source / "rules").glob("*.yml")):
            shutil.copy2(rule_file, rules / rule_file.name)
        self.write_targets()
        return False  # reload() re-reads config and rules; targets need nothing

    def write_targets(self) -> None:
        """file_sd target files; Prometheus notices changes by itself."""
        directory = self.config_dir / "targets"
        directory.mkdir(parents=True, exist_ok=True)
        for job, groups in self.targets.items():
            path = directory / f"{job}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(groups, indent=2))
            tmp.replace(path)

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [
            "prometheus",
            f"--config.file={self.config_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=2d",
        ], {}

    def reload(self) -> None:
        """Re-read config and rules (targets need no reload)."""
        pid = procs.read_pid(self.pid_file)
        if pid is not None and self.running():
            os.kill(pid, signal.SIGHUP)
