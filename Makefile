# pgscale: make setup | up | down | status | test | lint
# Stack shape: make up REPLICAS=3 WORKERS=2 POOL_MAX=4 (see README.md for every variable).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# busybox: tests/integration/test_deploy.py also runs render-config with Alpine's awk.
# chromium: tests/integration/test_browser.py drives it through Playwright (no browser download).
APT_PACKAGES := postgresql-15 pgbouncer haproxy wrk prometheus prometheus-postgres-exporter \
	prometheus-process-exporter busybox chromium
EXPORTER_VENV := .venv-exporter
# prometheus-pgbouncer-exporter 2.1.2 pins these; its own psycopg2 needs a compiler, the
# binary wheel does not. It gets a virtualenv of its own so its pins touch nothing else.
# The same pins the pgbouncer-exporter image installs (infra/docker/Dockerfile).
EXPORTER_PACKAGES := $(shell grep -v '^\#' infra/docker/pgbouncer-exporter.txt)

export REPLICAS WORKERS POOL_MIN POOL_MAX

.PHONY: setup up down status test lint typecheck pytest clean sweep bench faults faults-long soak \
	capacity k8s-sync deploy-check compose-test

setup: $(STAMP)

# Debian packages when missing (as root, or through sudo), then the virtualenv.
$(STAMP): pyproject.toml infra/docker/pgbouncer-exporter.txt
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	test -x $(EXPORTER_VENV)/bin/python || $(PYTHON) -m venv $(EXPORTER_VENV)
	$(EXPORTER_VENV)/bin/pip install -q --no-deps $(EXPORTER_PACKAGES)
	touch $(STAMP)

up: setup
	$(PY) -m infra.localstack up

down: setup
	$(PY) -m infra.localstack down

status: setup
	$(PY) -m infra.localstack status

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(VENV)/bin/pytest

test: lint typecheck pytest

# The workers x replicas (x PgBouncer instances) sweep, with and without PgBouncer
# (about 12 minutes by default).
WORKERS_GRID ?= 1 2 4
REPLICAS_GRID ?= 1 2 3
INSTANCES_GRID ?= 1 2
DURATION ?= 20
sweep: setup
	$(PY) -m loadtests.sweep --workers $(WORKERS_GRID) --replicas $(REPLICAS_GRID) \
	  --instances $(INSTANCES_GRID) --duration $(DURATION)

# Throughput and latency with baselines side by side (about 11 minutes by default).
bench: setup
	$(PY) -m loadtests.bench --profile

# The capacity model (SimPy) checked against a sweep's cells and the bench's coalescing,
# then fleets of 10, 100 and 1,000 replicas, planned and naive (about 2 minutes, no
# servers); report in reports/capacity/. docs/capacity/ is
# `make capacity SWEEP=docs/capacity/sweep-2026-12-01.json`. Several sweeps of the same
# grid (SWEEP="a.json b.json c.json") are checked by each cell's median, with the spread.
CALIBRATION ?= service/calibration.json
SWEEP ?= docs/sweep/summary.json
capacity: setup
	$(PY) -m loadtests.capacity --calibration $(CALIBRATION) --sweep $(SWEEP)

# Every fault under load on a private stack, each acknowledged write audited (about 3
# minutes); report in reports/faults/. `make faults ONLY="network-cut pgbouncer-pause"`.
ONLY ?=
faults: setup
	$(PY) -m tests.faults $(if $(ONLY),--only $(ONLY))

# PgBouncer down until its pools give up past psycopg_pool's real 300 s reconnect timeout,
# then PostgreSQL down 30 s past it, no client traffic (about 12 minutes); report in
# reports/faults/long/.
faults-long: setup
	$(PY) -m tests.faults --long $(if $(ONLY),--only $(ONLY))

# Mixed Locust load on a private stack, a fault every few minutes, each worker's RSS
# and fds sampled; report in reports/soak/. `make soak DURATION=10m` (default 30m; the
# sweep's DURATION default, in seconds, is not the soak's).
SOAK_DURATION := $(if $(filter file,$(origin DURATION)),30m,$(DURATION))
soak: setup
	$(PY) -m loadtests.soak --duration $(SOAK_DURATION)

# k8s/'s PrometheusRule, written from infra/prometheus/rules/ (kustomize cannot nest them;
# every other infra/ file k8s/ uses is read in place by a kustomization in infra/).
k8s-sync: setup
	$(PY) -m infra.k8s.sync

# compose.yaml (with .env) and every k8s overlay against the connection budget.
deploy-check: setup
	$(PY) -m infra.docker.compose
	$(PY) -m infra.k8s.check

# compose.yaml's containers under Podman, end to end: Podman set up, a debootstrap
# Debian base (kept once made), the images built on it, the stack up, scaled, checked
# and removed, pass or fail (see README.md, "Under Podman"). Needs root.
PODMAN_COMPOSE := podman-compose==1.6.0
compose-test: setup
	$(VENV)/bin/pip install -q $(PODMAN_COMPOSE)
	$(PY) -m infra.docker.podman all
	PGSCALE_COMPOSE_TEST=1 $(VENV)/bin/pytest tests/compose --timeout 1200

clean: down
	rm -rf .stack
