# Stands in for edoburu/pgbouncer from Debian's pgbouncer, with the part of its contract
# compose.yaml uses (it replaces the image's entrypoint): pgbouncer, sh, awk and
# pg_isready on PATH, and the image's non-root user (postgres, uid 70).
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
# The postgres user as uid/gid 70, the official Alpine images' (files they own on a
# volume keep working); Debian's packages take an existing user as theirs.
RUN groupadd --system --gid 70 postgres \
 && useradd --system --uid 70 --gid 70 --home-dir /var/lib/postgresql --no-create-home \
      --shell /bin/sh postgres \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      pgbouncer postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
USER postgres
EXPOSE 6432
CMD ["pgbouncer", "/etc/pgbouncer/pgbouncer.ini"]
