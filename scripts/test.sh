#!/usr/bin/env bash
# Sets everything up (idempotent, cached outside the clone) and runs every test against real
# components: the fixtures start a local Apache Kafka and PostgreSQL and stop them by pid.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
bash scripts/install-compose.sh
cache=${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}
# The console's browser test drives Debian's headless Chromium; install it where this runs as root on
# Debian, one install at a time on the machine (another clone's run may be installing it now).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (
    flock 9
    command -v chromium >/dev/null || {
      echo "test: installing Debian's chromium for the console's browser test"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    }
  ) 9>"$cache/apt.lock" || echo "test: chromium could not be installed; the browser test will say so and skip"
fi
export PYTHONDONTWRITEBYTECODE=1
# Lint and type checks first (configured in pyproject.toml): a finding fails the run in seconds, not after
# the suite. Their caches live beside the virtual environment, outside the clone (mypy: ~50 s cold, ~2 s warm).
export RUFF_CACHE_DIR="$cache/ruff" MYPY_CACHE_DIR="$cache/mypy"
check() {  # <name> <command...>: runs it and prints how long it took; a failure ends the run
  local name=$1 started=$SECONDS
  shift
  if "$@"; then
    echo "test: $name passed in $((SECONDS - started)) s"
  else
    echo "test: $name FAILED after $((SECONDS - started)) s"
    exit 1
  fi
}
check "ruff check" .venv/bin/ruff check .
check "ruff format --check" .venv/bin/ruff format --check .
check "mypy (strict on contracts/ and services/runtime/)" .venv/bin/mypy
# Tests named on the command line run as asked, in one process.
workers=${FLYWHEEL_TEST_WORKERS:-2}
if [ $# -gt 0 ] || [ "$workers" -lt 2 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# The whole suite: all but the fault tests in $workers processes, each test module in one of them (so a
# module's fixtures are built once), then the fault tests alone. Those time outages and recoveries against
# bounds (a probe answered within 2 s, a restart within a minute), which a second process on the same two
# cores stretches: run beside the rest, one of them failed on its bound.
status=0
started=$SECONDS
.venv/bin/python -m pytest -n "$workers" --dist loadfile -m "not loop and not faults" || status=$?
echo "test: all but the fault tests: $((SECONDS - started)) s in $workers processes (exit $status)"
faults_started=$SECONDS
faults_status=0
.venv/bin/python -m pytest -m faults || faults_status=$?
echo "test: the fault tests: $((SECONDS - faults_started)) s in one process (exit $faults_status); the suite: $((SECONDS - started)) s"
[ "$status" = 0 ] && [ "$faults_status" = 0 ]
