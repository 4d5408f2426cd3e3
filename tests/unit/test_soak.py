"""The soak's arithmetic: its durations, and a growth verdict that does catch a leak."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytest

from loadtests.soak import parse_duration
from loadtests.soak_report import RSS_TOLERANCE_MB, growth


@pytest.mark.parametrize(
    ("text", "seconds"), [("30m", 1800), ("90s", 90), ("1h30m", 5400), ("45", 45)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m10", "1h 30m"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def _worker(
    pid: int, rss: Sequence[float], fds: Sequence[float], step: float = 5.0
) -> list[dict[str, str]]:
    return [
        {
            "elapsed_s": str(i * step),
            "replica": "1",
            "pid": str(pid),
            "rss_mb": str(r),
            "fds": str(f),
        }
        for i, (r, f) in enumerate(zip(rss, fds, strict=True))
    ]


def test_growth_passes_noise_and_catches_a_leak() -> None:
    """Flat RSS with noise holds; RSS climbing past the tolerance fails; so do fds."""
    n = 360  # 30 minutes at 5 s
    noise = [60 + (i % 7) * 0.3 for i in range(n)]
    leak = [60 + i * (2 * RSS_TOLERANCE_MB / n) for i in range(n)]
    fd_leak = [30 + i // 20 for i in range(n)]  # one more fd every 100 s
    rows = _worker(1, noise, [30] * n) + _worker(2, leak, [30] * n) + _worker(3, noise, fd_leak)
    fits, left = growth(rows, duration=n * 5.0)
    verdict = {(g.pid, g.series): g.ok for g in fits}
    assert verdict == {
        (1, "rss_mb"): True,
        (1, "fds"): True,
        (2, "rss_mb"): False,
        (2, "fds"): True,
        (3, "rss_mb"): True,
        (3, "fds"): False,
    }
    assert left == []


def test_growth_names_a_worker_that_left() -> None:
    rows = _worker(1, [60.0] * 100, [30.0] * 100) + _worker(2, [60.0] * 20, [30.0] * 20)
    _, left = growth(rows, duration=500.0)
    assert len(left) == 1
    assert "worker 2" in left[0]
