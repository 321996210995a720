#!/usr/bin/env bash
# deploy/local/down.sh — stop the Sluice processes started by stack.sh, then the
# local Kafka broker and PostgreSQL started by up.sh. Idempotent (nothing running
# => nothing to do).
#   --purge           also delete $SLUICE_LOCAL_DIR (all data, logs and cached jars).
#   --only SERVICE    stop only "kafka" or "postgres" (leaves Sluice running: an
#                     outage drill; up.sh starts it again).
# Only processes recorded/owned by this local dir are touched.
set -euo pipefail

# shellcheck source=lib.sh
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

KAFKA_STOP_TIMEOUT=${SLUICE_KAFKA_STOP_TIMEOUT:-30}

usage() { echo "usage: $0 [--purge | --only kafka|postgres]" >&2; exit 2; }

purge=0
only=
while (($#)); do
  case $1 in
    --purge) purge=1 ;;
    --only)
      [[ ${2:-} == kafka || ${2:-} == postgres ]] || usage
      only=$2
      shift
      ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
((purge)) && [[ -n $only ]] && usage

kafka_down() {
  local pid
  pid=$(kafka_pid)
  if [[ -z $pid ]]; then
    rm -f "$KAFKA_PID_FILE"
    log "Kafka not running"
    return
  fi
  log "stopping Kafka (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "Kafka did not exit within ${KAFKA_STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.5
  done
  rm -f "$KAFKA_PID_FILE"
  log "Kafka stopped"
}

pg_down() {
  pg_resolve_home
  if [[ ! -f $PG_DATA/postmaster.pid ]]; then
    log "PostgreSQL not running"
    return
  fi
  local bin
  bin=$(pg_bin_dir)
  [[ -n $bin ]] || die "$PG_DATA/postmaster.pid exists but no PostgreSQL binaries found"
  if ! as_pg "$bin/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1; then
    log "PostgreSQL not running (stale postmaster.pid)"
    return
  fi
  log "stopping PostgreSQL"
  if ! as_pg "$bin/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 60 >/dev/null; then
    log "fast shutdown failed; trying immediate"
    as_pg "$bin/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 30 >/dev/null
  fi
  log "PostgreSQL stopped"
}

purge_local_dir() {
  if [[ ! -e $LOCAL_DIR ]]; then
    return
  fi
  # Refuse to rm -rf anything that up.sh did not create.
  if [[ ! -f $OWNER_MARKER || $LOCAL_DIR == / || $LOCAL_DIR == "$REPO_ROOT" ]]; then
    die "refusing to purge $LOCAL_DIR: not created by up.sh (no $OWNER_MARKER)"
  fi
  if [[ -L $PG_LINK ]]; then
    local target
    target=$(readlink -f "$PG_LINK")
    [[ $target == /var/tmp/sluice-postgres-* ]] && rm -rf "$target"
  fi
  rm -rf "$LOCAL_DIR"
  log "purged $LOCAL_DIR"
}

if [[ ! -d $LOCAL_DIR ]]; then
  log "nothing to do: $LOCAL_DIR does not exist"
  exit 0
fi

if [[ -n $only ]]; then
  take_lock
  case $only in
    kafka) kafka_down ;;
    postgres) pg_down ;;
  esac
  exit 0
fi

# Sluice first, while the services it talks to are still up.
"$SCRIPT_DIR/stack.sh" stop || log "could not stop the Sluice processes; continuing"
take_lock
kafka_down
pg_down
if ((purge)); then
  purge_local_dir
fi
