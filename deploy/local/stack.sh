#!/usr/bin/env bash
# deploy/local/stack.sh — run Sluice itself on this machine: one control plane and
# two workers (worker-1, worker-2; $SLUICE_LOCAL_WORKERS sets how many), started
# from the target/debug binaries against the PostgreSQL and Kafka that up.sh started.
#
#   stack.sh start [--no-build] [NAME...]
#                         build the binaries (cargo build --locked), then start
#                         whatever is not running (or only NAME...); waits until ready
#   stack.sh stop [NAME...]
#                         SIGTERM, wait up to $SLUICE_STOP_TIMEOUT s, SIGKILL; workers
#                         before the control plane
#   stack.sh restart [--no-build] [NAME...]
#                         stop, then start (NAME... one after another: a rolling restart)
#   stack.sh status       each process with pid and log; exit 3 if any is down
#
# NAME is control-plane or worker-<name> (e.g. worker-3: a worker beyond
# $SLUICE_LOCAL_WORKERS is started by naming it, and stays known while it runs).
# Pid files and logs live in $SLUICE_LOCAL_DIR/run (default <repo>/.local/run).
# Endpoints come from $SLUICE_LOCAL_DIR/env (written by up.sh); a variable already set
# in the caller's environment wins over that file. The control plane
# listens on $SLUICE_LISTEN (default 127.0.0.1:50051); start writes sluicectl's config
# (server + an operator token of tenant "demo") to $SLUICE_LOCAL_DIR/sluicectl.yaml,
# so `SLUICE_CONFIG=.local/sluicectl.yaml sluicectl list` works. Other SLUICE_* variables
# (SLUICE_LOG, SLUICE_SESSION_TIMEOUT_MS, SLUICE_SECRETS_KEY_FILE, ...) are passed
# through to the binaries.
set -euo pipefail

# shellcheck source=lib.sh
# shellcheck source=lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

RUN_DIR=$LOCAL_DIR/run
STACK_LOCK=$RUN_DIR/.lock
START_TIMEOUT=${SLUICE_START_TIMEOUT:-90}
STOP_TIMEOUT=${SLUICE_STOP_TIMEOUT:-40}
WORKER_COUNT=${SLUICE_LOCAL_WORKERS:-2}
[[ $WORKER_COUNT =~ ^[1-9][0-9]?$ ]] || die "SLUICE_LOCAL_WORKERS must be a number from 1 to 99"
START_WORKERS=()
for ((i = 1; i <= WORKER_COUNT; i++)); do
  START_WORKERS+=("worker-$i")
done
# Workers left running by an earlier start with a larger SLUICE_LOCAL_WORKERS are
# still shown by status and stopped by stop, but not started again.
WORKERS=("${START_WORKERS[@]}")
for f in "$RUN_DIR"/worker-*.pid; do
  [[ -e $f ]] || continue
  f=${f##*/}
  f=${f%.pid}
  [[ " ${WORKERS[*]} " == *" $f "* ]] || WORKERS+=("$f")
done
PROCESSES=(control-plane "${WORKERS[@]}")
# What start builds: the two services and the CLI, nothing else of the workspace.
BINARIES=(sluice-control-plane sluice-worker sluicectl)

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$REPO_ROOT/$TARGET_DIR
BIN_DIR=$TARGET_DIR/debug

usage() {
  sed -n '2,27s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

bin_of() {
  case $1 in
    control-plane) echo "$BIN_DIR/sluice-control-plane" ;;
    *) echo "$BIN_DIR/sluice-worker" ;;
  esac
}

# Every process this script starts carries SLUICE_STACK_PROCESS=<name>:<run dir> in
# its environment. A pid counts as ours only if it runs our binary with that marker,
# so a recycled pid or a process started by the tests is never touched.
marker_of() { echo "$1:$RUN_DIR"; }

is_ours() {
  local pid=$1 name=$2 arg0 entry want
  want="SLUICE_STACK_PROCESS=$(marker_of "$name")"
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
  IFS= read -r -d '' arg0 2>/dev/null <"/proc/$pid/cmdline" || return 1
  [[ $arg0 == "$(bin_of "$name")" || $arg0 == bash ]] || return 1
  while IFS= read -r -d '' entry; do
    [[ $entry == "$want" ]] && return 0
  done 2>/dev/null <"/proc/$pid/environ"
  return 1
}

# Prints the pid of process <name> if it is alive, else nothing. Trusts the pid
# file when it is right; otherwise scans /proc (e.g. the pid file was lost).
pid_of() {
  local name=$1 pidfile=$RUN_DIR/$1.pid pid p
  if [[ -r $pidfile ]]; then
    pid=$(<"$pidfile")
    if is_ours "$pid" "$name"; then
      echo "$pid"
      return
    fi
  fi
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    if is_ours "$pid" "$name"; then
      echo "$pid" >"$pidfile"
      echo "$pid"
      return
    fi
  done
}

# True if the running process was started from a binary that has since been rebuilt.
is_stale() {
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [[ $exe == *" (deleted)" ]]
}

log_tail() {
  local file=$1
  log "last lines of $file:"
  tail -n 30 "$file" >&2 2>/dev/null || true
}

load_env() {
  [[ -r $ENV_FILE ]] || die "$ENV_FILE not found: run deploy/local/up.sh first"
  # What the caller set wins over the file (e.g. a new SLUICE_SECRETS_KEY_FILE for
  # one restart).
  local callers
  callers=$(export -p | grep -E '^declare -x (DATABASE_URL|KAFKA_BOOTSTRAP_SERVERS|SLUICE_[A-Z0-9_]+)=' || true)
  # shellcheck source=/dev/null
  source "$ENV_FILE"
  # declare inside a function makes locals: -g keeps them global.
  eval "${callers//declare -x /declare -gx }"
  export DATABASE_URL KAFKA_BOOTSTRAP_SERVERS SLUICE_SECRETS_KEY_FILE
}

take_stack_lock() {
  mkdir -p "$RUN_DIR"
  exec 8>"$STACK_LOCK"
  flock -w 300 8 || die "timed out waiting for $STACK_LOCK (another stack.sh running?)"
}

build() {
  command -v cargo >/dev/null || die "cargo not found; install Rust (https://rustup.rs) and re-run"
  local args=(--locked) b
  for b in "${BINARIES[@]}"; do
    args+=(--bin "$b")
  done
  "$REPO_ROOT/deploy/local/build-deps.sh"
  log "building binaries (cargo build ${args[*]})"
  (cd "$REPO_ROOT" && cargo build "${args[@]}" 8>&- 9>&-)
}

# Starts <name> in its own session, detached from this shell, stdout+stderr to its
# log (the previous log is kept as <name>.log.prev). Prints the pid.
spawn() {
  local name=$1 pidfile=$RUN_DIR/$1.pid log=$RUN_DIR/$1.log
  shift
  if [[ -f $log ]]; then
    mv -f "$log" "$log.prev"
  fi
  rm -f "$pidfile"
  # The inner bash records its own pid, then execs the binary (same pid).
  # 8>&- 9>&-: the long-lived process must not inherit (and hold) our lock fds.
  # shellcheck disable=SC2016  # $$ and $0 belong to the inner bash
  (
    cd "$REPO_ROOT"
    SLUICE_STACK_PROCESS=$(marker_of "$name") NO_COLOR=1 \
      setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" \
      </dev/null >"$log" 2>&1 8>&- 9>&- &
  )
  local deadline=$((SECONDS + 10))
  until [[ -s $pidfile ]]; do
    ((SECONDS < deadline)) || die "$name did not start (no pid file $pidfile)"
    sleep 0.05
  done
  cat "$pidfile"
}

# Waits until <name>'s log has a line matching <regex>; on exit or timeout shows the
# log tail, stops what is left of the process and fails.
wait_for_log() {
  local name=$1 pid=$2 regex=$3 log=$RUN_DIR/$1.log
  local deadline=$((SECONDS + START_TIMEOUT))
  while ! grep -qE "$regex" "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$RUN_DIR/$name.pid"
      log_tail "$log"
      die "$name exited during startup (log: $log)"
    fi
    if ((SECONDS >= deadline)); then
      log_tail "$log"
      stop_pids "$name:$pid"
      die "$name not ready after ${START_TIMEOUT}s; stopped it (log: $log)"
    fi
    sleep 0.2
  done
}

start_control_plane() {
  local pid addr log=$RUN_DIR/control-plane.log
  pid=$(pid_of control-plane)
  if [[ -n $pid ]]; then
    addr=$(cat "$RUN_DIR/control-plane.addr" 2>/dev/null || echo "?")
    log "control plane already running (pid $pid, listening on $addr)"
    return
  fi
  # Read here, after load_env: the env file may set it.
  local listen=${SLUICE_LISTEN:-127.0.0.1:50051}
  local host=${listen%:*} port=${listen##*:}
  host=${host#[}
  host=${host%]}
  if [[ $host == 0.0.0.0 || $host == :: ]]; then
    host=127.0.0.1
  fi
  if [[ $port != 0 ]] && port_open "$host" "$port"; then
    die "port $port ($listen) is already in use by another process; stop it or set SLUICE_LISTEN"
  fi
  rm -f "$RUN_DIR/control-plane.addr"
  log "starting control plane on $listen (log: $log)"
  pid=$(spawn control-plane "$(bin_of control-plane)" --listen "$listen")
  wait_for_log control-plane "$pid" '^listening on '
  addr=$(sed -n 's/^listening on //p' "$log" | head -n 1)
  echo "$addr" >"$RUN_DIR/control-plane.addr"
  log "control plane listening on $addr (pid $pid)"
}

# Starts the given workers (those not running yet).
start_workers() {
  local name pid started=()
  for name in "$@"; do
    pid=$(pid_of "$name")
    if [[ -n $pid ]]; then
      log "$name already running (pid $pid)"
      continue
    fi
    log "starting $name (log: $RUN_DIR/$name.log)"
    pid=$(spawn "$name" "$(bin_of "$name")" --worker-id "$name")
    started+=("$name:$pid")
  done
  # Ready = joined the group and received an assignment (possibly empty).
  local entry
  for entry in ${started[@]+"${started[@]}"}; do
    wait_for_log "${entry%%:*}" "${entry##*:}" 'partitions assigned'
    log "${entry%%:*} joined the worker group (pid ${entry##*:})"
  done
}

# SIGTERM to every given name:pid, wait for all of them, SIGKILL what is left.
stop_pids() {
  local entry pid name deadline
  for entry in "$@"; do
    kill -TERM "${entry##*:}" 2>/dev/null || true
  done
  deadline=$((SECONDS + STOP_TIMEOUT))
  for entry in "$@"; do
    name=${entry%%:*}
    pid=${entry##*:}
    while kill -0 "$pid" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        log "$name (pid $pid) did not exit within ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        break
      fi
      sleep 0.2
    done
    rm -f "$RUN_DIR/$name.pid"
    if [[ $name == control-plane ]]; then
      rm -f "$RUN_DIR/control-plane.addr"
    fi
  done
}

# sluicectl's config for the local stack ($LOCAL_DIR/sluicectl.yaml): the control
# plane's address and an operator token of tenant "demo". The token is created once
# (kept in $LOCAL_DIR/token, mode 600) and replaced when it no longer authenticates,
# e.g. after 'down.sh --purge'.
CLIENT_CONFIG=$LOCAL_DIR/sluicectl.yaml
ensure_client_config() {
  local addr token="" out
  addr=$(<"$RUN_DIR/control-plane.addr")
  if [[ -r $LOCAL_DIR/token ]]; then
    token=$(<"$LOCAL_DIR/token")
  fi
  if [[ -n $token ]]; then
    out=$(SLUICE_TOKEN=$token "$BIN_DIR/sluicectl" --server "http://$addr" list 2>&1) || true
    if [[ $out == *UNAUTHENTICATED* ]]; then
      log "the local token is no longer valid; creating a new one"
      token=""
    fi
  fi
  if [[ -z $token ]]; then
    token=$("$(bin_of control-plane)" tokens create --tenant demo --role operator \
      --name local-stack 2>/dev/null) || die "cannot create an API token for the local stack"
    (umask 077 && printf '%s\n' "$token" >"$LOCAL_DIR/token")
    log "created an operator token for tenant 'demo' ($LOCAL_DIR/token)"
  fi
  (umask 077 && printf 'server: http://%s\ntoken: %s\n' "$addr" "$token" >"$CLIENT_CONFIG")
}

# Parses [--no-build] (if allowed) and NAME... into DO_BUILD and NAMES.
DO_BUILD=1
NAMES=()
parse_names() {
  local allow_no_build=$1 arg
  shift
  for arg in "$@"; do
    case $arg in
      --no-build)
        ((allow_no_build)) || usage
        DO_BUILD=0
        ;;
      control-plane | worker-[a-z0-9]*)
        [[ $arg =~ ^(control-plane|worker-[a-z0-9][a-z0-9-]{0,40})$ ]] ||
          die "bad process name '$arg' (control-plane or worker-<letters, digits, ->)"
        [[ " ${NAMES[*]} " == *" $arg "* ]] || NAMES+=("$arg")
        ;;
      *) echo "unknown argument: $arg" >&2; usage ;;
    esac
  done
}

# Starts NAMES (all processes when empty): the control plane first.
start_names() {
  local name
  for name in control-plane worker; do
    [[ -x $(bin_of "$name") ]] || die "$(bin_of "$name") missing; run without --no-build"
  done
  local want=("${NAMES[@]}")
  if ((${#want[@]} == 0)); then
    want=(control-plane "${START_WORKERS[@]}")
  fi
  if [[ " ${want[*]} " == *" control-plane "* ]]; then
    start_control_plane
  fi
  if [[ -n $(pid_of control-plane) && -r $RUN_DIR/control-plane.addr ]]; then
    ensure_client_config
  fi
  local workers=()
  for name in "${want[@]}"; do
    [[ $name == control-plane ]] || workers+=("$name")
  done
  start_workers ${workers[@]+"${workers[@]}"}
  local pid missing=()
  for name in "${want[@]}"; do
    pid=$(pid_of "$name")
    if [[ -z $pid ]]; then
      missing+=("$name")
    elif is_stale "$pid"; then
      log "note: $name (pid $pid) runs an older build; 'stack.sh restart' picks up the new one"
    fi
  done
  ((${#missing[@]} == 0)) || die "not running: ${missing[*]}; see 'stack.sh status'"
}

cmd_start() {
  parse_names 1 "$@"
  load_env
  take_stack_lock
  if ((DO_BUILD)); then
    build
  fi
  start_names
  # Workers started by name beyond $SLUICE_LOCAL_WORKERS are listed too.
  local name
  for name in "${NAMES[@]}"; do
    [[ $name == control-plane || " ${WORKERS[*]} " == *" $name "* ]] || WORKERS+=("$name")
  done
  PROCESSES=(control-plane "${WORKERS[@]}")
  cmd_status || true
}

# Stops NAMES (all processes when empty): workers first, they stop their pipelines at
# a safe point and release them.
stop_names() {
  local name pid workers=() cp=() want=("${NAMES[@]}")
  if ((${#want[@]} == 0)); then
    want=("${PROCESSES[@]}")
  fi
  for name in "${want[@]}"; do
    pid=$(pid_of "$name")
    [[ -n $pid ]] || continue
    if [[ $name == control-plane ]]; then
      cp=("control-plane:$pid")
    else
      workers+=("$name:$pid")
    fi
  done
  if ((${#workers[@]} + ${#cp[@]} == 0)); then
    if ((${#NAMES[@]} == 0)); then
      rm -f "$RUN_DIR"/*.pid "$RUN_DIR/control-plane.addr"
    fi
    log "${NAMES[*]:-Sluice processes} not running"
    return
  fi
  if ((${#workers[@]})); then
    log "stopping ${workers[*]%%:*}"
    stop_pids "${workers[@]}"
  fi
  if ((${#cp[@]})); then
    log "stopping control-plane"
    stop_pids "${cp[@]}"
  fi
  log "${NAMES[*]:-Sluice processes} stopped"
}

cmd_stop() {
  parse_names 0 "$@"
  if [[ ! -d $RUN_DIR ]]; then
    log "Sluice processes not running"
    return
  fi
  take_stack_lock
  stop_names
}

# Without names: stop everything, then start everything. With names: one after
# another, each stopped and started again before the next (a rolling restart).
cmd_restart() {
  parse_names 1 "$@"
  load_env
  take_stack_lock
  if ((DO_BUILD)); then
    build
  fi
  if ((${#NAMES[@]} == 0)); then
    stop_names
    start_names
  else
    local all=("${NAMES[@]}") name
    for name in "${all[@]}"; do
      NAMES=("$name")
      stop_names
      start_names
    done
    NAMES=("${all[@]}")
  fi
  cmd_status || true
}

cmd_status() {
  [[ $# -eq 0 ]] || usage
  local name pid state detail down=0
  for name in "${PROCESSES[@]}"; do
    pid=
    if [[ -d $RUN_DIR ]]; then
      pid=$(pid_of "$name")
    fi
    if [[ -z $pid && $name == worker-* && " ${START_WORKERS[*]} " != *" $name "* ]]; then
      rm -f "$RUN_DIR/$name.pid" # an extra worker that has exited
      continue
    fi
    if [[ -n $pid ]]; then
      state="running  pid $pid"
      if is_stale "$pid"; then
        state+=" (older build)"
      fi
    else
      state=stopped
      down=1
    fi
    detail=
    if [[ $name == control-plane && -n $pid && -r $RUN_DIR/control-plane.addr ]]; then
      detail="grpc $(<"$RUN_DIR/control-plane.addr")"
    fi
    printf '%-14s %-30s %-22s log: %s\n' "$name" "$state" "$detail" "$RUN_DIR/$name.log"
  done
  return "$down"
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  restart) shift; cmd_restart "$@" ;;
  status) shift; cmd_status "$@" || exit 3 ;;
  *) usage ;;
esac
