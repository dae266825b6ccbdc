#!/usr/bin/env bash
# Install the Debian packages of the development SLURM cluster (munge, slurmctld, slurmd,
# slurm-client). Idempotent: does nothing when they are installed. Needs root and apt-get.
#   bash infra/slurm/install.sh
# Start the cluster with infra/slurm/start.sh, stop it with infra/slurm/stop.sh.
set -euo pipefail

missing=()
for cmd in munged mungekey slurmctld slurmd sbatch squeue scancel sinfo; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "infra/slurm/install.sh: missing ${missing[*]}; installing needs root and apt-get" \
        "(found uid $(id -u), apt-get $(command -v apt-get || echo absent))" >&2
    exit 1
fi

echo "installing munge and SLURM (Debian packages) ..."
export DEBIAN_FRONTEND=noninteractive
# no init system here: keep the packages' scripts from starting services (start.sh does)
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
echo "installed: $(slurmctld -V), $(munged -V 2>&1 | head -n 1)"
