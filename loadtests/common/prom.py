"""The one reader of the replicas' Prometheus text: a scrape, then sums and per-pid values.

The benchmark, the sweep and the tests all ask a replica's metrics port the same few
questions (a gauge per worker pid, a counter over all workers, a histogram's `_sum` and
`_count` for one label), so they share this reader instead of each walking
`prometheus_client`'s parser its own way.

Names follow the parser: a family is the metric's name without its sample suffix (a
counter `pgscale_db_deadline_exceeded` has the sample `pgscale_db_deadline_exceeded_total`;
a histogram has `_bucket`, `_count`, `_sum`); a gauge's one sample has the family's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Scrape:
    """The samples of one reading of a metrics endpoint, by family name."""

    families: dict[str, list[Sample]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        """Parse Prometheus text; raises ValueError on text that is not."""
        families: dict[str, list[Sample]] = {}
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, []).extend(family.samples)
        return cls(families)

    @classmethod
    def get(cls, url: str, http: httpx.Client | None = None, timeout: float = 5) -> Scrape:
        """Read `url` now (through `http` with its own timeout, if given); raises
        httpx.HTTPError when it does not answer."""
        response = http.get(url) if http is not None else httpx.get(url, timeout=timeout)
        return cls.parse(response.text)

    def samples(self, family: str, suffix: str = "", **labels: str) -> list[Sample]:
        """The samples named `family + suffix` whose labels include `labels`."""
        return [
            s
            for s in self.families.get(family, [])
            if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, family: str, suffix: str = "", **labels: str) -> float:
        """Their sum: a gauge over all workers (no suffix), a counter ("_total"), a
        histogram's "_count" or "_sum"; 0 when there is none."""
        return sum(s.value for s in self.samples(family, suffix, **labels))

    def by_pid(self, family: str, suffix: str = "") -> dict[str, float]:
        """pid label -> value, for a per-worker gauge (samples without a pid left out)."""
        return {s.labels["pid"]: s.value for s in self.samples(family, suffix) if "pid" in s.labels}

    def gauges_by_pid(self, prefix: str) -> dict[str, dict[str, float]]:
        """pid -> {family: value} for every per-worker gauge whose name starts with
        `prefix` (counters' `_total` samples are not the family's name, so left out)."""
        found: dict[str, dict[str, float]] = {}
        for family in self.families:
            if family.startswith(prefix):
                for pid, value in self.by_pid(family).items():
                    found.setdefault(pid, {})[family] = value
        return found
