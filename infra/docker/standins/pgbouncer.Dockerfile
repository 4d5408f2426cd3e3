# Stands in for edoburu/pgbouncer from Debian's pgbouncer, with the part of its contract
# compose.yaml uses (it replaces the image's entrypoint): pgbouncer, sh, awk and
# pg_isready on PATH, and a non-root user (postgres, as the image's).
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      pgbouncer postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
USER postgres
EXPOSE 6432
CMD ["pgbouncer", "/etc/pgbouncer/pgbouncer.ini"]
