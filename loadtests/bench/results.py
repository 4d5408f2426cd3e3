"""A run's numbers, and what the rounds make of them: medians and per-round ratios."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from loadtests.bench.plan import PAIRS, Pair, RunKey


@dataclass
class Result:
    key: RunKey
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    round: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per request, by process
    requests_per_statement: float | None = None  # coalesced endpoints, metrics on


@dataclass
class Footprint:
    """What one replica configuration's processes cost: start to ready, worker RSS."""

    start_to_ready_s: float = 0.0
    rss_rest_mib: list[float] = field(default_factory=list)
    rss_load_mib: list[float] = field(default_factory=list)


def per_request(seconds: dict[str, float], requests: int) -> dict[str, float]:
    """CPU seconds by process group -> milliseconds per request."""
    return {name: 1000 * t / max(requests, 1) for name, t in seconds.items()}


def median_of(runs: list[Result]) -> Result:
    groups = {name for r in runs for name in r.cpu_ms}
    return Result(
        key=runs[0].key,
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        non2xx=sum(r.non2xx for r in runs),
        socket_errors=sum(r.socket_errors for r in runs),
        cpu_ms={g: statistics.median(r.cpu_ms.get(g, 0.0) for r in runs) for g in sorted(groups)},
        requests_per_statement=_median_or_none([r.requests_per_statement for r in runs]),
    )


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def paired_ratios(raw: dict[RunKey, list[Result]]) -> dict[Pair, float]:
    """The median over rounds of each PAIRS ratio (rounds missing either run are skipped)."""
    medians = {}
    for pair, (top, bottom) in PAIRS.items():
        tops = {r.round: r.rps for r in raw.get(top, [])}
        bottoms = {r.round: r.rps for r in raw.get(bottom, [])}
        ratios = [tops[n] / bottoms[n] for n in tops if bottoms.get(n)]
        if ratios:
            medians[pair] = statistics.median(ratios)
    return medians
