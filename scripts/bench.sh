#!/usr/bin/env bash
# Loads roundhouse (each dispatch policy) and Node's own cluster with wrk on the same workloads,
# and writes target/bench/{results.json,results.md,shares.{png,svg},fairness-cost.{png,svg}}.
# See docs/benchmarks.md.
#
# usage: scripts/bench.sh [--quick] [--workers N] [--duration S] [--policies LIST] [options]
#
#   --quick             every cell runs ~2 s after a 1 s warm-up (a CI smoke test)
#   --workers N         workers per server (default: number of CPUs)
#   --duration S        measured seconds per cell (default 10; --quick: 2)
#   --warmup S          warm-up seconds per cell, not measured (default 3; --quick: 1)
#   --policies LIST     comma-separated rows to run (default: rr,least-conn,none,reuseport,
#                       reuseport-rr,node-rr,node-none,roundhouse-node-rr; the Node rows are
#                       skipped without node). `roundhouse-node-rr` is roundhouse --node running
#                       the same Node app, unmodified, without cluster. `reuseport-rr` needs
#                       CAP_BPF: when the server refuses to start for want of it (or the kernel
#                       refuses the BPF program) its row says why it was skipped, and the bench
#                       does not fail.
#   --workloads LIST    keep-alive,conn-per-request,mixed (default: all three)
#   --connections C     wrk connections (default 64)
#   --threads T         wrk threads (default 2)
#   --repeat N          run every policy N times, interleaved (round 1: all policies, round 2:
#                       all again, ...); the report gives medians and ranges (default 1)
#   --cpu-ms N          CPU cost of the expensive request in the mixed workload (default 5)
#   --out DIR           output directory (default target/bench)
#   --no-build          use the existing target/release binaries
#   --no-chart          do not set up matplotlib; write results.json/results.md only
#   --without-cap-bpf   start reuseport-rr with CAP_BPF and CAP_SYS_ADMIN dropped (setpriv), to
#                       check the skipped-row path on a machine that has them
#   --variant NAME=DIR  another build to compare, side by side in the same run: a row named
#                       POLICY@NAME (e.g. `--policies rr,rr@before --variant before=/tmp/old`)
#                       runs DIR/roundhouse and DIR/hello-worker; repeatable. Only for
#                       roundhouse's own policies (not the Node rows)
#   --no-floor          skip the accept floor (scripts/accept_floor.c, a bare accept+close loop
#                       loaded like connection-per-request once per round, built with cc when
#                       one is installed): the CPU per connection of the kernel's part alone
#
# Everything it starts (servers, their workers) is stopped by pid on exit, even on Ctrl-C.
# Exit status: 0 when every cell ran; 1 when any cell or server failed (the report of the cells
# that ran is still written); 2 on bad usage.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=0
WORKERS=$(nproc 2>/dev/null || echo 2)
DURATION=
WARMUP=
XFF_POOL=0
POLICIES=rr,least-conn,sticky,none,reuseport,reuseport-rr,node-rr,node-none,roundhouse-node-rr
WORKLOADS=keep-alive,conn-per-request,mixed
CONNECTIONS=64
THREADS=2
CPU_MS=5
REPEAT=1
OUT=$ROOT/target/bench
BUILD=1
CHART=1
FLOOR=1
FLOOR_VALUES=()
WITHOUT_CAP_BPF=0
declare -A VARIANTS=()
READY_DEADLINE_S=30
STOP_DEADLINE_S=15

usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
die_usage() {
  echo "bench.sh: $*" >&2
  exit 2
}
log() { printf '[bench] %s\n' "$*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --workers | -w) WORKERS=${2:?--workers needs a value}; shift ;;
    --duration) DURATION=${2:?--duration needs a value}; shift ;;
    --warmup) WARMUP=${2:?--warmup needs a value}; shift ;;
    --policies) POLICIES=${2:?--policies needs a value}; shift ;;
    --workloads) WORKLOADS=${2:?--workloads needs a value}; shift ;;
    --connections) CONNECTIONS=${2:?--connections needs a value}; shift ;;
    --threads) THREADS=${2:?--threads needs a value}; shift ;;
    --cpu-ms) CPU_MS=${2:?--cpu-ms needs a value}; shift ;;
    --repeat) REPEAT=${2:?--repeat needs a value}; shift ;;
    --out) OUT=${2:?--out needs a value}; shift ;;
    --no-build) BUILD=0 ;;
    --no-chart) CHART=0 ;;
    --no-floor) FLOOR=0 ;;
    --variant)
      v=${2:?--variant needs NAME=DIR}
      [[ $v == *=* && -n ${v%%=*} ]] || die_usage "--variant wants NAME=DIR, got '$v'"
      VARIANTS[${v%%=*}]=${v#*=}
      shift
      ;;
    --without-cap-bpf) WITHOUT_CAP_BPF=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

if ((QUICK)); then
  DURATION=${DURATION:-2}
  WARMUP=${WARMUP:-1}
else
  DURATION=${DURATION:-10}
  WARMUP=${WARMUP:-3}
fi
for v in WORKERS DURATION WARMUP CONNECTIONS THREADS CPU_MS REPEAT; do
  if ! is_uint "${!v}" || ((${!v} == 0)); then
    flag=${v,,}
    die_usage "--${flag//_/-} must be a positive integer, got '${!v}'"
  fi
done
((WORKERS <= 1024)) || die_usage "--workers must be at most 1024"
((CONNECTIONS >= THREADS)) || die_usage "--connections must be at least --threads"

IFS=, read -r -a POLICY_LIST <<<"$POLICIES"
IFS=, read -r -a WORKLOAD_LIST <<<"$WORKLOADS"
for p in "${POLICY_LIST[@]}"; do
  if [[ $p == *@* ]]; then
    v=${p#*@}
    [[ -n ${VARIANTS[$v]+x} ]] || die_usage "row '$p': no --variant $v=DIR"
    [[ -x ${VARIANTS[$v]}/roundhouse && -x ${VARIANTS[$v]}/hello-worker ]] ||
      die_usage "--variant $v: no roundhouse and hello-worker in ${VARIANTS[$v]}"
    p=${p%@*}
    case $p in
      rr | least-conn | sticky | none | reuseport | reuseport-rr) ;;
      *) die_usage "unknown policy '$p' (a variant runs roundhouse's own policies only)" ;;
    esac
    continue
  fi
  case $p in
    rr | least-conn | sticky | none | reuseport | reuseport-rr | node-rr | node-none | roundhouse-node-rr) ;;
    *) die_usage "unknown policy '$p'" ;;
  esac
done
for w in "${WORKLOAD_LIST[@]}"; do
  case $w in
    keep-alive | conn-per-request | mixed) ;;
    *) die_usage "unknown workload '$w'" ;;
  esac
done

mkdir -p "$OUT/raw" "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/raw/* "$OUT"/logs/*
ROWS=$OUT/rows.jsonl
: >"$ROWS"
rm -f "$OUT/results.json" "$OUT/results.md" "$OUT/shares.png" "$OUT/shares.svg" \
  "$OUT/fairness-cost.png" "$OUT/fairness-cost.svg"
RH=$ROOT/target/release/roundhouse
HELLO=$ROOT/target/release/hello-worker
REPORT=$ROOT/scripts/bench_report.py
CLK_TCK=$(getconf CLK_TCK)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/roundhouse-bench.XXXXXX")

SERVER_PID=
WRK_PID=
SERVER_NAME=
SERVER_LOG=
LISTEN=
ADMIN=
FAILED=()
SKIPPED=()
SKIP_REASON=

# --- process hygiene --------------------------------------------------------------------------

# True while $1 is a live process (a zombie waiting to be reaped does not count).
alive() {
  local pid=$1 stat
  [[ -r /proc/$pid/stat ]] || return 1
  { stat=$(</proc/"$pid"/stat); } 2>/dev/null || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# Worker pids the server logged (`worker started ... worker.pid=N`), for a last-resort cleanup.
logged_worker_pids() {
  [[ -n $SERVER_LOG && -r $SERVER_LOG ]] || return 0
  grep -o 'worker\.pid=[0-9]*' "$SERVER_LOG" | cut -d= -f2 | sort -u || true
}

# Stops the current server: SIGTERM to its pid, wait (bounded), SIGKILL if it is still there,
# reap it, then SIGKILL any of its logged workers that outlived it (they should not: promise 7).
stop_server() {
  local pid=$SERVER_PID rc=0 i wp
  [[ -n $pid ]] || return 0
  SERVER_PID=
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_DEADLINE_S * 10; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "$SERVER_NAME (pid $pid) still running ${STOP_DEADLINE_S}s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || rc=$?
  if ((rc != 0)); then
    log "$SERVER_NAME (pid $pid) exited with status $rc after SIGTERM"
  fi
  for wp in $(logged_worker_pids); do
    for ((i = 0; i < 30; i++)); do
      alive "$wp" || break
      sleep 0.1
    done
    if alive "$wp" && grep -qa -e hello-worker -e node "/proc/$wp/cmdline" 2>/dev/null; then
      log "worker pid $wp outlived $SERVER_NAME: SIGKILL"
      kill -KILL "$wp" 2>/dev/null || true
    fi
  done
  return 0
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $WRK_PID ]] && alive "$WRK_PID"; then
    kill -TERM "$WRK_PID" 2>/dev/null || true
    wait "$WRK_PID" 2>/dev/null || true
  fi
  stop_server
  rm -rf "$TMP"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- prerequisites ----------------------------------------------------------------------------

need_roundhouse=0
need_node=0
for p in "${POLICY_LIST[@]}"; do
  case $p in
    node-*) need_node=1 ;;
    roundhouse-node-*) need_roundhouse=1; need_node=1 ;;
    *) need_roundhouse=1 ;;
  esac
done

if ((need_roundhouse)); then
  if ((BUILD)); then
    log "cargo build --release (roundhouse, hello-worker)"
    cargo build --release --bin roundhouse --bin hello-worker
  fi
  [[ -x $RH && -x $HELLO ]] || { echo "bench.sh: $RH or $HELLO missing (build failed?)" >&2; exit 1; }
fi

if ! command -v wrk >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "wrk not found: installing it with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >&2
  else
    echo "bench.sh: wrk is not installed. Install it with your package manager, e.g." >&2
    echo "  sudo apt-get install wrk      (Debian/Ubuntu)" >&2
    echo "  sudo dnf install wrk          (Fedora)" >&2
    echo "  brew install wrk              (macOS)" >&2
    exit 1
  fi
fi

HAVE_NODE=0
if command -v node >/dev/null 2>&1; then
  HAVE_NODE=1
elif ((need_node)); then
  SKIPPED+=("node-* rows: node is not installed")
  log "node not found: skipping the Node.js cluster rows"
fi

# The chart is drawn with matplotlib in a venv of our own under $OUT, so the system Python is
# left alone; everything else in bench_report.py is the standard library.
PY=python3
REPORT_PY=python3
if ((CHART)); then
  VENV=$OUT/venv
  if ! "$VENV/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
    log "setting up matplotlib in $VENV"
    if ! python3 -m venv "$VENV" >&2; then
      echo "bench.sh: could not create a Python venv (Debian: apt-get install python3-venv);" \
        "rerun with --no-chart to skip the chart" >&2
      exit 1
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check matplotlib >&2 || {
      echo "bench.sh: could not install matplotlib; rerun with --no-chart to skip the chart" >&2
      exit 1
    }
  fi
  REPORT_PY=$VENV/bin/python
fi

# --- servers ----------------------------------------------------------------------------------

# Field value of the first log line matching `KEY=VALUE` (ANSI colour codes stripped).
log_field() {
  sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" | grep -o -m1 "$1=[^ ]*" | head -n1 | cut -d= -f2- || true
}

# Starts the server for row $1 in the background and waits (bounded) for its `ready` line.
# Sets SERVER_PID, SERVER_LOG, LISTEN, ADMIN. Returns 1 (and says why) when it does not come up.
start_server() {
  local name=$1 i
  local -a cmd
  local RH=$RH HELLO=$HELLO
  if [[ $name == *@* ]]; then
    # A row of another build (--variant): its binaries, the policy before the `@`.
    RH=${VARIANTS[${name#*@}]}/roundhouse
    HELLO=${VARIANTS[${name#*@}]}/hello-worker
  fi
  XFF_POOL=0
  case ${name%@*} in
    sticky)
      # Keys from X-Forwarded-For, 256 client addresses (scripts/wrk/*.lua): from wrk's one
      # source address, `ip` keys would put every connection on one worker.
      cmd=("$RH" run -l 127.0.0.1:0 --admin 127.0.0.1:0 --control "$TMP/$name.sock"
        -w "$WORKERS" --policy sticky --sticky-key header:X-Forwarded-For -- "$HELLO")
      XFF_POOL=256
      ;;
    rr | least-conn | none | reuseport | reuseport-rr)
      cmd=("$RH" run -l 127.0.0.1:0 --admin 127.0.0.1:0 --control "$TMP/$name.sock"
        -w "$WORKERS" --policy "${name%@*}" -- "$HELLO")
      if [[ ${name%@*} == reuseport-rr ]] && ((WITHOUT_CAP_BPF)); then
        cmd=(setpriv --inh-caps=-bpf,-sys_admin --bounding-set=-bpf,-sys_admin -- "${cmd[@]}")
      fi
      ;;
    node-rr | node-none)
      cmd=(node "$ROOT/scripts/node-cluster.js" --workers "$WORKERS" --listen 127.0.0.1:0
        --admin 127.0.0.1:0 --sched "$([[ $name == node-rr ]] && echo SCHED_RR || echo SCHED_NONE)")
      ;;
    roundhouse-node-rr)
      # Issue 8: roundhouse runs the unmodified Node app (node-cluster.js --standalone, a plain
      # http server, no cluster) with --node, its listen() served by the primary.
      cmd=("$RH" run --node -l 127.0.0.1:0 --admin 127.0.0.1:0 --control "$TMP/$name.sock"
        -w "$WORKERS" --policy rr -- node "$ROOT/scripts/node-cluster.js" --standalone
        --listen 127.0.0.1:0)
      ;;
  esac
  SERVER_NAME=$name
  SERVER_LOG=$OUT/logs/$name.log
  log "starting $name: ${cmd[*]}"
  # Truncate here, not in the child's redirection: the child may not have run yet when the loop
  # below first reads the log, and must not find the previous run's `ready` line there.
  : >"$SERVER_LOG"
  RUST_LOG=${RUST_LOG:-info} "${cmd[@]}" </dev/null >>"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  for ((i = 0; i < READY_DEADLINE_S * 10; i++)); do
    if grep -q 'ready workers=' "$SERVER_LOG"; then
      break
    fi
    if ! alive "$SERVER_PID"; then
      log "$name exited before it was ready; last lines of $SERVER_LOG:"
      tail -n 20 "$SERVER_LOG" >&2 || true
      stop_server
      bpf_skip_reason
      return 1
    fi
    sleep 0.1
  done
  if ! grep -q 'ready workers=' "$SERVER_LOG"; then
    log "$name not ready after ${READY_DEADLINE_S}s; last lines of $SERVER_LOG:"
    tail -n 20 "$SERVER_LOG" >&2 || true
    stop_server
    return 1
  fi
  LISTEN=$(log_field listener.addr)
  ADMIN=$(log_field admin.addr)
  if [[ -z $LISTEN || -z $ADMIN ]]; then
    log "$name: no 'listener.addr=' or 'admin.addr=' in $SERVER_LOG"
    stop_server
    return 1
  fi
  log "$name ready: pid $SERVER_PID, listening on $LISTEN, admin on $ADMIN"
}

# After reuseport-rr failed to start: when its log says the BPF part was refused (no CAP_BPF, a
# kernel without the BPF support it needs, the verifier), sets SKIP_REASON to the server's own
# line, so the row is reported as skipped, with that reason, rather than as a failure.
bpf_skip_reason() {
  SKIP_REASON=
  [[ ${SERVER_NAME%@*} == reuseport-rr && -r $SERVER_LOG ]] || return 0
  SKIP_REASON=$(sed 's/\x1b\[[0-9;]*m//g' "$SERVER_LOG" |
    grep -m1 -e 'needs CAP_BPF' -e 'cannot run reuseport-rr' -e 'verifier refused' |
    sed 's/^roundhouse: //' || true)
}

# utime+stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
cpu_ticks() {
  local stat
  stat=$(</proc/"$1"/stat)
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo $((${12} + ${13}))
}

# Sum of utime+stime over the pids given, in clock ticks; fails when one of them is gone (its
# time would be lost, so the sum would be wrong rather than low).
cpu_ticks_sum() {
  local sum=0 pid t
  for pid in "$@"; do
    t=$(cpu_ticks "$pid" 2>/dev/null) || return 1
    sum=$((sum + t))
  done
  echo "$sum"
}

# Worker pids listed by a /stats document (roundhouse's and node-cluster.js's alike).
stats_worker_pids() {
  "$PY" -c 'import json,sys
print(" ".join(str(w["pid"]) for w in json.load(open(sys.argv[1])).get("workers", [])
               if w.get("pid")))' "$1"
}

rss_kib() {
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true
}

admin() {
  "$PY" "$REPORT" http "$1" "http://$ADMIN$2"
}

# Reads /stats until the request total stops moving (workers may report counters with a lag),
# at most 5 s. Writes the last document to $1.
settled_stats() {
  local out=$1 prev=-1 cur i
  for ((i = 0; i < 20; i++)); do
    admin GET /stats >"$out" || return 1
    cur=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["totals"]["requests_total"])' "$out") || return 1
    [[ $cur == "$prev" ]] && return 0
    prev=$cur
    sleep 0.25
  done
}

# Runs wrk with the remaining args, its output to file $1. In the background + `wait`, so that a
# signal to this script is handled at once (bash runs traps only between foreground commands).
run_wrk() {
  local out=$1 rc=0
  shift
  BENCH_CPU_MS=$CPU_MS BENCH_XFF_POOL=$XFF_POOL wrk "$@" >"$out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || rc=$?
  WRK_PID=
  if ((rc != 0)); then
    log "wrk exited with status $rc:"
    cat "$out" >&2
    return 1
  fi
}

# Runs one workload against the current server: warm-up, reset, measure, collect one row.
run_cell() {
  local name=$1 workload=$2 round=$3 url="http://$LISTEN/" base=$OUT/raw/$1.$2.r$3 t0 t1 rss
  local wpids w0 w1
  local -a args=(-t "$THREADS" -c "$CONNECTIONS" --latency --timeout 5s)
  case $workload in
    keep-alive) args+=(-s "$ROOT/scripts/wrk/plain.lua") ;;
    conn-per-request) args+=(-s "$ROOT/scripts/wrk/plain.lua" -H 'Connection: close') ;;
    mixed) args+=(-s "$ROOT/scripts/wrk/mixed.lua") ;;
  esac
  log "$name / $workload (round $round/$REPEAT): warm-up ${WARMUP}s, measure ${DURATION}s"
  run_wrk "$base.warmup.txt" "${args[@]}" -d "${WARMUP}s" "$url" || return 1
  admin POST /stats/reset >/dev/null || { log "POST /stats/reset failed"; return 1; }
  # The workers' CPU is read from /proc like the primary's, for the pids /stats lists now; if one
  # of them is gone by the end (a restart), the workers' figure is left out (null), not guessed.
  admin GET /stats >"$base.pids.json" || { log "GET /stats failed"; return 1; }
  wpids=$(stats_worker_pids "$base.pids.json") || return 1
  [[ -n $wpids ]] || log "$name: /stats lists no worker pids: no workers' CPU for this cell"
  # shellcheck disable=SC2086
  w0=$(cpu_ticks_sum $wpids) || w0=
  t0=$(cpu_ticks "$SERVER_PID") || return 1
  run_wrk "$base.wrk.txt" "${args[@]}" -d "${DURATION}s" "$url" || return 1
  t1=$(cpu_ticks "$SERVER_PID") || return 1
  # shellcheck disable=SC2086
  w1=$(cpu_ticks_sum $wpids) || { w1=; log "$name: a worker exited during the measurement"; }
  settled_stats "$base.stats.json" || { log "GET /stats failed"; return 1; }
  rss=$(rss_kib "$SERVER_PID")
  local -a wargs=()
  if [[ -n $wpids && -n $w0 && -n $w1 ]]; then
    wargs=(--worker-cpu-ticks-before "$w0" --worker-cpu-ticks-after "$w1")
  fi
  "$PY" "$REPORT" row --policy "$name" --workload "$workload" --round "$round" --wrk "$base.wrk.txt" \
    --stats "$base.stats.json" --cpu-ticks-before "$t0" --cpu-ticks-after "$t1" "${wargs[@]}" \
    --clk-tck "$CLK_TCK" ${rss:+--primary-rss-kib "$rss"} --out "$ROWS" || return 1
}

# Appends a row that says why policy $1 did not run in round $2 (one per workload).
skip_row() {
  local name=$1 round=$2 reason=$3 w
  for w in "${WORKLOAD_LIST[@]}"; do
    "$PY" -c 'import json,sys
p, w, r, why, out = sys.argv[1:]
open(out, "a").write(json.dumps({"policy": p, "workload": w, "round": int(r), "skipped": why}) + "\n")' \
      "$name" "$w" "$round" "$reason" "$ROWS"
  done
}

# Loads scripts/accept_floor.c (a bare accept4+close loop) like connection-per-request and
# appends its CPU µs per connection to FLOOR_VALUES: the kernel's share of the primary's cost,
# measured under the same conditions as the rows.
FLOOR_BIN=
measure_floor() {
  local round=$1 port i us
  if [[ -z $FLOOR_BIN ]]; then
    local cc
    cc=$(command -v cc || command -v gcc || true)
    if [[ -z $cc ]]; then
      SKIPPED+=("accept floor: no C compiler")
      FLOOR=0
      return 0
    fi
    "$cc" -O2 -o "$OUT/accept_floor" "$ROOT/scripts/accept_floor.c" || return 1
    FLOOR_BIN=$OUT/accept_floor
  fi
  SERVER_NAME=accept-floor
  SERVER_LOG=
  : >"$OUT/raw/floor.r$round.port"
  "$FLOOR_BIN" >"$OUT/raw/floor.r$round.port" 2>"$OUT/raw/floor.r$round.txt" </dev/null &
  SERVER_PID=$!
  for ((i = 0; i < 50; i++)); do
    [[ -s $OUT/raw/floor.r$round.port ]] && break
    sleep 0.1
  done
  port=$(head -n1 "$OUT/raw/floor.r$round.port")
  [[ -n $port ]] || { log "accept floor did not start"; stop_server; return 1; }
  log "accept floor (round $round/$REPEAT): measure ${DURATION}s"
  run_wrk "$OUT/raw/floor.r$round.wrk.txt" -t "$THREADS" -c "$CONNECTIONS" -d "${DURATION}s" \
    -s "$ROOT/scripts/wrk/plain.lua" "http://127.0.0.1:$port/" || { stop_server; return 1; }
  stop_server
  us=$(grep -o 'us_per_conn=[0-9.]*' "$OUT/raw/floor.r$round.txt" | cut -d= -f2 || true)
  [[ -n $us ]] || { log "accept floor printed no result"; return 1; }
  log "accept floor: ${us} µs CPU per connection"
  FLOOR_VALUES+=("$us")
}

# --- the run ----------------------------------------------------------------------------------

START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= REPEAT; round++)); do
  for name in "${POLICY_LIST[@]}"; do
    if [[ $name == node-* || $name == roundhouse-node-* ]] && ((!HAVE_NODE)); then
      continue
    fi
    SKIP_REASON=
    if ! start_server "$name"; then
      if [[ -n $SKIP_REASON ]]; then
        log "$name skipped: $SKIP_REASON"
        ((round > 1)) || SKIPPED+=("$name: $SKIP_REASON")
        skip_row "$name" "$round" "$SKIP_REASON"
      else
        FAILED+=("$name (round $round): server did not start (see logs/$name.log)")
      fi
      continue
    fi
    for workload in "${WORKLOAD_LIST[@]}"; do
      if ! alive "$SERVER_PID"; then
        FAILED+=("$name/$workload (round $round): server died (see logs/$name.log)")
        break
      fi
      if ! run_cell "$name" "$workload" "$round"; then
        FAILED+=("$name/$workload (round $round): cell failed (see raw/$name.$workload.r$round.*)")
      fi
    done
    stop_server
  done
  if ((FLOOR)) && [[ ,$WORKLOADS, == *,conn-per-request,* ]]; then
    measure_floor "$round" || FAILED+=("accept floor (round $round): failed (see raw/floor.r$round.*)")
  fi
done

# --- report -----------------------------------------------------------------------------------

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

"$PY" - "$OUT/meta.json" "$START" "$WORKERS" "$DURATION" "$WARMUP" "$CONNECTIONS" "$THREADS" \
  "$QUICK" "$CPU_MS" "$REPEAT" "$LOAD_START" "$LOAD_END" "${FLOOR_VALUES[*]-}" "${SKIPPED[@]/#/skip:}" "${FAILED[@]/#/fail:}" <<'EOF'
import json, os, platform, subprocess, sys
(out, start, workers, duration, warmup, conns, threads, quick, cpu_ms, repeat, load0, load1,
 floor, *notes) = sys.argv[1:]
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None
cpu = "?"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
meta = {
    "date": start,
    "machine": f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}",
    "workers": int(workers),
    "duration_s": int(duration),
    "warmup_s": int(warmup),
    "connections": int(conns),
    "wrk_threads": int(threads),
    "quick": quick == "1",
    "mixed_cpu_ms": int(cpu_ms),
    "repeat": int(repeat),
    "accept_floor_us_per_conn": [float(x) for x in floor.split()],
    "loadavg_start": load0,
    "loadavg_end": load1,
    "wrk": (sh("wrk", "--version") or "").splitlines()[0:1],
    "node": sh("node", "--version"),
    "rustc": sh("rustc", "--version"),
    "commit": sh("git", "rev-parse", "--short", "HEAD"),
    "skipped": [n[5:] for n in notes if n.startswith("skip:")],
    "failed": [n[5:] for n in notes if n.startswith("fail:")],
}
meta["skipped"] += meta["failed"]
json.dump(meta, open(out, "w"), indent=2)
EOF

if [[ -s $ROWS ]]; then
  chart_flag=()
  ((CHART)) || chart_flag=(--no-chart)
  "$REPORT_PY" "$REPORT" report --rows "$ROWS" --meta "$OUT/meta.json" --out "$OUT" "${chart_flag[@]}"
  echo
  cat "$OUT/results.md"
else
  log "no cell ran: nothing to report"
  FAILED+=("no results")
fi

if ((${#FAILED[@]})); then
  log "FAILED:"
  printf '  %s\n' "${FAILED[@]}" >&2
  exit 1
fi
log "done: $OUT/results.json, results.md$( ((CHART)) && echo ', shares.png, shares.svg, fairness-cost.png, fairness-cost.svg')"
