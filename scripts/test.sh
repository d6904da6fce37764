#!/usr/bin/env bash
# Sets everything up (idempotent, cached outside the clone) and runs every test against real
# components: the fixtures start a local Apache Kafka and PostgreSQL and stop them by pid.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
bash scripts/install-compose.sh
export PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest "$@"
