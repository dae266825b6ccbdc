#!/usr/bin/env bash
# Install lightsheet into ./.venv.
#   bash infra/install.sh        runtime (the pipeline, the demo)
#   bash infra/install.sh dev    + what the tests need (pytest, hypothesis, ruff, dask-image,
#                                  dask-jobqueue, ome-zarr-models)
# torch is pinned (==2.13.0): where a local CPU wheel exists (pip's find-links) it is taken;
# elsewhere pip gets the default build from PyPI, which carries CUDA on Linux GPU machines.
# On a machine with an NVIDIA GPU the `gpu` extra (CuPy, dask-cuda) is added.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "lightsheet needs Python >= 3.11 (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }

extras=()
[ "${1:-}" = "dev" ] && extras+=(dev slurm)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extras+=(gpu); fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
echo "installing lightsheet $spec into .venv ..."
.venv/bin/python -m pip install --quiet -e "$spec"
# test needs from Debian: Chromium (UI tests) and a single-node SLURM (slurm tests)
if [ "${1:-}" = "dev" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    bash infra/prefect/install-deps.sh
    bash infra/slurm/install.sh
fi
echo "done: .venv/bin/lightsheet --help"
