"""compose.yaml under Podman, with no Docker and no registry: `python -m infra.docker.podman`.

What `make compose-test` needs before it brings the stack up, each step idempotent:

- `setup`: Podman, runc, debootstrap and the DNS plugin from Debian when missing, and
  /etc/containers/containers.conf when it lacks what this machine needs (crun cannot
  raise RLIMIT_NOFILE/RLIMIT_NPROC without CAP_SYS_RESOURCE, so runc, with ulimits the
  host can grant). A containers.conf that already says something else is left alone.
- `images`: a Debian base made by debootstrap and `podman import` (kept once made), a
  Python base on it, the project's images from infra/docker/Dockerfile built on that
  (its PYTHON_IMAGE build argument), and local stand-ins for the upstream images
  compose names (infra/docker/standins/), tagged with the names `ENV` points compose's
  image variables at.
- `up` / `down`: the project (`Compose`) started in compose.yaml's depends_on order,
  each gate polled, since podman-compose ignores the health gates here; then removed
  with its network and volumes.

Nothing is pulled: no registry is reachable from here. Grafana has no Debian package
and no stand-in; the stack runs without it.
"""

from __future__ import annotations

import argparse
import functools
import graphlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.docker.compose import load, read_env_file
from infra.localstack.procs import wait_until

REPO = Path(__file__).resolve().parent.parent.parent
STANDINS = REPO / "infra" / "docker" / "standins"
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
# compose.yaml's few changes for Podman (tmpfs mounts Podman makes itself).
OVERRIDE = REPO / "infra" / "docker" / "compose.podman.yaml"
# What the host trusts: the Python base takes it, so pip inside builds does too.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

# What the set-up installs: runc for the runtime, the dnsname CNI plugin for
# service-name DNS on compose's network, debootstrap for the base image.
APT_PACKAGES = (
    "podman",
    "runc",
    "debootstrap",
    "golang-github-containernetworking-plugin-dnsname",
)
SUITE = "bookworm"
BASE_IMAGE = f"localhost/debian:{SUITE}"
PYTHON_IMAGE = f"localhost/pgscale-python:{SUITE}"

# compose.yaml's image variables, pointed at what this module builds.
ENV = {
    "API_IMAGE": "localhost/pgscale-api:podman",
    "PGBOUNCER_EXPORTER_IMAGE": "localhost/pgscale-pgbouncer-exporter:podman",
    "POSTGRES_IMAGE": "localhost/pgscale-standin-postgres:podman",
    "PGBOUNCER_IMAGE": "localhost/pgscale-standin-pgbouncer:podman",
    "HAPROXY_IMAGE": "localhost/pgscale-standin-haproxy:podman",
    "POSTGRES_EXPORTER_IMAGE": "localhost/pgscale-standin-postgres-exporter:podman",
    "PROMETHEUS_IMAGE": "localhost/pgscale-standin-prometheus:podman",
}
# Stand-in Dockerfile (under STANDINS) for each upstream image variable.
STANDIN_FILES = {
    "POSTGRES_IMAGE": "postgres.Dockerfile",
    "PGBOUNCER_IMAGE": "pgbouncer.Dockerfile",
    "HAPROXY_IMAGE": "haproxy.Dockerfile",
    "POSTGRES_EXPORTER_IMAGE": "postgres-exporter.Dockerfile",
    "PROMETHEUS_IMAGE": "prometheus.Dockerfile",
}
# Services `up` leaves out: Grafana has no Debian package to stand in for its image.
# (Those under a profile, the load test's, are left out too.)
LEFT_OUT = ("grafana",)
# The service `--scale` applies to.
SCALED = "api"


def log(message: str) -> None:
    print(f"podman: {message}", file=sys.stderr, flush=True)


def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`args`, checked, output passed through unless captured."""
    return subprocess.run(args, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def quiet(*args: str, **kwargs: object) -> None:
    """`args`, checked, its output shown only when it fails (apt, debootstrap, builds)."""
    result = subprocess.run(args, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise subprocess.CalledProcessError(result.returncode, args)


def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo"]


def missing_packages() -> list[str]:
    return [
        p
        for p in APT_PACKAGES
        if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0
    ]


def wanted_containers_conf() -> str:
    """containers.conf for this machine: runc, and ulimits within the hard limits."""
    hard = subprocess.run(
        ["sh", "-c", "ulimit -Hn"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return (
        "# Written by pgscale's infra/docker/podman.py: crun cannot raise RLIMIT_NOFILE or\n"
        "# RLIMIT_NPROC here (no CAP_SYS_RESOURCE), so runc, with limits the host grants.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={hard}:{hard}", "nproc=32768:32768"]\n'
        "\n[engine]\n"
        'runtime = "runc"\n'
    )


def setup() -> None:
    """Podman and its configuration, installed and written only where missing."""
    missing = missing_packages()
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        apt = [*_sudo(), "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
        apt += ["-o", "DPkg::Lock::Timeout=600"]
        quiet(*apt, "update", "-qq")
        quiet(*apt, "install", "-y", "-qq", "--no-install-recommends", *missing)
    wanted = wanted_containers_conf()
    if not CONTAINERS_CONF.exists():
        log(f"writing {CONTAINERS_CONF}")
        run(*_sudo(), "install", "-d", str(CONTAINERS_CONF.parent))
        run(*_sudo(), "tee", str(CONTAINERS_CONF), input=wanted, stdout=subprocess.DEVNULL)
    elif CONTAINERS_CONF.read_text() != wanted:
        text = CONTAINERS_CONF.read_text()
        if 'runtime = "runc"' not in text or "default_ulimits" not in text:
            log(f"{CONTAINERS_CONF} exists and differs; left alone. It may need:\n{wanted}")


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag]).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror this machine's apt sources name (deb.debian.org otherwise)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
            uri = match[1].rstrip("/")
            if "security" not in uri and uri.startswith("http"):
                return uri
    return "http://deb.debian.org/debian"


def base_image() -> None:
    """localhost/debian:bookworm from debootstrap, unless Podman already holds it."""
    if image_exists(BASE_IMAGE):
        log(f"{BASE_IMAGE}: present")
        return
    mirror = debian_mirror()
    log(f"{BASE_IMAGE}: debootstrap --variant=minbase {SUITE} from {mirror}")
    with tempfile.TemporaryDirectory(prefix="pgscale-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        quiet(*_sudo(), "debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror)
        tar = subprocess.Popen(
            [*_sudo(), "tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        run("podman", "import", "-", BASE_IMAGE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
        run(*_sudo(), "rm", "-rf", str(rootfs))


def build(
    tag: str,
    dockerfile: Path,
    *,
    target: str | None = None,
    volumes: tuple[str, ...] = (),
    **args: str,
) -> None:
    """`podman build` from the repository root; Podman's layer cache keeps repeats quick."""
    log(f"building {tag}")
    # Docker's image format: OCI's has no HEALTHCHECK, and the replicas' is their gate.
    command = ["podman", "build", "-q", "--format", "docker", "-f", str(dockerfile), "-t", tag]
    for volume in volumes:
        command += ["--volume", volume]
    if target:
        command += ["--target", target]
    for name, value in args.items():
        command += ["--build-arg", f"{name}={value}"]
    before = image_id(tag)
    quiet(*command, str(REPO))
    if before and before != image_id(tag):
        # The image this tag named before: unnamed now, removed unless something uses it.
        subprocess.run(["podman", "rmi", before], capture_output=True)


def image_id(tag: str) -> str | None:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True
    )
    return out.stdout.strip() or None if out.returncode == 0 else None


def images() -> None:
    """Every image compose-test runs, on the debootstrap base."""
    base_image()
    trust = (f"{HOST_CA}:/run/host-ca.crt:ro",) if HOST_CA.exists() else ()
    build(PYTHON_IMAGE, STANDINS / "python.Dockerfile", volumes=trust, BASE_IMAGE=BASE_IMAGE)
    dockerfile = REPO / "infra" / "docker" / "Dockerfile"
    build(ENV["API_IMAGE"], dockerfile, target="api", PYTHON_IMAGE=PYTHON_IMAGE)
    build(
        ENV["PGBOUNCER_EXPORTER_IMAGE"],
        dockerfile,
        target="pgbouncer-exporter",
        PYTHON_IMAGE=PYTHON_IMAGE,
    )
    for variable, name in STANDIN_FILES.items():
        build(ENV[variable], STANDINS / name, BASE_IMAGE=BASE_IMAGE)


def env_file() -> dict[str, str]:
    """The project's .env, as podman-compose reads it (the environment wins)."""
    path = REPO / ".env"
    return read_env_file(path) if path.exists() else {}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's dependencies with their conditions (a plain list: service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {
        name: str((spec or {}).get("condition", "service_started")) for name, spec in deps.items()
    }


def state(container: str) -> dict[str, Any]:
    out = subprocess.run(
        ["podman", "inspect", "--format", "{{json .State}}", container],
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout)) if out.returncode == 0 else {}


def running(container: str) -> bool:
    return bool(state(container).get("Running"))


def has_healthcheck(container: str) -> bool:
    """A running container with a health check (the image's or compose's) not disabled."""
    out = subprocess.run(
        ["podman", "inspect", "--format", "{{json .Config.Healthcheck}}", container],
        capture_output=True,
        text=True,
    )
    check = json.loads(out.stdout or "null") if out.returncode == 0 else None
    test = (check or {}).get("Test") or ["NONE"]
    return test[0] != "NONE" and running(container)


def podman_compose() -> str:
    """The podman-compose next to this interpreter (the virtualenv's), else on PATH."""
    local = Path(sys.executable).parent / "podman-compose"
    found = str(local) if local.exists() else shutil.which("podman-compose")
    if not found:
        raise RuntimeError("podman-compose is not installed (make compose-test installs it)")
    return found


class Compose:
    """compose.yaml under podman-compose, brought up in the order its gates say.

    podman-compose 1.6 ignores `condition: service_healthy` on Podman before 4.6 and
    Podman runs no health-check timers without systemd, so `up` starts one service at a
    time (`--no-deps`) in the order compose.yaml's `depends_on` gives, each once its
    gates hold, polled: `podman healthcheck run` for service_healthy, the exit code for
    service_completed_successfully. `env` is
    compose's environment (passwords, ports) on top of this process's; `images` the
    image variables (`ENV`: the local builds; empty: compose's own defaults).
    """

    def __init__(
        self,
        project: str,
        env: dict[str, str],
        *,
        replicas: int = 2,
        images: dict[str, str] = ENV,
    ) -> None:
        self.project = project
        self.env = {**os.environ, **images, **env}
        self.replicas = replicas

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(REPO / "compose.yaml"), "-f", str(OVERRIDE)]
        command = [podman_compose(), "-p", self.project, *files, *args]
        return subprocess.run(
            command, env=self.env, cwd=REPO, text=True, check=check, capture_output=True
        )

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.project}_{service}_{index}"

    def containers(self, service: str | None = None) -> list[str]:
        """This project's containers (one service's, when named), by name."""
        label = [f"label=io.podman.compose.project={self.project}"]
        if service:
            label.append(f"label=com.docker.compose.service={service}")
        filters = [arg for f in label for arg in ("--filter", f)]
        out = run("podman", "ps", "-a", *filters, "--format", "{{.Names}}", capture_output=True)
        return sorted(out.stdout.split())

    def healthy(self, container: str) -> bool:
        return (
            subprocess.run(
                ["podman", "healthcheck", "run", container], capture_output=True
            ).returncode
            == 0
        )

    def wait_healthy(self, container: str, timeout: float = 180.0) -> None:
        """Polls the container's own health check, as a `service_healthy` gate would."""
        if not wait_until(lambda: self.healthy(container), timeout, interval=1.0):
            raise RuntimeError(
                f"{container} not healthy within {timeout:.0f} s\n{self.logs(container)}"
            )

    def logs(self, container: str) -> str:
        out = subprocess.run(
            ["podman", "logs", "--tail", "30", container], capture_output=True, text=True
        )
        return out.stdout + out.stderr

    def start(self, *services: str, scale: int | None = None) -> None:
        args = ["up", "-d", "--no-deps"]
        if scale is not None:
            args += ["--scale", f"{SCALED}={scale}"]
        result = self.compose(*args, *services, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"podman-compose up {' '.join(services)}: {result.stderr[-2000:]}")

    def plan(self) -> dict[str, dict[str, str]]:
        """The services `up` starts, in start order, each with its gates: the
        dependencies it waits for and the condition on each, as compose.yaml says."""
        model = load({**env_file(), **self.env})
        services = {
            name: service
            for name, service in model["services"].items()
            if name not in LEFT_OUT and not service.get("profiles")
        }
        gates = {name: depends_on(service) for name, service in services.items()}
        graph = {name: [d for d in deps if d in services] for name, deps in gates.items()}
        return {name: gates[name] for name in graphlib.TopologicalSorter(graph).static_order()}

    def gate(self, service: str, condition: str) -> None:
        """What `condition: <condition>` on `service` waits for, polled."""
        for name in self.containers(service):
            if condition == "service_healthy":
                self.wait_healthy(name)
            elif condition == "service_completed_successfully":
                code = run("podman", "wait", name, capture_output=True).stdout.strip()
                if code != "0":
                    raise RuntimeError(f"{name} exited {code}\n{self.logs(name)}")
            elif not wait_until(functools.partial(running, name), 60, 0.5):
                raise RuntimeError(f"{name} not running\n{self.logs(name)}")

    def up(self) -> None:
        """Every service but Grafana, each once the gates compose.yaml gives it hold;
        then every container with a health check healthy (`up --wait`)."""
        passed: set[tuple[str, str]] = set()
        for service, gates in self.plan().items():
            for dependency, condition in gates.items():
                if (dependency, condition) not in passed:
                    self.gate(dependency, condition)
                    passed.add((dependency, condition))
            self.start(service, scale=self.replicas if service == SCALED else None)
        for name in self.containers():
            if has_healthcheck(name):
                self.wait_healthy(name)

    def scale(self, replicas: int) -> None:
        """`--scale api=N`, then each replica's health check passing."""
        self.start(SCALED, scale=replicas)
        for index in range(1, replicas + 1):
            self.wait_healthy(self.container(SCALED, index))

    def down(self) -> None:
        """Containers, networks and volumes of the project, whatever state they are in."""
        self.compose("down", "-v", "-t", "10", check=False)
        # What `down` may leave behind: replicas beyond the file's count, a half-made stage.
        names = self.containers()
        if names:
            subprocess.run(["podman", "rm", "-f", "-v", *names], capture_output=True)
        label = f"label=io.podman.compose.project={self.project}"
        for kind in ("volume", "network"):
            listed = subprocess.run(
                ["podman", kind, "ls", "-q", "--filter", label], capture_output=True, text=True
            ).stdout.split()
            if listed:
                subprocess.run(["podman", kind, "rm", "-f", *listed], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="up/down: compose.yaml's project, settings from the environment and .env",
    )
    parser.add_argument("step", choices=["setup", "images", "all", "up", "down"])
    parser.add_argument("--standins", action="store_true", help="up: run the images `images` built")
    parser.add_argument("--project", default="pgscale", help="up/down: compose project name")
    args = parser.parse_args(argv)
    if args.step in ("setup", "all"):
        setup()
    if args.step in ("images", "all"):
        images()
    if args.step in ("up", "down"):
        replicas = int(os.environ.get("API_REPLICAS", "2"))
        stack = Compose(args.project, {}, replicas=replicas, images=ENV if args.standins else {})
        if args.step == "up":
            stack.up()
        else:
            stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
