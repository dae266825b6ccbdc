#!/usr/bin/env bash
# Start a development SLURM cluster on this machine: one node, sized to the machine.
#   bash infra/slurm/start.sh            install the packages if needed, start, wait until idle
#   export SLURM_CONF=/tmp/lightsheet-slurm/slurm.conf    (printed at the end; also in env.sh)
# Runs munged (own key and socket), slurmctld and slurmd as root without systemd. All state,
# logs and the generated slurm.conf live in $LIGHTSHEET_SLURM_DIR (default /tmp/lightsheet-slurm).
# Idempotent: an already running cluster is left as it is. Stop it with infra/slurm/stop.sh.
#
# Settings (environment):
#   LIGHTSHEET_SLURM_DIR        state folder                       [/tmp/lightsheet-slurm]
#   LIGHTSHEET_SLURM_CPUS       CPUs of the node                   [cores available here]
#   LIGHTSHEET_SLURM_MEMORY_MB  RealMemory of the node (MiB)       [90% of MemTotal]
#   LIGHTSHEET_SLURM_PORT       slurmctld port (slurmd: port + 1) [6817]
#   LIGHTSHEET_SLURM_PARTITION  partition name                     [debug]
#   LIGHTSHEET_SLURM_TIMEOUT    seconds to wait for the node       [60]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${LIGHTSHEET_SLURM_DIR:-/tmp/lightsheet-slurm}"
conf="$dir/slurm.conf"
timeout="${LIGHTSHEET_SLURM_TIMEOUT:-60}"

if [ "$(id -u)" -ne 0 ]; then
    echo "infra/slurm/start.sh: the development cluster runs its daemons as root (uid is $(id -u))" >&2
    exit 1
fi
bash "$here/install.sh"

mkdir -p "$dir"
chmod 0700 "$dir"
# one start at a time (tests and users may race)
exec 9>"$dir/start.lock"
flock -w "$timeout" 9 || { echo "infra/slurm/start.sh: $dir/start.lock held for ${timeout}s" >&2; exit 1; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
export SLURM_CONF="$conf"

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n 1; }

if alive "$dir/munge/munged.pid" && alive "$dir/slurmctld.pid" && alive "$dir/slurmd.pid" \
    && [ "$(node_state)" != "" ]; then
    echo "SLURM already running ($(sinfo -h -N -o '%N %t %c CPUs %m MiB'))"
    echo "export SLURM_CONF=$conf"
    exit 0
fi
# half-started leftovers: stop them before starting afresh
bash "$here/stop.sh" --quiet 9>&-

cpus="${LIGHTSHEET_SLURM_CPUS:-$(nproc)}"
mem_total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
memory_mb="${LIGHTSHEET_SLURM_MEMORY_MB:-$((mem_total_mb * 9 / 10))}"
port="${LIGHTSHEET_SLURM_PORT:-6817}"
partition="${LIGHTSHEET_SLURM_PARTITION:-debug}"
host="$(hostname -s)"

mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
chmod 0700 "$dir/munge"
sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$host|g" -e "s|@NODE@|$host|g" \
    -e "s|@CTLD_PORT@|$port|g" -e "s|@D_PORT@|$((port + 1))|g" \
    -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY_MB@|$memory_mb|g" -e "s|@PARTITION@|$partition|g" \
    "$here/slurm.conf.in" >"$conf"

# munge: a key of its own, a socket in the state folder
[ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" --force
chmod 0600 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed" 9>&-

# the daemons stay in the foreground (-D) of a detached session, logs in $dir/log
setsid nohup slurmctld -D -c -f "$conf" >>"$dir/log/slurmctld.out" 2>&1 </dev/null 9>&- &
echo $! >"$dir/slurmctld.pid"
setsid nohup slurmd -D -N "$host" -f "$conf" >>"$dir/log/slurmd.out" 2>&1 </dev/null 9>&- &
echo $! >"$dir/slurmd.pid"

deadline=$((SECONDS + timeout))
state=""
while [ $SECONDS -lt $deadline ]; do
    state="$(node_state)"
    case "$state" in
        idle | mix | alloc) break ;;
        drain* | down*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle | mix | alloc) ;;
    *)
        echo "infra/slurm/start.sh: node not ready after ${timeout}s (state: '${state:-no answer}')" >&2
        tail -n 20 "$dir"/log/*.log "$dir"/log/*.out >&2 || true
        exit 1
        ;;
esac
echo "export SLURM_CONF=$conf" >"$dir/env.sh"
echo "SLURM ready: $(sinfo -h -N -o '%N %t %c CPUs %m MiB, partition %P')"
echo "export SLURM_CONF=$conf"
