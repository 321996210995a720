#!/usr/bin/env bash
# deploy/local/stripe-mock.sh — installs stripe-mock (Stripe's own mock of its API, a
# Go program) into .local/bin for the stripe source's end-to-end tests, unless it is
# there already. Needs Go and the Go module proxy.
set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$script_dir/../.." && pwd)
local_dir=${SLUICE_LOCAL_DIR:-$root/.local}
version=v0.203.0
bin="$local_dir/bin/stripe-mock"
if [[ -x "$bin" ]] && [[ "$(cat "$bin.version" 2>/dev/null)" == "$version" ]]; then
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "[sluice-stripe-mock] go is not installed: install Go, then run again" >&2
  exit 1
fi
echo "[sluice-stripe-mock] installing stripe-mock $version"
mkdir -p "$local_dir/bin"
GOBIN="$local_dir/bin" go install "github.com/stripe/stripe-mock@$version"
echo "$version" >"$bin.version"
