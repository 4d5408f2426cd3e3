#!/bin/sh
# docker-entrypoint.sh of the postgres stand-in: what the official image does for
# `postgres ARGS` as a non-root user. On an empty PGDATA: initdb with POSTGRES_USER
# (postgres) and POSTGRES_PASSWORD, a server on its socket only (ARGS applied, so the
# mounted config is read), each /docker-entrypoint-initdb.d/*.sh run (executable) or
# sourced, POSTGRES_DB created when it is not postgres, that server stopped. Then exec.
set -eu
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?the postgres image needs POSTGRES_PASSWORD}"
    export POSTGRES_USER="${POSTGRES_USER:-postgres}" POSTGRES_DB="${POSTGRES_DB:-${POSTGRES_USER:-postgres}}"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    # POSTGRES_INITDB_ARGS as the official image takes them (word-split).
    # shellcheck disable=SC2086
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        ${POSTGRES_INITDB_ARGS:-} >/dev/null
    rm -f "$pwfile"
    shift
    temp_options=""
    for arg in "$@"; do temp_options="$temp_options '$arg'"; done
    pg_ctl -D "$PGDATA" -w -o "$temp_options -c listen_addresses='' -p ${PGPORT:-5432}" start >/dev/null
    if [ "$POSTGRES_DB" != postgres ]; then
        psql --no-psqlrc --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    for f in /docker-entrypoint-initdb.d/*.sh; do
        [ -e "$f" ] || continue
        echo "docker-entrypoint.sh: running $f"
        if [ -x "$f" ]; then "$f"; else . "$f"; fi
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    set -- postgres "$@"
    echo "docker-entrypoint.sh: PostgreSQL init process complete; ready for start up."
fi
exec "$@"
