#!/usr/bin/env bash
# deploy/local/test.sh — runs Sluice's whole test suite on a fresh machine.
#
# Brings up PostgreSQL and Kafka with up.sh (installing what is missing), builds the
# binaries the end-to-end tests start, then runs every unit, store and end-to-end
# test. The services stay up afterwards (stop them with deploy/local/down.sh).
# Extra arguments go to `cargo test` (e.g. `-p sluice-e2e lifecycle`).
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$script_dir/../.." && pwd)
local_dir=${SLUICE_LOCAL_DIR:-$root/.local}
cd "$root"

"$script_dir/up.sh"
# shellcheck disable=SC1091
source "$local_dir/env"
export DATABASE_URL KAFKA_BOOTSTRAP_SERVERS

echo "[sluice-test] building binaries"
"$script_dir/build-deps.sh"
# The stripe source's tests run against stripe-mock.
"$script_dir/stripe-mock.sh"
cargo build --workspace --bins --locked
echo "[sluice-test] running tests"
# The end-to-end tests keep each process's log under target/e2e-logs; a fresh run
# starts empty so the secret check below sees this run's logs only.
e2e_logs=${SLUICE_E2E_LOG_DIR:-$root/target/e2e-logs}
rm -rf "$e2e_logs"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# With arguments (e.g. `-p sluice-e2e lifecycle`) they select what runs; without, all:
# every test, then the chaos suite (tests/tests/chaos.rs: workers killed, frozen and
# restarted, Kafka and PostgreSQL restarted mid-backfill) and the outage runbooks'
# drills (tests/tests/runbooks.rs), one test at a time so
# that nothing else competes with the faults it injects. SLUICE_SKIP_CHAOS=1 skips it;
# SLUICE_CHAOS_ROWS / _KILLS / _ROUNDS make it longer (docs/testing.md).
if [ "$#" -gt 0 ]; then
  cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
else
  cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
  if [ "${SLUICE_SKIP_CHAOS:-0}" != 1 ]; then
    echo "[sluice-test] chaos suite and outage drills"
    cargo test --locked -p sluice-e2e --test chaos --test runbooks -- --ignored --test-threads=1 2>&1 |
      tee -a "$log" || status=$?
  fi
fi
# Connector secrets the tests use all start with "e2e-secret-"; none may appear in
# any log line of any process of the run.
if [ -d "$e2e_logs" ] && leaks=$(grep -rl --include="*.log" -- "e2e-secret-" "$e2e_logs"); then
  echo "[sluice-test] secret values found in process logs:" >&2
  echo "$leaks" >&2
  status=1
else
  echo "[sluice-test] no secret value in $(find "$e2e_logs" -name '*.log' 2>/dev/null | wc -l) process logs"
fi
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
