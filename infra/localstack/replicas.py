"""Service replicas: one gunicorn master each, with W uvicorn workers."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from infra.localstack import procs
from infra.localstack.config import REPO
from infra.localstack.render import write_private


@dataclass
class Replica:
    """Replica number `index`, listening on 127.0.0.1:`port`."""

    root: Path
    index: int
    port: int
    metrics_port: int
    env: dict[str, str] = field(default_factory=dict)  # service settings for this replica

    @property
    def name(self) -> str:
        return f"replica-{self.index}"

    @property
    def pid_file(self) -> Path:
        return self.root / f"{self.name}.pid"

    @property
    def shape_file(self) -> Path:
        return self.root / f"{self.name}.shape"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def metrics_dir(self) -> Path:
        return self.root / f"{self.name}.metrics"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def full_env(self) -> dict[str, str]:
        return {
            "REPLICA_NAME": self.name,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            **self.env,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "METRICS_PORT": str(self.metrics_port),
        }

    def recorded_env(self) -> dict[str, str] | None:
        """The settings the running process was started with (None: not known)."""
        try:
            recorded: dict[str, str] = json.loads(self.shape_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return recorded

    def running(self) -> bool:
        return procs.alive(procs.read_pid(self.pid_file))

    def current(self) -> bool:
        """Running with exactly the settings asked for."""
        return self.running() and self.recorded_env() == self.full_env()

    def ports_taken_by_itself(self) -> bool:
        """Running on the ports it is asked to use (so they are in nobody else's way)."""
        recorded = self.recorded_env() or {}
        return (
            self.running()
            and recorded.get("PORT") == str(self.port)
            and recorded.get("METRICS_PORT") == str(self.metrics_port)
        )

    def start(self) -> None:
        procs.ensure_port_free(self.port, "REPLICA_BASE_PORT")
        procs.ensure_port_free(self.metrics_port, "METRICS_BASE_PORT")
        procs.spawn(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--config",
                "python:service.gunicorn_conf",
                "service.asgi:app",
            ],
            self.log,
            self.pid_file,
            env={**os.environ, **self.full_env()},
            cwd=REPO,
        )
        # The settings it runs with (the URL holds a password: owner-only file).
        write_private(self.shape_file, json.dumps(self.full_env(), sort_keys=True))

    def ready(self) -> bool:
        return procs.http_status(f"{self.url}/readyz") == 200

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready_or_dead() -> bool:
            return self.ready() or not self.running()

        procs.wait_until(ready_or_dead, timeout, interval=0.2)
        if not self.ready():
            raise procs.StackError(f"{self.name} did not become ready:\n{procs.tail(self.log)}")

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM: gunicorn lets in-flight requests finish within its graceful timeout."""
        self.shape_file.unlink(missing_ok=True)
        return procs.stop_recorded(self.pid_file, timeout=timeout)
