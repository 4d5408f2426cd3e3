"""Code the scenarios share. Scenarios import `loadtests.common.scenario`, which registers the rest.

- scenario.py: defaults (host, seeded ids) and response checks, and the plugins below;
- checks.py: expected statuses, and 503s shed on purpose (counted, not failed);
- gate.py: thresholds (fail ratio, p95) turned into the exit code;
- sampler.py, sampling.py, webui.py: the connection sampler, its CSV and web UI tab;
- timing.py, server_timing.py: the service's Server-Timing per endpoint, CSV and tab;
- shapes.py: load shapes as tables of stages sized against the pools' capacity;
- hooks.py: typed registration on Locust's event hooks;
- prom.py: the one reader of the replicas' Prometheus text (bench, sweep and tests);
- poll.py: the one background poller (readings on an interval while a block runs).

sampling.py, prom.py and poll.py are free of Locust (and of gevent's monkey-patching),
so the benchmark, the sweep and the tests can import them.
"""
