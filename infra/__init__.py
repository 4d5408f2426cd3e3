"""Configuration for PgBouncer, PostgreSQL and haproxy, and the local stack that runs them."""
