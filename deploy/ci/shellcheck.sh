#!/usr/bin/env bash
# deploy/ci/shellcheck.sh — lints every shell script of deploy/, examples/ and .ci/ with shellcheck
# (settings in .shellcheckrc). Installs shellcheck from the distribution's packages when
# it is missing (needs root, as on CI machines).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

if ! command -v shellcheck >/dev/null; then
  echo "[sluice-shellcheck] installing shellcheck"
  if ! command -v apt-get >/dev/null || [[ $(id -u) != 0 ]]; then
    echo "error: shellcheck is missing; install it (e.g. apt-get install shellcheck)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q shellcheck >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q shellcheck >/dev/null; }
fi

mapfile -t scripts < <(find deploy examples .ci -type f \( -name '*.sh' -o -path .ci/run \) | sort)
shellcheck "${scripts[@]}"
echo "[sluice-shellcheck] ${#scripts[@]} scripts clean"
