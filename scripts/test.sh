#!/usr/bin/env bash
# Sets everything up (idempotent, cached outside the clone) and runs every test against real
# components: the fixtures start a local Apache Kafka and PostgreSQL and stop them by pid.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
bash scripts/install-compose.sh
# The console's browser test drives Debian's headless Chromium; install it where this runs as root on Debian.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "test: installing Debian's chromium for the console's browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "test: chromium could not be installed; the browser test will say so and skip"
fi
export PYTHONDONTWRITEBYTECODE=1
exec .venv/bin/python -m pytest "$@"
