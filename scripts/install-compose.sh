#!/usr/bin/env bash
# Installs the Docker Compose v2 CLI plugin so that `docker compose config` can validate
# docker-compose.yml on a machine with no Docker engine (CI, this dev box).
#
# Why build it from the Go module proxy: it is the ordinary client for a Go module and the only
# registry that carries Compose v2. Debian's `docker-compose` package is Compose v1 (1.29.2, end of
# life), which rejects parts of the Compose spec that v2 accepts (the top-level `name:`), and
# PyPI's docker-compose 1.29.2 needs PyYAML<6, which has no Python 3.11 wheel (and its sdist does not
# build with Cython 3).
#
# Why not `go install .../cmd@version`: compose's go.mod has `exclude` directives, which `go install`
# refuses for a module that is not the main one; building inside the downloaded module is the
# same source and the same go.sum.
#
# The first run on a machine downloads ~500 MB of modules and compiles: 5.5 minutes on 2 busy cores.
# The binary is cached under $FLYWHEEL_CACHE, so later runs (and other clones) take well under a second.
set -euo pipefail

version=${COMPOSE_VERSION:-v2.40.3}
module=github.com/docker/compose/v2
cache=${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}/compose/$version
cached="$cache/docker-compose"
plugin_dir=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
plugin="$plugin_dir/docker-compose"

say() { echo "install-compose: $*"; }
fail() { echo "install-compose: error: $*" >&2; exit 1; }

mkdir -p "$cache"
# Another clone's run may be building the same binary: it finishes, then this run finds it cached.
exec 9>"$cache/build.lock"
flock 9

if [ ! -x "$cached" ]; then
  command -v go >/dev/null \
    || fail "Go is not installed; Compose $version needs Go >= 1.24 (https://go.dev/dl/ or your package manager), then run this again"
  say "building Docker Compose $version from the Go module proxy (first run on this machine: several minutes)"
  started=$(date +%s)
  # GOTOOLCHAIN=auto lets an older Go fetch the toolchain compose's go.mod asks for, from the same proxy.
  export GOTOOLCHAIN=${GOTOOLCHAIN:-auto} GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
  download=$(go mod download -json "$module@$version") \
    || fail "could not download $module@$version from GOPROXY=$(go env GOPROXY): $(sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' <<<"$download")"
  source_dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$download")
  [ -d "$source_dir" ] || fail "go mod download did not report a source directory for $module@$version"
  (cd "$source_dir" && go build -trimpath \
      -ldflags "-s -w -X $module/internal.Version=$version" \
      -o "$cached.partial" ./cmd) \
    || { rm -f "$cached.partial"; fail "go build of $module@$version failed (output above)"; }
  # Renamed only when complete, so an interrupted build is never taken for a cached one.
  mv "$cached.partial" "$cached"
  say "built in $(( $(date +%s) - started ))s, cached at $cached"
fi

if ! cmp -s "$cached" "$plugin" 2>/dev/null; then
  mkdir -p "$plugin_dir"
  install -m 0755 "$cached" "$plugin"
  say "installed $plugin"
fi

"$plugin" version >/dev/null || fail "$plugin does not run"
say "ready: $("$plugin" version) at $plugin (use \`docker compose\`, or run the plugin directly)"
