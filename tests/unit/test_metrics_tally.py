"""Histograms tallied in the worker and flushed equal histograms observed per request."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from service.metrics import TalliedHistogram

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def twins() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, TalliedHistogram]:
    plain_registry, tallied_registry = CollectorRegistry(), CollectorRegistry()
    plain = Histogram("latency_seconds", "x", ["route"], buckets=BUCKETS, registry=plain_registry)
    tallied = Histogram(
        "latency_seconds", "x", ["route"], buckets=BUCKETS, registry=tallied_registry
    )
    return plain_registry, plain, tallied_registry, TalliedHistogram(tallied.labels("/a"))


def test_a_flush_writes_what_observe_would_have_written() -> None:
    plain_registry, plain, tallied_registry, tally = twins()
    rng = random.Random(7)
    # Every bound exactly (a bound is inclusive), values in between, and beyond the last.
    values = [*BUCKETS, 0.0, 11.0, 1e9] + [rng.expovariate(20) for _ in range(2000)]
    for value in values:
        plain.labels("/a").observe(value)
        tally.observe(value)
    assert samples(tallied_registry) != samples(plain_registry)  # nothing written yet
    tally.flush()
    assert samples(tallied_registry) == samples(plain_registry)
    assert samples(plain_registry)[("latency_seconds_count", (("route", "/a"),))] == len(values)


def test_flushes_add_up_and_an_empty_one_writes_nothing() -> None:
    plain_registry, plain, tallied_registry, tally = twins()
    for batch in ([0.003, 0.2], [], [0.003, 7.0, 0.0004]):
        for value in batch:
            plain.labels("/a").observe(value)
            tally.observe(value)
        tally.flush()
        assert samples(tallied_registry) == samples(plain_registry)
