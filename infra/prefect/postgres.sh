#!/usr/bin/env bash
# PostgreSQL for the Prefect server (the production option; SQLite is the default).
#
#   apt-get install --no-install-recommends postgresql     # Debian's packages, once
#   infra/prefect/postgres.sh start     # init (first time) + start on 127.0.0.1, database "prefect"
#   infra/prefect/postgres.sh stop
#   infra/prefect/postgres.sh status
#   infra/prefect/server.sh start --postgres                 # does `postgres.sh start` itself
#
# Its own cluster under $LIGHTSHEET_PREFECT_HOME/postgres (not Debian's system cluster): data,
# socket, log, and database_url (postgresql+asyncpg://prefect:<password>@127.0.0.1:<port>/prefect,
# mode 600), which server.sh passes as PREFECT_SERVER_DATABASE_CONNECTION_URL.
# Listens on loopback only, password (SCRAM) authentication. As root, the cluster runs as the
# `postgres` user that Debian's package creates.
# LIGHTSHEET_POSTGRES_PORT: port (default: a free one, kept across restarts).
# PGBIN: folder of initdb/pg_ctl (default: the newest /usr/lib/postgresql/*/bin).
set -euo pipefail
. "$(dirname "$0")/common.sh"

PG=$STATE/postgres
DATA=$PG/data
if [ -z "${PGBIN:-}" ]; then
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -n "$PGBIN" ] && [ -x "$PGBIN/pg_ctl" ] ||
    die "PostgreSQL not found (expected /usr/lib/postgresql/*/bin): apt-get install postgresql"

# as_owner CMD...: run as the cluster's owner (postgres refuses to run as root)
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local port password
    mkdir -p "$PG"
    chmod 700 "$PG"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$PG"
        # the cluster's owner must reach $PG: traversal only (no listing); every file in the
        # state folder stays 0600
        chmod 711 "$STATE"
    fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
        password=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(18))')
        port=${LIGHTSHEET_POSTGRES_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
        (umask 077 && printf '%s\n' "$password" >"$PG/password")
        [ "$(id -u)" = 0 ] && chown postgres: "$PG/password"
        as_owner "$PGBIN/initdb" -D "$DATA" -U prefect --pwfile="$PG/password" \
            --auth=scram-sha-256 --encoding=UTF8 >"$PG/initdb.log"
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "port = $port"
            echo "unix_socket_directories = '$PG'"
        } >>"$DATA/postgresql.conf"
        echo "$port" >"$PG/port"
        (umask 077 && printf 'postgresql+asyncpg://prefect:%s@127.0.0.1:%s/prefect\n' \
            "$password" "$port" >"$PG/database_url")
    fi
    port=$(cat "$PG/port")
    if ! as_owner "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_owner "$PGBIN/pg_ctl" -D "$DATA" -l "$PG/postgres.log" -w -t 60 start >/dev/null
    fi
    if ! PGPASSWORD=$(cat "$PG/password") "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U prefect \
        -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
        PGPASSWORD=$(cat "$PG/password") "$PGBIN/createdb" -h 127.0.0.1 -p "$port" -U prefect prefect
    fi
    echo "PostgreSQL running on 127.0.0.1:$port (data $DATA); URL in $PG/database_url"
}

case "${1:-}" in
    start) start ;;
    stop)
        if [ -f "$DATA/PG_VERSION" ]; then as_owner "$PGBIN/pg_ctl" -D "$DATA" -w -t 60 -m fast stop || true; fi ;;
    status) as_owner "$PGBIN/pg_ctl" -D "$DATA" status ;;
    *) echo "usage: $0 start | stop | status" >&2; exit 2 ;;
esac
