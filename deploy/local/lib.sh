# shellcheck shell=bash disable=SC2034  # variables are used by up.sh/down.sh
# deploy/local/lib.sh — shared settings and helpers for up.sh / down.sh.
# Sourced, not executed. Everything lives under $SLUICE_LOCAL_DIR
# (default: <repo root>/.local), which is git-ignored.

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

LOCAL_DIR=${SLUICE_LOCAL_DIR:-$REPO_ROOT/.local}
case $LOCAL_DIR in
  /*) ;;
  *) LOCAL_DIR=$PWD/$LOCAL_DIR ;;
esac
LOCAL_DIR=${LOCAL_DIR%/}
ENV_FILE=$LOCAL_DIR/env
LOCK_FILE=$LOCAL_DIR/.lock
# Marks a directory as created by these scripts (down.sh --purge checks it).
OWNER_MARKER=$LOCAL_DIR/.sluice-local

# ---- PostgreSQL -----------------------------------------------------------
PG_PORT=${SLUICE_PG_PORT:-55432}
PG_SUPERUSER=sluice
PG_PASSWORD=sluice
PG_DATABASE=sluice
PG_LINK=$LOCAL_DIR/postgres          # may be a symlink, see pg_resolve_home
PG_HOME=$PG_LINK                      # resolved (real) path, set by pg_resolve_home
PG_DATA=$PG_HOME/data
PG_LOG=$PG_HOME/postgres.log
LOCAL_DATABASE_URL="postgres://$PG_SUPERUSER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE"

# ---- Kafka ------------------------------------------------------------------
KAFKA_PORT=${SLUICE_KAFKA_PORT:-59092}
KAFKA_CONTROLLER_PORT=${SLUICE_KAFKA_CONTROLLER_PORT:-59093}
KAFKA_SSL_PORT=${SLUICE_KAFKA_SSL_PORT:-59094}   # TLS listener (same broker)
KAFKA_SASL_PORT=${SLUICE_KAFKA_SASL_PORT:-59095} # SASL_SSL listener, user "sluice" (PLAIN)
KAFKA_HOME=$LOCAL_DIR/kafka
KAFKA_LIBS=$KAFKA_HOME/libs
KAFKA_DATA=$KAFKA_HOME/data
KAFKA_LOGS=$KAFKA_HOME/logs
KAFKA_CONF=$KAFKA_HOME/server.properties
KAFKA_PID_FILE=$KAFKA_HOME/kafka.pid
KAFKA_SASL_PASSWORD_FILE=$KAFKA_HOME/sasl-sluice.password
KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
KAFKA_LOG4J=$SCRIPT_DIR/kafka/log4j2.properties
KAFKA_TOOLS_LOG4J=$SCRIPT_DIR/kafka/log4j2-tools.properties
LOCAL_KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

# ---- TLS --------------------------------------------------------------------
# A local CA; PostgreSQL and Kafka get certificates for 127.0.0.1/localhost signed by it.
TLS_DIR=$LOCAL_DIR/tls
LOCAL_CA=$TLS_DIR/ca.pem

# ---- helpers ----------------------------------------------------------------
log() { printf '[sluice-local] %s\n' "$*" >&2; }
die() { printf '[sluice-local] ERROR: %s\n' "$*" >&2; exit 1; }

is_root() { [[ $EUID -eq 0 ]]; }

# Run a command as the OS user that owns the Postgres data dir. PostgreSQL
# refuses to run as root, so as root we switch to `postgres`; otherwise we run
# as ourselves. cd / first: postgres may not be allowed into the caller's cwd.
as_pg() {
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# True if something accepts TCP connections on host:port.
port_open() {
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Directory with the PostgreSQL server binaries (initdb, pg_ctl, ...): the
# version matching an existing data dir, else the newest installed. Empty if none.
pg_bin_dir() {
  local v
  if [[ -r $PG_DATA/PG_VERSION ]]; then
    v=$(<"$PG_DATA/PG_VERSION")
    if [[ -x /usr/lib/postgresql/$v/bin/postgres ]]; then
      echo "/usr/lib/postgresql/$v/bin"
      return
    fi
  fi
  local d
  d=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1 || true)
  if [[ -n $d && -x $d/postgres ]]; then
    echo "$d"
  fi
}

# $LOCAL_DIR/postgres may be a symlink to a directory the postgres user can
# reach (see up.sh); always hand Postgres the real path.
pg_resolve_home() {
  if [[ -e $PG_LINK ]]; then
    PG_HOME=$(readlink -f "$PG_LINK")
  else
    PG_HOME=$PG_LINK
  fi
  PG_DATA=$PG_HOME/data
  PG_LOG=$PG_HOME/postgres.log
}

# Prints the pid of our Kafka broker if it is alive, else nothing.
# Checks the pid file, then falls back to scanning for a kafka.Kafka process
# started with *our* server.properties (e.g. if the pid file was lost).
kafka_pid() {
  local pid
  if [[ -r $KAFKA_PID_FILE ]]; then
    pid=$(<"$KAFKA_PID_FILE")
    if [[ $pid =~ ^[0-9]+$ ]] && kafka_is_ours "$pid"; then
      echo "$pid"
      return
    fi
  fi
  local p
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    if kafka_is_ours "$pid"; then
      echo "$pid"
      return
    fi
  done
}

kafka_is_ours() {
  local cmd
  cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
  [[ $cmd == *kafka.Kafka* && $cmd == *"$KAFKA_CONF"* ]]
}

# Serialize concurrent up/down runs on the same local dir. Long-lived children
# (postmaster, Kafka) must be started with 9>&- or they would hold the lock.
take_lock() {
  exec 9>"$LOCK_FILE"
  if ! flock -w 300 9; then
    die "timed out waiting for lock $LOCK_FILE (another up.sh/down.sh running?)"
  fi
}
