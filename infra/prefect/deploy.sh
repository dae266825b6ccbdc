#!/usr/bin/env bash
# Create the work pool and deploy everything in deployments/prefect.yaml to the running server.
#
#   LIGHTSHEET_DATA_ROOTS=/data LIGHTSHEET_LANDING=/data/incoming infra/prefect/deploy.sh
#
# LIGHTSHEET_DATA_ROOTS: folders (`:`-separated, absolute) beneath which API-triggered runs may
# read and write (required): a deployment setting, not a run parameter (docs/security.md).
# LIGHTSHEET_CLUSTER_ADDRESS / LIGHTSHEET_CLUSTER_JOBQUEUE: the only scheduler address /
# dask-jobqueue file runs may use (optional; unset: runs may use neither).
# LIGHTSHEET_LANDING: the folder watch-incoming scans (required, beneath a data root; taken when
# you deploy; change it later in the UI or by deploying again).
# Reaches the server with $LIGHTSHEET_PREFECT_HOME/env (written by server.sh start) unless
# PREFECT_API_URL is already set.
# LIGHTSHEET_POOL: work pool name (default lightsheet, as in prefect.yaml).
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ -n "${PREFECT_API_URL:-}" ] || load_env
[ -n "${LIGHTSHEET_LANDING:-}" ] || die "set LIGHTSHEET_LANDING to the folder watch-incoming scans"
[ -n "${LIGHTSHEET_DATA_ROOTS:-}" ] ||
    die "set LIGHTSHEET_DATA_ROOTS to the folders (':'-separated) runs may read and write beneath"
POOL=${LIGHTSHEET_POOL:-lightsheet}

"$PYTHON" "$(dirname "$0")/pool.py" "$POOL"
cd "$REPO/deployments"
# --no-prompt: never wait for an answer (scripts, CI)
"$PREFECT" --no-prompt deploy --all
"$PYTHON" strict_parameters.py
