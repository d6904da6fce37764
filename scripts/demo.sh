#!/usr/bin/env bash
# Sets everything up (idempotent, cached outside the clone) and runs `flywheel demo`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
exec .venv/bin/flywheel demo "$@"
