#!/usr/bin/env bash
# scripts/connrate.sh [VARIANT...] — connections per second through each tungate variant
# against the kernel path, for an A/B in one run:
#
#   CONNRATE_ROUNDS=3 scripts/connrate.sh before=/tmp/old/tungate-lwip lwip
#
# Per (round, subject), in namespaces created and deleted here (scripts/netns.sh): the
# server namespace answers each 32-byte request with the request and 1 KiB, then closes
# first (`e2e_peer.py serve-answer-close`); the client namespace runs
# `e2e_peer.py churn-server-closes` (CONNRATE_CONNS exchanges, CONNRATE_CONC at a time,
# each answer checked; an exchange over 1 s fails the round). Subjects are interleaved
# round by round; the table gives the median and every round. The client is one Python
# asyncio process: it caps what any subject can show (the kernel row says where).
# CONNRATE_PATTERN=client-closes runs `e2e_peer.py churn` against an echo server instead
# (32 bytes echoed, the client closes first).
# VARIANT: as bench.sh (`lwip`, a path, or LABEL=PATH). Env: CONNRATE_CONNS=5000
# CONNRATE_CONC=50 CONNRATE_ROUNDS=3 CONNRATE_PATTERN=server-closes BENCH_BIN_DIR=target/release.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/netns.sh
source "$REPO/scripts/netns.sh"
CONNRATE_CONNS=${CONNRATE_CONNS:-5000}
CONNRATE_CONC=${CONNRATE_CONC:-50}
CONNRATE_ROUNDS=${CONNRATE_ROUNDS:-3}
CONNRATE_PATTERN=${CONNRATE_PATTERN:-server-closes}
case "$CONNRATE_PATTERN" in
  server-closes) SERVE=serve-answer-close CLIENT=churn-server-closes ;;
  client-closes) SERVE=serve-echo CLIENT=churn ;;
  *) echo "connrate.sh: CONNRATE_PATTERN is server-closes or client-closes" >&2; exit 2 ;;
esac
BENCH_BIN_DIR=${BENCH_BIN_DIR:-$REPO/target/release}
PEER="$REPO/scripts/e2e_peer.py"
PORT=7001

[[ $EUID -eq 0 ]] || { echo "connrate.sh: must run as root (network namespaces)" >&2; exit 2; }
((${#@})) || set -- smoltcp lwip ipstack netstack-smoltcp system
labels=(kernel) paths=("")
for v in "$@"; do
  label=$v path=$v
  [[ "$v" == *=* ]] && { label=${v%%=*}; path=${v#*=}; }
  [[ "$path" == */* ]] || path="$BENCH_BIN_DIR/tungate-$path"
  labels+=("$label") paths+=("$path")
done

# one ID LABEL PATH : prints connections per second, or "failed: reason".
one() {
  local id=$1 label=$2 path=$3 dir out i
  netns_up "$id" 1500 || { echo "failed: namespace setup"; netns_down "$id"; return; }
  dir="${NETNS_RUNDIR}/$id"
  netns_srv_exec "$id" python3 "$PEER" "$SERVE" "$NETNS_SRV_V4" "$PORT" </dev/null >"$dir/srv.log" 2>&1 &
  _nns_record_pid "$id" "$!"
  for ((i = 0; i < 100; i++)); do
    grep -q listening "$dir/srv.log" 2>/dev/null && break
    sleep 0.05
  done
  if [[ -z "$path" ]]; then
    netns_route_baseline "$id"
  elif ! netns_start_gateway "$id" "$path" 1500; then
    echo "failed: gateway did not start"
    netns_down "$id"
    return
  fi
  out=$(timeout 300 ip netns exec "$(netns_cli "$id")" python3 "$PEER" "$CLIENT" "$NETNS_SRV_V4" "$PORT" \
    "$CONNRATE_CONNS" "$CONNRATE_CONC" 2>/dev/null || true)
  if [[ "$out" =~ ^ok\ [a-z-]+\ ([0-9]+)\ connections,.*\ in\ ([0-9.]+)s ]]; then
    awk -v n="${BASH_REMATCH[1]}" -v t="${BASH_REMATCH[2]}" 'BEGIN {printf "%.0f\n", n / t}'
  elif [[ "$out" =~ ([0-9]+\ of\ [0-9]+\ failed\ \([^\)]*\)).*(slowest\ [0-9.]+s) ]]; then
    echo "failed: ${BASH_REMATCH[1]}, ${BASH_REMATCH[2]}"
  else
    echo "failed: ${out:0:80}"
  fi
  [[ -n "$path" ]] && { netns_stop_gateway "$id" || true; }
  netns_down "$id"
}

rows=$(mktemp -d)
trap 'rm -rf "$rows"' EXIT
for ((r = 1; r <= CONNRATE_ROUNDS; r++)); do
  for i in "${!labels[@]}"; do
    res=$(one "cr$$-$r-$i" "${labels[$i]}" "${paths[$i]}")
    printf '[connrate] %s, round %s/%s, %s: %s\n' "$CONNRATE_PATTERN" "$r" "$CONNRATE_ROUNDS" "${labels[$i]}" "$res" >&2
    echo "$res" >>"$rows/$i"
  done
done
echo "| subject | median connections/s | rounds |"
echo "|---|---:|---|"
for i in "${!labels[@]}"; do
  median=$({ grep -E '^[0-9]+$' "$rows/$i" || true; } | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "failed"}')
  echo "| ${labels[$i]} | $median | $(paste -sd ';' "$rows/$i" | sed 's/;/; /g') |"
done
