#!/usr/bin/env bash
# A Prefect server on loopback with basic authentication.
#
#   infra/prefect/server.sh start [--port N] [--postgres]   start, wait until healthy
#   infra/prefect/server.sh stop                            stop (SIGTERM, then SIGKILL)
#   infra/prefect/server.sh status                          exit 0 when running and healthy
#
# Listens on 127.0.0.1 only (put a TLS reverse proxy in front to reach it from elsewhere).
# Port: --port, else LIGHTSHEET_PREFECT_PORT, else a free port picked at start.
# Credentials: PREFECT_SERVER_API_AUTH_STRING ("user:password"), else the ones saved in
# $LIGHTSHEET_PREFECT_HOME/auth, else generated once (admin:<random>) and saved there (mode 600).
# Database: SQLite in $LIGHTSHEET_PREFECT_HOME/prefect.db; --postgres starts the PostgreSQL of
# infra/prefect/postgres.sh (Debian's packages) and uses it; PREFECT_SERVER_DATABASE_CONNECTION_URL
# set by you wins over both.
# Writes $LIGHTSHEET_PREFECT_HOME/{server.pid,server.port,server.log,env}; clients run
#   . ~/.lightsheet/prefect/env     (PREFECT_API_URL and PREFECT_API_AUTH_STRING)
# LIGHTSHEET_PREFECT_START_TIMEOUT: seconds to wait for health (default 180).
set -euo pipefail
. "$(dirname "$0")/common.sh"

PIDFILE=$STATE/server.pid

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# http_status URL [AUTH]: the HTTP status of a GET (000 when nothing answers); the credentials
# go to Python in its environment, not in its arguments
http_status() {
    HTTP_AUTH="${2:-}" "$PYTHON" - "$1" <<'EOF'
import base64, os, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if os.environ.get("HTTP_AUTH"):
    auth = os.environ["HTTP_AUTH"].encode()
    req.add_header("Authorization", "Basic " + base64.b64encode(auth).decode())
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("000")
EOF
}

start() {
    local port="${LIGHTSHEET_PREFECT_PORT:-}" postgres=0 auth db_url timeout i code
    while [ $# -gt 0 ]; do
        case $1 in
            --port) port=$2; shift 2 ;;
            --postgres) postgres=1; shift ;;
            *) die "start: unknown option $1 (expected --port N or --postgres)" ;;
        esac
    done
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    if alive "$PIDFILE"; then
        die "a server is already running (pid $(cat "$PIDFILE"), port $(cat "$STATE/server.port")); stop it first"
    fi
    [ -n "$port" ] || port=$(free_port)
    [[ $port =~ ^[0-9]+$ ]] || die "port must be a number; got '$port'"

    if [ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]; then
        auth=$PREFECT_SERVER_API_AUTH_STRING
    elif [ -s "$STATE/auth" ]; then
        auth=$(cat "$STATE/auth")
    else
        auth="admin:$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(18))')"
    fi
    [[ $auth == *:* ]] || die "PREFECT_SERVER_API_AUTH_STRING must look like user:password"
    (umask 077 && printf '%s\n' "$auth" >"$STATE/auth")

    if [ -n "${PREFECT_SERVER_DATABASE_CONNECTION_URL:-}" ]; then
        db_url=$PREFECT_SERVER_DATABASE_CONNECTION_URL
    elif [ "$postgres" = 1 ]; then
        bash "$(dirname "$0")/postgres.sh" start
        db_url=$(cat "$STATE/postgres/database_url")
    else
        db_url="sqlite+aiosqlite:///$STATE/prefect.db"
    fi

    local url="http://127.0.0.1:$port/api"
    echo "$port" >"$STATE/server.port"
    # setsid: the server and its children form one process group that stop ends together
    PREFECT_HOME="$STATE/home" \
        PREFECT_SERVER_API_HOST=127.0.0.1 \
        PREFECT_SERVER_API_PORT="$port" \
        PREFECT_SERVER_API_AUTH_STRING="$auth" \
        PREFECT_SERVER_DATABASE_CONNECTION_URL="$db_url" \
        PREFECT_UI_API_URL="$url" \
        PREFECT_API_URL="$url" \
        PREFECT_API_AUTH_STRING="$auth" \
        setsid "$PREFECT" server start --host 127.0.0.1 --port "$port" \
        </dev/null >"$STATE/server.log" 2>&1 &
    echo $! >"$PIDFILE"

    {
        printf 'export PREFECT_API_URL=%q\n' "$url"
        printf 'export PREFECT_API_AUTH_STRING=%q\n' "$auth"
        printf 'export PREFECT_SERVER_ANALYTICS_ENABLED=false\n'
    } >"$STATE/env.tmp"
    chmod 600 "$STATE/env.tmp"
    mv "$STATE/env.tmp" "$STATE/env"

    timeout=${LIGHTSHEET_PREFECT_START_TIMEOUT:-180}
    for ((i = 0; i < timeout * 2; i++)); do
        alive "$PIDFILE" || { tail -n 30 "$STATE/server.log" >&2; die "the server exited; log: $STATE/server.log"; }
        code=$(http_status "$url/health")
        [ "$code" = 200 ] && break
        sleep 0.5
    done
    if [ "$code" != 200 ]; then
        stop_group "$PIDFILE" server 30 >&2
        die "no healthy server on $url after ${timeout}s; log: $STATE/server.log"
    fi
    # the API must refuse anonymous requests and accept the credentials (000: still busy)
    for ((i = 0; i < 20; i++)); do
        code=$(http_status "$url/admin/version")
        [ "$code" = 000 ] || break
        sleep 1
    done
    [ "$code" = 401 ] || { stop_group "$PIDFILE" server 30 >&2; die "expected 401 without credentials, got $code"; }
    for ((i = 0; i < 20; i++)); do
        code=$(http_status "$url/admin/version" "$auth")
        [ "$code" = 000 ] || break
        sleep 1
    done
    [ "$code" = 200 ] || { stop_group "$PIDFILE" server 30 >&2; die "credentials refused ($code)"; }
    echo "Prefect server running (pid $(cat "$PIDFILE")): UI http://127.0.0.1:$port  API $url"
    echo "credentials in $STATE/auth; clients: . $STATE/env"
}

status() {
    alive "$PIDFILE" || { echo "server: not running"; return 1; }
    local port code
    port=$(cat "$STATE/server.port")
    code=$(http_status "http://127.0.0.1:$port/api/health")
    echo "server: pid $(cat "$PIDFILE"), http://127.0.0.1:$port, health $code"
    [ "$code" = 200 ]
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop_group "$PIDFILE" server "${LIGHTSHEET_PREFECT_STOP_TIMEOUT:-30}" ;;
    status) status ;;
    *) echo "usage: $0 start [--port N] [--postgres] | stop | status" >&2; exit 2 ;;
esac
