"""Tests against real PostgreSQL, PgBouncer, gunicorn replicas and stacks."""
