"""The service's Server-Timing, tallied per endpoint: where the requests' time went.

Every response says how long it waited for a pooled connection (`queue`), held one
(`db`) and spent in the app (`app`), in milliseconds (service/context.py). Locust
times the whole request from the client; these tallies put the parts beside it, so a
load tester sees the knee where queueing takes over from the database.

Free of Locust: timing.py feeds it from Locust's request events; the tests read it.
Values are kept rounded to two significant digits (as Locust keeps its response
times), so a tally stays small however long the run.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PARTS = ("queue", "db", "app")
PERCENTILES = (0.5, 0.95, 0.99)
_ENTRY = re.compile(r"\s*([\w-]+)\s*(?:;([^,]*))?")
_DUR = re.compile(r"dur=([\d.]+)")


def parse(header: str | None) -> dict[str, float]:
    """The `dur` (ms) of each entry of a Server-Timing value, by name; unknown shapes skipped."""
    found: dict[str, float] = {}
    if not header:
        return found
    for entry in header.split(","):
        match = _ENTRY.match(entry)
        if match is None:
            continue
        duration = _DUR.search(match.group(2) or "")
        if duration is not None:
            found[match.group(1)] = float(duration.group(1))
    return found


def _rounded(ms: float) -> float:
    return float(f"{ms:.2g}")


def percentile(counts: Mapping[float, int], share: float) -> float | None:
    """The smallest value at or below which `share` of the counted values lie."""
    total = sum(counts.values())
    if not total:
        return None
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= share * total:
            return value
    return max(counts)


Key = tuple[str, str]  # (method, name), as Locust's stats are keyed


class Tally:
    """Counts of each part's rounded milliseconds, per endpoint."""

    def __init__(self) -> None:
        self.parts: dict[Key, dict[str, Counter[float]]] = {}

    def add(self, method: str, name: str, timing: Mapping[str, float]) -> None:
        """One response's parsed Server-Timing (a response without one adds nothing)."""
        if not timing:
            return
        parts = self.parts.get((method, name))
        if parts is None:
            parts = self.parts[(method, name)] = {part: Counter() for part in PARTS}
        for part in PARTS:
            value = timing.get(part)
            if value is not None:
                parts[part][_rounded(value)] += 1

    def percentiles(self, method: str, name: str) -> dict[str, dict[float, float | None]]:
        """Each part's percentiles for one endpoint."""
        parts = self.parts.get((method, name), {})
        return {
            part: {p: percentile(parts.get(part, Counter()), p) for p in PERCENTILES}
            for part in PARTS
        }

    def count(self, method: str, name: str) -> int:
        parts = self.parts.get((method, name))
        return sum(parts["app"].values()) if parts else 0

    def export(self) -> list[Any]:
        """A plain form of the tally, for a worker's report to the master."""
        return [
            [method, name, {part: list(counts.items()) for part, counts in parts.items()}]
            for (method, name), parts in self.parts.items()
        ]

    def merge(self, exported: Iterable[Any]) -> None:
        """Add a worker's exported tally to this one."""
        for method, name, parts in exported:
            mine = self.parts.setdefault((method, name), {part: Counter() for part in PARTS})
            for part, items in parts.items():
                for value, count in items:
                    mine[part][float(value)] += int(count)

    def clear(self) -> None:
        self.parts.clear()


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def columns() -> list[str]:
    head = ["Type", "Name", "Request Count"]
    parts = [f"{part} {int(p * 100)}%" for part in PARTS for p in PERCENTILES]
    return head + parts + [f"Locust {int(p * 100)}%" for p in PERCENTILES]


def rows(tally: Tally, locust: Mapping[Key, Mapping[float, float | None]]) -> list[list[str]]:
    """One row per endpoint: its parts' percentiles (ms), then Locust's own."""
    table = []
    for method, name in sorted(tally.parts, key=lambda key: (key[1], key[0])):
        spread = tally.percentiles(method, name)
        own = locust.get((method, name), {})
        table.append(
            [method, name, str(tally.count(method, name))]
            + [_ms(spread[part][p]) for part in PARTS for p in PERCENTILES]
            + [_ms(own.get(p)) for p in PERCENTILES]
        )
    return table


def write_csv(path: Path, tally: Tally, locust: Mapping[Key, Mapping[float, float | None]]) -> None:
    """The table as CSV, beside Locust's own (`PREFIX_server_timing.csv`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns())
        writer.writerows(rows(tally, locust))
