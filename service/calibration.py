"""What a request costs, measured: the calibration the planner and the simulation read.

`make bench` derives it (loadtests/bench/calibration.py) from CPU per request by
process, with coalescing off (one statement per request) and on (many requests per
statement). Two points give each process's cost as `per_request + per_statement / k`
at k requests per statement: the HTTP side is paid per request, the database path once
per statement. The shipped default, service/calibration.json, is a documented run on
the 2-core machine this project is built on (its `source` says which).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.json"

Kind = Literal["read", "list", "write"]
KINDS: tuple[Kind, ...] = ("read", "list", "write")
PROCESSES = ("worker", "pgbouncer", "postgres")


@dataclass(frozen=True)
class Cost:
    """CPU milliseconds one process spends: per request, and per statement it runs."""

    per_request: float
    per_statement: float

    def at(self, k: float = 1.0) -> float:
        """CPU ms per request when k requests share a statement."""
        return self.per_request + self.per_statement / max(k, 1.0)

    def statement(self, k: float = 1.0) -> float:
        """CPU ms per statement serving k requests."""
        return self.per_statement + self.per_request * max(k, 1.0)


@dataclass(frozen=True)
class Calibration:
    """Costs by process and kind of request, and the coalescing the bench saw.

    `costs[process][kind]`: process is worker, pgbouncer or postgres; kind is read
    (GET /items/{id}), list (GET /items?limit=20, never coalesced) or write (POST /visits).
    `requests_per_statement`: GET /items/{id} as deployed, by wrk connections, on one
    replica of `bench_workers` workers with pools of `bench_pool`.
    """

    source: str
    machine_cores: int
    bench_workers: int
    bench_pool: int
    costs: dict[str, dict[str, Cost]]
    load_generator_ms: float  # wrk, per request
    per_worker_rps: dict[str, float]  # measured here at saturation, coalescing off
    requests_per_statement: dict[int, float] = field(default_factory=dict)

    def cost(self, process: str, kind: Kind) -> Cost:
        return self.costs[process][kind]

    def mix(self, process: str, write_ratio: float, k: float = 1.0) -> float:
        """CPU ms per request of `process` for a read/write mix."""
        read = self.cost(process, "read").at(k)
        write = self.cost(process, "write").at(k)
        return (1 - write_ratio) * read + write_ratio * write

    def statements_per_core(self, process: str, write_ratio: float) -> float:
        """Statements/s one core of `process` runs, one request per statement."""
        return 1000 / self.mix(process, write_ratio)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["requests_per_statement"] = {
            str(c): k for c, k in sorted(self.requests_per_statement.items())
        }
        return data

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")


def load(path: Path = DEFAULT_CALIBRATION) -> Calibration:
    """A calibration file (a ValueError names what is missing or wrong)."""
    try:
        data = json.loads(path.read_text())
        return Calibration(
            source=str(data["source"]),
            machine_cores=int(data["machine_cores"]),
            bench_workers=int(data["bench_workers"]),
            bench_pool=int(data["bench_pool"]),
            costs={
                process: {
                    kind: Cost(float(c["per_request"]), float(c["per_statement"]))
                    for kind, c in data["costs"][process].items()
                }
                for process in PROCESSES
            },
            load_generator_ms=float(data["load_generator_ms"]),
            per_worker_rps={k: float(v) for k, v in data["per_worker_rps"].items()},
            requests_per_statement={
                int(c): float(k) for c, k in data.get("requests_per_statement", {}).items()
            },
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"calibration {path}: {exc!r}") from exc
