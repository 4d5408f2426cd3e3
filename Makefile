# pgscale: make setup | up | down | status | test | lint
# Stack shape: make up REPLICAS=3 WORKERS=2 POOL_MAX=4 (see README.md for every variable).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := postgresql-15 pgbouncer haproxy wrk

export REPLICAS WORKERS POOL_MIN POOL_MAX

.PHONY: setup up down status test lint typecheck pytest clean

setup: $(STAMP)

# Debian packages when missing (as root, or through sudo), then the virtualenv.
$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
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

clean: down
	rm -rf .stack
