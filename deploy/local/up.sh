#!/usr/bin/env bash
# deploy/local/up.sh — bring up local PostgreSQL and a single-node Apache Kafka
# (KRaft, broker+controller in one JVM) for Sluice development and tests.
#
# Idempotent: re-running while everything is up only prints the endpoints.
# All state lives under $SLUICE_LOCAL_DIR (default <repo>/.local). Writes
# $SLUICE_LOCAL_DIR/env, which exports DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS.
# If DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS are already set (to something other
# than our local endpoints), that service is skipped and the given value used.
# See deploy/local/README.md.
set -euo pipefail

# shellcheck source=lib.sh
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

KAFKA_DEFAULT_VERSION=4.1.1
KAFKA_FALLBACK_VERSION=4.0.1
KAFKA_START_TIMEOUT=${SLUICE_KAFKA_START_TIMEOUT:-90}
KAFKA_HEAP_OPTS=${SLUICE_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}

APT_UPDATED=0
apt_install() {
  is_root || die "need to install '$*' but not running as root; install it and re-run"
  command -v apt-get >/dev/null || die "need '$*' but apt-get is unavailable; install it and re-run"
  export DEBIAN_FRONTEND=noninteractive
  if [[ $APT_UPDATED -eq 0 ]]; then
    log "apt-get update"
    apt-get update -qq </dev/null >/dev/null
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

# ============================================================================
# PostgreSQL
# ============================================================================

# postmaster.pid line 1 is the pid, line 4 the port.
pg_pidfile_field() {
  sed -n "${1}p" "$PG_DATA/postmaster.pid" 2>/dev/null || true
}

# Fast check: our postmaster is alive, on $PG_PORT, and accepting connections.
pg_running() {
  local bin pid
  bin=$(pg_bin_dir)
  [[ -n $bin && -f $PG_DATA/postmaster.pid ]] || return 1
  pid=$(pg_pidfile_field 1)
  [[ $pid =~ ^[0-9]+$ && -e /proc/$pid ]] || return 1
  [[ $(pg_pidfile_field 4) == "$PG_PORT" ]] || return 1
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 3 >/dev/null 2>&1
}

pg_ensure_installed() {
  if [[ -z $(pg_bin_dir) ]]; then
    apt_install postgresql
    [[ -n $(pg_bin_dir) ]] || die "PostgreSQL install did not provide /usr/lib/postgresql/*/bin/postgres"
  fi
  if is_root; then
    id postgres >/dev/null 2>&1 || die "OS user 'postgres' missing (normally created by the postgresql package)"
    command -v runuser >/dev/null || die "runuser (util-linux) is required to run PostgreSQL as 'postgres'"
  fi
}

# Create $LOCAL_DIR/postgres owned by the user that runs Postgres. If that user
# cannot reach it (e.g. the repo lives under /root, mode 700), keep the real
# directory under /var/tmp and leave a symlink in $LOCAL_DIR.
pg_prepare_home() {
  pg_resolve_home
  if ! is_root; then
    mkdir -p "$PG_HOME"
    return
  fi
  mkdir -p "$PG_HOME"
  chown postgres:postgres "$PG_HOME"
  chmod 700 "$PG_HOME"
  if ! as_pg test -w "$PG_HOME/."; then
    [[ -L $PG_LINK ]] && die "user postgres cannot write $PG_HOME (target of $PG_LINK)"
    rmdir "$PG_LINK" 2>/dev/null || die "user postgres cannot access $PG_LINK and it is not empty"
    local alt
    alt=/var/tmp/sluice-postgres-$(printf '%s' "$LOCAL_DIR" | sha256sum | cut -c1-12)
    log "user postgres cannot traverse $LOCAL_DIR; keeping Postgres data in $alt (symlinked)"
    mkdir -p "$alt"
    chown postgres:postgres "$alt"
    chmod 700 "$alt"
    ln -sfn "$alt" "$PG_LINK"
    pg_resolve_home
  fi
}

pg_socket_dir() {
  # Unix socket paths are limited to ~107 bytes; fall back to /tmp if needed.
  local sock="$PG_DATA/.s.PGSQL.$PG_PORT"
  if ((${#sock} > 100)); then
    echo /tmp
  else
    echo "$PG_DATA"
  fi
}

pg_init() {
  local bin=$1 pwfile
  log "initdb $PG_DATA (superuser '$PG_SUPERUSER', trust auth on loopback)"
  pwfile=$PG_HOME/.pwfile
  printf '%s\n' "$PG_PASSWORD" >"$pwfile"
  is_root && chown postgres:postgres "$pwfile"
  chmod 600 "$pwfile"
  if ! as_pg "$bin/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=trust --encoding=UTF8 --no-locale \
    >"$PG_HOME/initdb.log" 2>&1; then
    rm -f "$pwfile"
    tail -n 30 "$PG_HOME/initdb.log" >&2 || true
    die "initdb failed (full log: $PG_HOME/initdb.log)"
  fi
  rm -f "$pwfile"
  # Per-start settings (port, listen address, socket dir) go to sluice.conf,
  # rewritten by every up.sh so changed ports take effect.
  cat >>"$PG_DATA/postgresql.conf" <<'EOF'

# ---- added by deploy/local/up.sh ----
max_connections = 300            # tests create many pools
log_line_prefix = '%m [%p] %q%u@%d '
include_if_exists = 'sluice.conf'
EOF
}

# The local CA ($LOCAL_CA) and certificates signed by it, so that clients can ask
# for TLS (PostgreSQL: sslmode=verify-full&sslrootcert=$LOCAL_CA; Kafka: the SSL
# listener). Plain connections keep working. Skipped, with a note, without openssl.
ensure_local_ca() {
  [[ -s $LOCAL_CA && -s $TLS_DIR/ca.key ]] && return 0
  if ! command -v openssl >/dev/null 2>&1; then
    log "openssl not found; PostgreSQL and Kafka run without TLS"
    return 1
  fi
  mkdir -p "$TLS_DIR"
  chmod 755 "$TLS_DIR"
  log "creating the local CA $LOCAL_CA"
  (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -days 3650 \
    -subj "/CN=sluice local CA" -keyout "$TLS_DIR/ca.key" -out "$LOCAL_CA.tmp") >/dev/null 2>&1 ||
    { log "could not create the local CA; running without TLS"; return 1; }
  chmod 644 "$LOCAL_CA.tmp"
  mv "$LOCAL_CA.tmp" "$LOCAL_CA"
}

# issue_cert NAME: $TLS_DIR/NAME.crt and NAME.key for 127.0.0.1 and localhost.
issue_cert() {
  local name=$1 dir=$TLS_DIR
  [[ -s $dir/$name.crt && -s $dir/$name.key ]] && return 0
  ensure_local_ca || return 1
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >"$dir/$name.ext"
  if ! (umask 077 &&
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$dir/$name.key" -out "$dir/$name.csr" &&
    openssl x509 -req -in "$dir/$name.csr" -CA "$LOCAL_CA" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 3650 -extfile "$dir/$name.ext" -out "$dir/$name.crt") >/dev/null 2>&1; then
    log "could not create a certificate for $name; it runs without TLS"
    rm -f "$dir/$name.key" "$dir/$name.crt"
    return 1
  fi
  rm -f "$dir/$name.csr" "$dir/$name.ext"
  log "issued a TLS certificate for $name ($dir/$name.crt)"
}

pg_ensure_tls_files() {
  issue_cert postgres || return 1
  install -m 600 "$TLS_DIR/postgres.key" "$PG_DATA/server.key"
  install -m 644 "$TLS_DIR/postgres.crt" "$PG_DATA/server.crt"
  is_root && chown postgres:postgres "$PG_DATA/server.key" "$PG_DATA/server.crt"
  return 0
}

# The broker's keystore (PKCS12, random password kept beside it).
kafka_ensure_keystore() {
  issue_cert kafka || return 1
  local p12=$TLS_DIR/kafka.p12 pass=$TLS_DIR/kafka.p12.pass
  [[ -s $p12 && -s $pass ]] && return 0
  (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$pass")
  (umask 077 && openssl pkcs12 -export -in "$TLS_DIR/kafka.crt" -inkey "$TLS_DIR/kafka.key" \
    -name kafka -out "$p12" -passout "file:$pass") >/dev/null 2>&1 ||
    { log "could not create the Kafka keystore; Kafka runs without TLS"; rm -f "$p12"; return 1; }
}

pg_write_runtime_conf() {
  local conf=$PG_DATA/sluice.conf
  cat >"$conf" <<EOF
# Written by deploy/local/up.sh on every start; edits will be overwritten.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$(pg_socket_dir)'
EOF
  if pg_ensure_tls_files; then
    printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" >>"$conf"
  fi
  is_root && chown postgres:postgres "$conf"
  return 0
}

pg_ensure_database() {
  local bin=$1 exists
  exists=$("$bin/psql" -X -At -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres \
    -c "select 1 from pg_database where datname = '$PG_DATABASE'")
  if [[ $exists != 1 ]]; then
    log "creating database '$PG_DATABASE'"
    "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" "$PG_DATABASE"
  fi
}

pg_status() {
  as_pg "$1/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1
}

pg_stop() {
  as_pg "$1/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 60 >/dev/null ||
    die "could not stop the running PostgreSQL (data dir $PG_DATA)"
}

pg_up() {
  pg_resolve_home
  if pg_running; then
    log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
    pg_ensure_database "$(pg_bin_dir)"
    return
  fi
  pg_ensure_installed
  pg_prepare_home
  local bin
  bin=$(pg_bin_dir)
  if [[ ! -s $PG_DATA/PG_VERSION ]]; then
    [[ -d $PG_DATA ]] && rm -rf "$PG_DATA" # leftovers of a failed initdb
    pg_init "$bin"
    bin=$(pg_bin_dir)
  fi
  if pg_status "$bin"; then
    local port
    port=$(pg_pidfile_field 4)
    if [[ $port != "$PG_PORT" ]]; then
      log "PostgreSQL is running on port ${port:-?}, not $PG_PORT; restarting it"
      pg_stop "$bin"
    else
      # Starting up / in crash recovery, or a just-killed postmaster that
      # has not been reaped yet: give it time to become ready or go away.
      local deadline=$((SECONDS + 60))
      while pg_status "$bin" && ((SECONDS < deadline)); do
        if pg_running; then
          log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
          pg_ensure_database "$bin"
          return
        fi
        sleep 0.5
      done
      if pg_status "$bin"; then
        log "PostgreSQL running but not accepting connections; restarting it"
        pg_stop "$bin"
      fi
    fi
  fi
  if port_open 127.0.0.1 "$PG_PORT"; then
    die "port $PG_PORT is already in use by another process; set SLUICE_PG_PORT or DATABASE_URL"
  fi
  pg_write_runtime_conf
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
  # 9>&-: do not let the postmaster inherit (and hold forever) our lock fd.
  if ! as_pg "$bin/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t 60 >/dev/null 9>&-; then
    tail -n 30 "$PG_LOG" >&2 || true
    die "PostgreSQL failed to start (log: $PG_LOG)"
  fi
  pg_ensure_database "$bin"
}

# ============================================================================
# Kafka
# ============================================================================

kafka_ensure_java() {
  command -v java >/dev/null || apt_install default-jre-headless
  command -v mvn >/dev/null || apt_install maven
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
  [[ -n $v && $v -ge 17 ]] || die "Kafka 4.x needs Java 17+ (found: ${v:-unknown})"
}

# Runs a Kafka CLI class with the resolved jars and quiet logging, bounded by
# $KAFKA_TOOL_TIMEOUT seconds so a hung tool cannot stall CI.
kafka_java() {
  timeout "${KAFKA_TOOL_TIMEOUT:-120}" java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_TOOLS_LOG4J" -cp "$KAFKA_LIBS/*" "$@"
}

# Resolve Kafka + runtime deps from Maven Central into $KAFKA_LIBS. Skipped when
# the marker says the jars match the current pom.xml and requested version.
kafka_ensure_libs() {
  local marker=$KAFKA_LIBS/.sluice-resolved pom_sha want
  pom_sha=$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)
  want=${SLUICE_KAFKA_VERSION:-}
  if [[ -f $marker ]] && grep -qx "pom=$pom_sha" "$marker" &&
    { [[ -z $want ]] || grep -qx "kafka=$want" "$marker"; }; then
    return
  fi
  local candidates=("${want:-$KAFKA_DEFAULT_VERSION}")
  [[ -z $want ]] && candidates+=("$KAFKA_FALLBACK_VERSION")
  local tmp=$KAFKA_HOME/libs.tmp v ok=
  for v in "${candidates[@]}"; do
    rm -rf "$tmp"
    log "resolving org.apache.kafka:kafka_2.13:$v and runtime deps via Maven (first run only)"
    if mvn -B -q -Dstyle.color=never -f "$KAFKA_POM" \
      dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$tmp" -Dkafka.version="$v" \
      </dev/null >"$KAFKA_HOME/mvn.log" 2>&1; then
      ok=$v
      break
    fi
    # (Debian's mvn emits stray colour resets even with -B; strip them.)
    sed 's/\x1b\[[0-9;]*m//g' "$KAFKA_HOME/mvn.log" | tail -n 20 >&2 || true
    log "Maven resolution of Kafka $v failed"
  done
  [[ -n $ok ]] || die "could not resolve Kafka jars (see $KAFKA_HOME/mvn.log)"
  [[ -f $tmp/kafka_2.13-$ok.jar ]] || die "kafka_2.13-$ok.jar missing after Maven resolution"
  compgen -G "$tmp/slf4j-api-2.*.jar" >/dev/null ||
    die "resolved slf4j-api is not 2.x; Kafka logging would be silently disabled"
  printf 'kafka=%s\npom=%s\n' "$ok" "$pom_sha" >"$tmp/.sluice-resolved"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  local jars=("$KAFKA_LIBS"/*.jar)
  log "Kafka $ok: ${#jars[@]} jars in $KAFKA_LIBS"
}

kafka_write_config() {
  local ssl_listener="" ssl_advertised="" ssl_settings="# no TLS listener (no keystore)"
  if kafka_ensure_keystore; then
    # A TLS listener, and a SASL_SSL one with the PLAIN user "sluice" (password in
    # $KAFKA_SASL_PASSWORD_FILE), both next to the plaintext listener.
    if [[ ! -s $KAFKA_SASL_PASSWORD_FILE ]]; then
      (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$KAFKA_SASL_PASSWORD_FILE")
    fi
    ssl_listener=",SSL://127.0.0.1:$KAFKA_SSL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT"
    ssl_advertised=",SSL://127.0.0.1:$KAFKA_SSL_PORT,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT"
    ssl_settings="ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/kafka.p12
ssl.keystore.password=$(<"$TLS_DIR/kafka.p12.pass")
ssl.key.password=$(<"$TLS_DIR/kafka.p12.pass")
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_sluice=\"$(<"$KAFKA_SASL_PASSWORD_FILE")\";"
  fi
  cat >"$KAFKA_CONF.tmp" <<EOF
# Written by deploy/local/up.sh on every start; edits will be overwritten.
# Single-node KRaft: this process is both broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT$ssl_listener
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT$ssl_advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
$ssl_settings
log.dirs=$KAFKA_DATA

num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
delete.topic.enable=true

# Internal topics: one replica; fewer partitions than the defaults (50) so
# the first consumer group / transaction comes up quickly.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Fast, test-friendly group behaviour.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
EOF
  mv "$KAFKA_CONF.tmp" "$KAFKA_CONF"
}

kafka_format_storage() {
  [[ -f $KAFKA_DATA/meta.properties ]] && return
  local uuid
  uuid=$(kafka_java kafka.tools.StorageTool random-uuid)
  [[ -n $uuid ]] || die "kafka.tools.StorageTool random-uuid produced no id"
  log "formatting Kafka storage (cluster id $uuid)"
  mkdir -p "$KAFKA_DATA"
  # Static controller.quorum.voters => plain format (no --standalone needed).
  kafka_java kafka.tools.StorageTool format -t "$uuid" -c "$KAFKA_CONF" >"$KAFKA_LOGS/format.log" 2>&1 || {
    cat "$KAFKA_LOGS/format.log" >&2
    die "Kafka storage format failed"
  }
  printf '%s\n' "$uuid" >"$KAFKA_HOME/cluster.id"
}

kafka_fail() {
  log "$1; last lines of $KAFKA_LOGS/server.log and kafka.out:"
  tail -n 40 "$KAFKA_LOGS/server.log" >&2 2>/dev/null || true
  tail -n 20 "$KAFKA_LOGS/kafka.out" >&2 2>/dev/null || true
  exit 1
}

kafka_start() {
  # Keep one previous generation of logs; readiness greps a fresh server.log.
  local f
  for f in server.log kafka.out; do
    [[ -f $KAFKA_LOGS/$f ]] && mv -f "$KAFKA_LOGS/$f" "$KAFKA_LOGS/$f.prev"
  done
  rm -f "$KAFKA_PID_FILE"
  log "starting Kafka on 127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT, log: $KAFKA_LOGS/server.log)"
  # setsid: detach from our session/process group so the broker outlives this
  # script and its CI job. The inner bash records its own pid, then execs java.
  # 9>&-: the broker must not inherit the lock fd (see take_lock).
  # shellcheck disable=SC2086,SC2016  # split KAFKA_HEAP_OPTS; $$ is the inner bash's
  (
    cd "$KAFKA_HOME"
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$KAFKA_PID_FILE" \
      java $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dsluice.kafka.log.dir="$KAFKA_LOGS" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_CONF" \
      </dev/null >"$KAFKA_LOGS/kafka.out" 2>&1 9>&- &
  )
}

kafka_wait_ready() {
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT)) pid=
  while :; do
    [[ -z $pid && -s $KAFKA_PID_FILE ]] && pid=$(<"$KAFKA_PID_FILE")
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$KAFKA_PID_FILE"
      kafka_fail "Kafka exited during startup"
    fi
    if [[ -n $pid ]] && grep -q 'Kafka Server started' "$KAFKA_LOGS/server.log" 2>/dev/null &&
      port_open 127.0.0.1 "$KAFKA_PORT"; then
      break
    fi
    ((SECONDS < deadline)) || kafka_fail "Kafka not ready after ${KAFKA_START_TIMEOUT}s (still running as pid ${pid:-?}; stop it with down.sh)"
    sleep 0.5
  done
  # The broker logs "Kafka Server started" only once it is unfenced; still,
  # prove that it serves metadata to a real client.
  if ! KAFKA_TOOL_TIMEOUT=60 kafka_java org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$LOCAL_KAFKA_BOOTSTRAP" --list >"$KAFKA_LOGS/verify.log" 2>&1; then
    cat "$KAFKA_LOGS/verify.log" >&2
    kafka_fail "Kafka started but a metadata request (TopicCommand --list) failed"
  fi
}

kafka_up() {
  local pid
  pid=$(kafka_pid)
  if [[ -n $pid ]]; then
    if port_open 127.0.0.1 "$KAFKA_PORT"; then
      log "Kafka already running on 127.0.0.1:$KAFKA_PORT (pid $pid)"
      return
    fi
    # Alive but not listening: probably still starting (another up.sh).
    log "Kafka process $pid exists but is not listening yet; waiting"
    echo "$pid" >"$KAFKA_PID_FILE"
    kafka_wait_ready
    return
  fi
  rm -f "$KAFKA_PID_FILE"
  local p
  for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SSL_PORT" "$KAFKA_SASL_PORT"; do
    if port_open 127.0.0.1 "$p"; then
      die "port $p is already in use by another process; set SLUICE_KAFKA_PORT/SLUICE_KAFKA_CONTROLLER_PORT or KAFKA_BOOTSTRAP_SERVERS"
    fi
  done
  mkdir -p "$KAFKA_HOME" "$KAFKA_LOGS" "$KAFKA_DATA"
  kafka_ensure_java
  kafka_ensure_libs
  kafka_write_config
  kafka_format_storage
  kafka_start
  kafka_wait_ready
}

# ============================================================================
# main
# ============================================================================

main() {
  local t0=${EPOCHREALTIME/./} db_url kafka_bootstrap
  mkdir -p "$LOCAL_DIR"
  touch "$OWNER_MARKER"
  take_lock

  if [[ -n ${DATABASE_URL:-} && $DATABASE_URL != "$LOCAL_DATABASE_URL" ]]; then
    log "DATABASE_URL is set; not starting local PostgreSQL"
    db_url=$DATABASE_URL
  else
    pg_up
    db_url=$LOCAL_DATABASE_URL
  fi

  if [[ -n ${KAFKA_BOOTSTRAP_SERVERS:-} && $KAFKA_BOOTSTRAP_SERVERS != "$LOCAL_KAFKA_BOOTSTRAP" ]]; then
    log "KAFKA_BOOTSTRAP_SERVERS is set; not starting local Kafka"
    kafka_bootstrap=$KAFKA_BOOTSTRAP_SERVERS
  else
    kafka_up
    kafka_bootstrap=$LOCAL_KAFKA_BOOTSTRAP
  fi

  # The deployment's secrets key: connector secrets are stored encrypted with it.
  # Made once; losing it makes stored secrets unreadable (down.sh --purge drops both).
  local secrets_key=$LOCAL_DIR/secrets.key
  if [[ ! -s $secrets_key ]]; then
    (umask 077 && head -c 32 /dev/urandom | base64 >"$secrets_key")
    log "created the secrets key $secrets_key"
  fi

  {
    echo "# Generated by deploy/local/up.sh. Usage: source $ENV_FILE"
    printf 'export DATABASE_URL=%q\n' "$db_url"
    printf 'export KAFKA_BOOTSTRAP_SERVERS=%q\n' "$kafka_bootstrap"
    printf 'export SLUICE_SECRETS_KEY_FILE=%q\n' "$secrets_key"
    # The CA of the local PostgreSQL's and Kafka's TLS certificates, and Kafka's
    # TLS listener, when this script runs them with TLS.
    if [[ -s $LOCAL_CA ]]; then
      printf 'export SLUICE_LOCAL_CA=%q\n' "$LOCAL_CA"
    fi
    if [[ $kafka_bootstrap == "$LOCAL_KAFKA_BOOTSTRAP" && -s $TLS_DIR/kafka.p12 ]]; then
      printf 'export SLUICE_LOCAL_KAFKA_SSL=%q\n' "127.0.0.1:$KAFKA_SSL_PORT"
      printf 'export SLUICE_LOCAL_KAFKA_SASL=%q\n' "127.0.0.1:$KAFKA_SASL_PORT"
      printf 'export SLUICE_LOCAL_KAFKA_SASL_PASSWORD_FILE=%q\n' "$KAFKA_SASL_PASSWORD_FILE"
    fi
  } >"$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"

  echo "PostgreSQL: $db_url"
  echo "Kafka:      $kafka_bootstrap"
  echo "Env file:   $ENV_FILE  (source it)"
  local ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
  log "ready in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s"
}

main "$@"
