#!/usr/bin/env bash
# System packages the Prefect deployment tests need (Debian/Ubuntu, as root):
#   chromium       headless browser that opens the Prefect UI and takes screenshots
#   fonts-dejavu-core  so pages render text in the screenshot
# Skipped when chromium is already on PATH. Run by `infra/install.sh dev` as root.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "infra/prefect/install-deps.sh: needs root and apt-get; install chromium yourself" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium installed: $(chromium --version 2>/dev/null || true)"
