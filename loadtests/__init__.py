"""Locust scenarios against the service, one per file; shared code lives in loadtests.common.

Run from the repository root (Locust puts the working directory on sys.path):

    .venv/bin/locust -f loadtests/browse.py                      # web UI on :8089
    .venv/bin/locust --config loadtests/locust.conf -f loadtests/visits.py --headless
    .venv/bin/python -m loadtests.crud                           # one user, for debugging
"""
