"""The fault suite: faults injected under load, every acknowledged write audited after.

`python -m tests.faults` runs all of it on a private stack and writes the report;
tests/integration/test_faults_fast.py runs a few faults inside `make test`.
"""
