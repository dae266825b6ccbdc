# Shared by the scripts in infra/prefect (sourced, not run).
#
# LIGHTSHEET_PREFECT_HOME  state folder of the server and worker (default: ~/.lightsheet/prefect):
#                          pid files, logs, the SQLite database, the credentials and `env`,
#                          a file that clients source to reach the server.
# PREFECT                  the prefect command (default: the checkout's .venv/bin/prefect).
# PYTHON                   a Python with prefect (default: the checkout's .venv/bin/python).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${LIGHTSHEET_PREFECT_HOME:-$HOME/.lightsheet/prefect}
PREFECT=${PREFECT:-$REPO/.venv/bin/prefect}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PREFECT" ] || PREFECT=$(command -v prefect || true)
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
[ -n "$PREFECT" ] || { echo "prefect not found: run infra/install.sh or set PREFECT" >&2; exit 1; }

# Nothing here reaches the internet; a server started here never phones home.
export PREFECT_SERVER_ANALYTICS_ENABLED=false

# State is private: every file the scripts, the server and the worker create is 0600, every
# folder 0700 (the database, logs, credentials, pid files). Secrets travel in files or the
# environment, never in a command's arguments (which every user can read in /proc).
# The caller's umask is kept for the flow runs a worker starts (their outputs are the lab's).
CALLER_UMASK=$(umask)
umask 077

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# alive PIDFILE: true when the pid file names a running process
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_group PIDFILE NAME TIMEOUT: SIGTERM the process group started under PIDFILE, wait up to
# TIMEOUT seconds, then SIGKILL what is left; remove the pid file.
stop_group() {
    local pidfile=$1 name=$2 timeout=${3:-30} pid i
    if ! alive "$pidfile"; then
        rm -f "$pidfile"
        echo "$name: not running"
        return 0
    fi
    pid=$(cat "$pidfile")
    # started with setsid: the pid is also the process group id, so children go with it
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 -- "-$pid" 2>/dev/null; then
        echo "$name: still running after ${timeout}s, killing process group $pid" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "$name: stopped (pid $pid)"
}

# load_env: the client settings written by server.sh start
load_env() {
    [ -f "$STATE/env" ] || die "no $STATE/env: start the server first (infra/prefect/server.sh start)"
    # shellcheck disable=SC1091
    . "$STATE/env"
}
