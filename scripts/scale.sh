#!/usr/bin/env bash
# scripts/scale.sh [VARIANT...] — what held connections cost each tungate variant: RSS and
# fds per held connection, and RSS 10 s after they all closed. Sourced by bench.sh (its
# scale section), runnable alone for an A/B:
#
#   scripts/scale.sh smoltcp system            # target/release/tungate-{smoltcp,system}
#   SCALE_CONNS=10000 scripts/scale.sh before=/tmp/old/tungate-lwip lwip
#
# Per variant, in namespaces created and deleted here (scripts/netns.sh): an asyncio echo
# server in the server namespace; the gateway; then `e2e_peer.py hold` in the client
# namespace opens SCALE_CONNS connections (256 handshakes at a time), each echoing
# SCALE_BYTES bytes checked by digest, and holds them. Samples (from /proc/PID): RSS and
# open fds at idle (before the first connection), while all are held (2 s after the last
# opened), and SCALE_AFTER seconds after every client closed. With SCALE_BURSTS=N the
# hold-and-close repeats N times on one gateway (memory kept after close must not grow
# per burst); the row has the last burst's samples, the log line every burst's "after".
#   per connection = (held - idle) / opened
# Env: SCALE_CONNS=5000 SCALE_BYTES=64 SCALE_AFTER=10 SCALE_BURSTS=1 SCALE_PORT=7000,
# BENCH_BIN_DIR.
# Standalone it prints a table; scale_run appends TSV rows to a file for bench.sh.
set -euo pipefail

SCALE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/netns.sh
source "$SCALE_REPO/scripts/netns.sh"
SCALE_CONNS=${SCALE_CONNS:-5000}
SCALE_BYTES=${SCALE_BYTES:-64}
SCALE_AFTER=${SCALE_AFTER:-10}
SCALE_BURSTS=${SCALE_BURSTS:-1}
SCALE_PORT=${SCALE_PORT:-7000}
SCALE_PEER="$SCALE_REPO/scripts/e2e_peer.py"

_scale_say() { printf '[scale] %s\n' "$*" >&2; }

_scale_rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
_scale_fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

# scale_run ID LABEL BIN OUT [ARG...] : one measurement; appends
# "LABEL<TAB>status<TAB>conns<TAB>opened<TAB>failed<TAB>rss_idle<TAB>rss_held<TAB>rss_after<TAB>fds_idle<TAB>fds_held<TAB>fds_after<TAB>reason"
# to OUT. Never fails the caller: a failure is a row with status FAILED.
scale_run() {
  local id=$1 label=$2 bin=$3 out=$4 gpid srv_pid line opened=0 failed=0 reason="" status=ok
  local rss_idle=0 rss_held=0 rss_after=0 fds_idle=0 fds_held=0 fds_after=0 dir i
  shift 4
  _row() { printf '%s\tFAILED\t%s\t0\t0\t0\t0\t0\t0\t0\t0\t%s\n' "$label" "$SCALE_CONNS" "$1" >>"$out"; }
  if ! netns_up "$id" 1500; then
    _row "namespace setup failed"
    netns_down "$id"
    return 0
  fi
  dir="${NETNS_RUNDIR}/$id"
  netns_srv_exec "$id" python3 "$SCALE_PEER" serve-echo "$NETNS_SRV_V4" "$SCALE_PORT" \
    </dev/null >"$dir/echo.log" 2>&1 &
  srv_pid=$!
  _nns_record_pid "$id" "$srv_pid"
  for ((i = 0; i < 100; i++)); do
    grep -q listening "$dir/echo.log" 2>/dev/null && break
    sleep 0.05
  done
  if ! netns_start_gateway "$id" "$bin" 1500 "$@"; then
    _row "gateway failed to start: $(netns_gateway_error "$id" || true)"
    netns_down "$id"
    return 0
  fi
  gpid=$(netns_gateway_pid "$id")
  sleep 1
  rss_idle=$(_scale_rss_kib "$gpid")
  fds_idle=$(_scale_fds "$gpid")
  local burst afters=""
  for ((burst = 1; burst <= SCALE_BURSTS; burst++)); do
    coproc HOLD { netns_cli_exec "$id" python3 "$SCALE_PEER" hold "$NETNS_SRV_V4" "$SCALE_PORT" "$SCALE_CONNS" "$SCALE_BYTES" 2>&1; }
    local hold_out=${HOLD[0]} hold_in=${HOLD[1]} hold_pid=$HOLD_PID
    _nns_record_pid "$id" "$hold_pid"
    if read -r -t 600 line <&"$hold_out" && [[ "$line" =~ ^ready\ ([0-9]+)\ ([0-9]+)$ ]]; then
      opened=${BASH_REMATCH[1]}
      failed=${BASH_REMATCH[2]}
      sleep 2
      rss_held=$(_scale_rss_kib "$gpid")
      fds_held=$(_scale_fds "$gpid")
      echo close >&"$hold_in"
      if read -r -t 300 line <&"$hold_out" && [[ "$line" == "ok hold"* ]]; then
        sleep "$SCALE_AFTER"
        rss_after=$(_scale_rss_kib "$gpid")
        fds_after=$(_scale_fds "$gpid")
        afters+="${afters:+/}$rss_after"
        ((failed == 0)) || { status=PARTIAL; reason="$failed of $SCALE_CONNS connections failed"; }
      else
        status=FAILED
        reason="closing failed: ${line:0:200}"
      fi
    else
      status=FAILED
      reason="opening failed: ${line:0:200}"
    fi
    _nns_alive "$gpid" || { status=FAILED; reason="gateway died; $reason"; }
    exec {hold_in}>&- || true
    wait "$hold_pid" 2>/dev/null || true
    [[ "$status" == FAILED ]] && break
  done
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$status" "$SCALE_CONNS" "$opened" "$failed" \
    "$rss_idle" "$rss_held" "$rss_after" "$fds_idle" "$fds_held" "$fds_after" "$reason" >>"$out"
  _scale_say "$label: $status, $opened of $SCALE_CONNS held; RSS idle/held/after ${rss_idle}/${rss_held}/${rss_after} KiB (after each of $SCALE_BURSTS bursts: ${afters:-none}); fds ${fds_idle}/${fds_held}/${fds_after} ${reason}"
  netns_stop_gateway "$id" || true
  netns_down "$id"
  return 0
}

# scale_table TSV : the markdown table of scale_run rows.
scale_table() {
  python3 - "$1" <<'PY'
import sys
print("| subject | held | RSS idle KiB | RSS held KiB | KiB per connection | fds per connection | RSS 10 s after close KiB | after close vs idle | fds after close |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    label, status, conns, opened, failed = f[0], f[1], int(f[2]), int(f[3]), int(f[4])
    ri, rh, ra, fi, fh, fa = map(int, f[5:11])
    if status == "FAILED" or opened == 0:
        print(f"| {label} | FAILED: {f[11]} | | | | | | | |")
        continue
    held = f"{opened} of {conns}" if opened < conns else f"{opened}"
    per = (rh - ri) / opened
    fds = (fh - fi) / opened
    print(f"| {label} | {held} | {ri} | {rh} | {per:.1f} | {fds:.2f} | {ra} | +{(ra - ri) / 1024:.1f} MiB ({100 * (ra - ri) / ri:+.0f} %) | {fa} (idle {fi}) |")
PY
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  [[ $EUID -eq 0 ]] || { echo "scale.sh: must run as root (network namespaces)" >&2; exit 2; }
  BENCH_BIN_DIR=${BENCH_BIN_DIR:-$SCALE_REPO/target/release}
  ((${#@})) || set -- smoltcp lwip ipstack netstack-smoltcp system redirect
  rows=$(mktemp)
  trap 'rm -f "$rows"' EXIT
  n=0
  for v in "$@"; do
    label=$v path=$v
    [[ "$v" == *=* ]] && { label=${v%%=*}; path=${v#*=}; }
    [[ "$path" == */* ]] || path="$BENCH_BIN_DIR/tungate-$path"
    n=$((n + 1))
    scale_run "s$$-$n" "$label" "$path" "$rows"
  done
  scale_table "$rows"
fi
