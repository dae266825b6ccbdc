#!/usr/bin/env bash
# Stop the development SLURM cluster started by infra/slurm/start.sh: cancel its jobs, stop
# slurmd, slurmctld and munged (by the pids in the state folder). Logs stay in $dir/log.
#   bash infra/slurm/stop.sh [--quiet]
set -uo pipefail
dir="${LIGHTSHEET_SLURM_DIR:-/tmp/lightsheet-slurm}"
quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1
say() { [ "$quiet" = 1 ] || echo "$@"; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ -s "$dir/slurm.conf" ] && alive "$dir/slurmctld.pid"; then
    SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
fi
for name in slurmd slurmctld munge/munged; do
    pidfile="$dir/$name.pid"
    alive "$pidfile" || { rm -f "$pidfile"; continue; }
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop in 10 s: killing it"
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
    say "stopped $name (pid $pid)"
done
exit 0
