# Stands in for postgres:15-alpine from Debian's postgresql-15, with the part of its
# contract compose.yaml uses: docker-entrypoint.sh initialises an empty PGDATA with
# POSTGRES_PASSWORD, runs /docker-entrypoint-initdb.d/*.sh against a socket-only server,
# then execs its arguments; postgres and pg_isready are on PATH; the postgres user owns
# PGDATA and /var/run/postgresql; databases are UTF8.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
# The postgres user as uid/gid 70, the official Alpine images' (files they own on a
# volume keep working); Debian's packages take an existing user as theirs.
RUN groupadd --system --gid 70 postgres \
 && useradd --system --uid 70 --gid 70 --home-dir /var/lib/postgresql --no-create-home \
      --shell /bin/sh postgres \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres -m 3777 /var/run/postgresql \
 && install -d /docker-entrypoint-initdb.d
# A UTF-8 locale, as the official image's, so initdb makes UTF8 databases (with the C
# locale they would be SQL_ASCII, and clients would read text as bytes).
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
COPY infra/docker/standins/postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
