"""Prometheus targets for compose: `python -m infra.docker.targets --dir DIR --api api:9101 ...`.

infra/prometheus/prometheus.yml reads its targets from files (file_sd), so one config
serves every deployment. Under compose the replicas come and go with
`docker compose up --scale api=N`: this loop resolves the service's name in Docker's DNS
every few seconds and rewrites targets/api.json, one target per replica, labelled
`replica` with its container name (Docker's DNS answers reverse lookups with it), the
label the dashboards and alerts group by. The other jobs get one fixed target each.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger("infra.docker.targets")

TargetGroups = list[dict[str, object]]


def split_address(address: str) -> tuple[str, int]:
    """`host:port` as a pair; a missing or bad port is a ValueError naming the address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


def replica_name(ip: str) -> str:
    """The container's name for `ip` (Docker's DNS answers `name.network`), else the ip."""
    try:
        name = socket.gethostbyaddr(ip)[0]
    except OSError:
        return ip
    return name.split(".", 1)[0] or ip


def api_groups(host: str, port: int) -> TargetGroups:
    """One target group per address `host` resolves to now (none while it resolves to none)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    addresses = sorted({str(info[4][0]) for info in infos})
    return [
        {"targets": [f"{ip}:{port}"], "labels": {"replica": replica_name(ip)}} for ip in addresses
    ]


def write_groups(directory: Path, job: str, groups: TargetGroups) -> bool:
    """Write targets/<job>.json whole (Prometheus may read it any time); True if it changed."""
    path = directory / f"{job}.json"
    text = json.dumps(groups, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def refresh(directory: Path, api: tuple[str, int], static: dict[str, str]) -> None:
    """Every job's target file as of now."""
    directory.mkdir(parents=True, exist_ok=True)
    for job, address in sorted(static.items()):
        write_groups(directory, job, [{"targets": [address]}])
    groups = api_groups(*api)
    if write_groups(directory, "api", groups):
        logger.info("api targets: %d replica(s)", len(groups))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, required=True, help="the targets/ directory")
    parser.add_argument("--api", required=True, help="service name and metrics port, HOST:PORT")
    parser.add_argument(
        "--job", action="append", default=[], metavar="JOB=HOST:PORT", help="a fixed target"
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between lookups")
    parser.add_argument("--once", action="store_true", help="write the files once and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        api = split_address(args.api)
        static: dict[str, str] = {}
        for item in args.job:
            job, _, address = item.partition("=")
            split_address(address)
            static[job] = address
    except ValueError as exc:
        parser.error(str(exc))
    while True:
        refresh(args.dir, api, static)
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
