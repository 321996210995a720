#!/usr/bin/env bash
# deploy/ci/deny.sh — the supply-chain check: `cargo deny check` (advisories, bans,
# licenses, sources) against deny.toml.
#
# CI machines reach only the package registries, not GitHub, so the RustSec advisory
# database comes from the snapshot archive deploy/ci/advisory-db.tar.gz (the upstream
# commit and date are in deploy/ci/advisory-db.snapshot; docs/supply-chain.md says how
# to refresh both). cargo-deny reads the database from a git checkout, so this script
# unpacks the snapshot into one under target/advisory-db first.
# Installs cargo-deny (from crates.io) when it is missing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
DENY_VERSION=0.20.2

if ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  echo "[sluice-deny] installing cargo-deny $DENY_VERSION"
  cargo install cargo-deny --locked --version "$DENY_VERSION"
fi

archive=deploy/ci/advisory-db.tar.gz
{ read -r _ commit; read -r date; } <deploy/ci/advisory-db.snapshot
# The directory name cargo-deny derives from the upstream URL in deny.toml.
db=target/advisory-db/advisory-db-3157b0e258782691
if [[ ! -f $db/.snapshot || $(<"$db/.snapshot") != "$commit" ]]; then
  rm -rf "$db"
  mkdir -p "$db"
  tar -xzf "$archive" -C "$db"
  (
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date \
      git -c user.name=sluice-ci -c user.email=ci@sluice.invalid \
      commit -q -m "rustsec advisory-db snapshot $commit"
    echo "$commit" >.snapshot
  )
fi

# --offline: no fetching of the database; the crate metadata comes from cargo's cache.
cargo fetch --locked
cargo deny --offline check
