"""pgscale: a FastAPI service on PostgreSQL behind PgBouncer in transaction mode."""
