#!/usr/bin/env bash
# A Prefect worker of the process work pool `lightsheet` that runs flows from this checkout.
#
#   infra/prefect/worker.sh start [--limit N]   create the pool if needed, start, wait until online
#   infra/prefect/worker.sh stop
#   infra/prefect/worker.sh status
#
# Reaches the server with $LIGHTSHEET_PREFECT_HOME/env (server.sh start writes it) unless
# PREFECT_API_URL is already set. LIGHTSHEET_POOL: pool name (default lightsheet).
# --limit: flow runs at once (default 1: each pipeline run uses the whole machine).
# Writes $LIGHTSHEET_PREFECT_HOME/{worker.pid,worker.log}; the flow runs' Prefect results go to
# $LIGHTSHEET_PREFECT_HOME/storage (private) unless PREFECT_LOCAL_STORAGE_PATH is set.
# LIGHTSHEET_HOME (the checkout) is set for the runs: the deployments' pull step starts them there.
set -euo pipefail
. "$(dirname "$0")/common.sh"

PIDFILE=$STATE/worker.pid
POOL=${LIGHTSHEET_POOL:-lightsheet}

start() {
    local limit=1 timeout
    while [ $# -gt 0 ]; do
        case $1 in
            --limit) limit=$2; shift 2 ;;
            *) die "start: unknown option $1 (expected --limit N)" ;;
        esac
    done
    [ -n "${PREFECT_API_URL:-}" ] || load_env
    mkdir -p "$STATE"
    if alive "$PIDFILE"; then die "a worker is already running (pid $(cat "$PIDFILE")); stop it first"; fi
    "$PYTHON" "$(dirname "$0")/pool.py" "$POOL"
    name="lightsheet-$(hostname)-$$"
    : >"$STATE/worker.log"  # created private; the worker and its flow runs get the caller's umask
    # Prefect's results of the flow runs (their parameters, states) stay in the private state
    mkdir -p "$STATE/storage"
    (
        umask "$CALLER_UMASK"
        PREFECT_LOCAL_STORAGE_PATH=${PREFECT_LOCAL_STORAGE_PATH:-$STATE/storage} \
            LIGHTSHEET_HOME=$REPO PATH="$(dirname "$PYTHON"):$PATH" \
            exec setsid "$PREFECT" worker start --pool "$POOL" --type process --limit "$limit" \
            --name "$name" </dev/null >>"$STATE/worker.log" 2>&1
    ) &
    echo $! >"$PIDFILE"
    timeout=${LIGHTSHEET_PREFECT_START_TIMEOUT:-180}
    if ! "$PYTHON" "$(dirname "$0")/pool.py" "$POOL" --wait-worker "$name" --timeout "$timeout" --pid "$(cat "$PIDFILE")"; then
        tail -n 30 "$STATE/worker.log" >&2
        stop_group "$PIDFILE" worker 30 >&2
        die "no worker online in pool $POOL after ${timeout}s; log: $STATE/worker.log"
    fi
    echo "worker running (pid $(cat "$PIDFILE")) in pool $POOL; log: $STATE/worker.log"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop_group "$PIDFILE" worker "${LIGHTSHEET_PREFECT_STOP_TIMEOUT:-30}" ;;
    status) if alive "$PIDFILE"; then echo "worker: pid $(cat "$PIDFILE")"; else echo "worker: not running"; exit 1; fi ;;
    *) echo "usage: $0 start [--limit N] | stop | status" >&2; exit 2 ;;
esac
