#!/bin/sh
# The roles and database of an in-container PostgreSQL (compose; the k8s in-cluster
# option), as the local stack makes them (infra/localstack/stack.py): the application
# role owns its database and is no superuser, the exporter's role has pg_monitor only,
# and both log in with SCRAM passwords.
#
# The postgres image runs this from /docker-entrypoint-initdb.d once, on an empty data
# directory, through its local socket. It is safe to run again (roles are created or
# updated), e.g. by hand after a password change, or by an operator against an external
# server: PGHOST=... POSTGRES_USER=... sh postgres-init.sh
#
# Environment: APP_USER, APP_PASSWORD, APP_DATABASE, EXPORTER_USER, EXPORTER_PASSWORD;
# POSTGRES_USER and POSTGRES_DB (the image's) say whom to connect as.
# The image sources this file without `set -u`, so missing variables are checked here.
set -e
: "${APP_USER:?}" "${APP_PASSWORD:?}" "${APP_DATABASE:?}" "${EXPORTER_USER:?}" "${EXPORTER_PASSWORD:?}"

psql --no-psqlrc --set ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    --set app_user="$APP_USER" --set app_password="$APP_PASSWORD" \
    --set app_database="$APP_DATABASE" \
    --set exporter_user="$EXPORTER_USER" --set exporter_password="$EXPORTER_PASSWORD" <<'SQL'
SET password_encryption = 'scram-sha-256';

SELECT format('CREATE ROLE %I', :'app_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_user') \gexec
ALTER ROLE :"app_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';

SELECT format('CREATE DATABASE %I OWNER %I', :'app_database', :'app_user')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'app_database') \gexec
REVOKE ALL ON DATABASE :"app_database" FROM PUBLIC;
-- The owner keeps CONNECT and its public schema, not new schemas or temp tables.
REVOKE CREATE, TEMPORARY ON DATABASE :"app_database" FROM :"app_user";

SELECT format('CREATE ROLE %I', :'exporter_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'exporter_user') \gexec
ALTER ROLE :"exporter_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'exporter_password';
GRANT pg_monitor TO :"exporter_user";
SQL
