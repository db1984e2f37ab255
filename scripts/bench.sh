#!/usr/bin/env bash
# scripts/bench.sh [VARIANT...] — iperf3 throughput of each tungate variant vs the kernel
# baseline, through namespaces created and deleted here (scripts/netns.sh).
#
# VARIANT: `smoltcp`, `tungate-smoltcp`, or a path to a binary, optionally with flags
# after a slash: `system/offload-off` runs tungate-system --offload off. `LABEL=PATH`
# runs the binary at PATH (named tungate-<variant>) as subject LABEL, so builds of two
# revisions can be compared in one run (`before=/tmp/old/tungate-smoltcp`). Default: every
# target/release/tungate-* that exists, plus system/offload-off and smoltcp/offload-off
# beside the offload (auto) runs. Env:
#   BENCH_MTUS="1500 9000"  BENCH_SECONDS=5  BENCH_ROUNDS=3  BENCH_OMIT=1
#   BENCH_BIN_DIR=target/release  BENCH_RESULTS_DIR=results  BENCH_PORT=5201
# Each (MTU, round, subject) gets a fresh namespace pair (and gateway process), so only one
# gateway is ever up and the baseline/TUN routes never coexist; subjects are interleaved
# round by round. Writes results/bench-<UTC>.md, results/latest.md, results/latest.json.
#
# The SOCKS5 section (BENCH_SOCKS5=1, the default; MTU 1500) runs dante in the server
# namespace and measures, in the same rounds: "socks5-alone" (iperf3 through dante with
# proxychains4, no TUN: the ceiling), tun2proxy from crates.io (installed once into
# TUN2PROXY_ROOT, outside the repository) and every variant with --proxy socks5://.
# The scale section (BENCH_SCALE=1, the default) runs scripts/scale.sh once per variant
# (default flags): RSS and fds per held connection and RSS 10 s after close, for
# SCALE_CONNS (8000 here) connections each echoing 64 bytes, checked against issue 13's
# targets (<= 8 KiB per connection for system, smoltcp and lwIP; after close at most
# max(4 MiB, 20 %) above idle for every variant).
# Exit status: 0 if every measurement succeeded, 1 otherwise.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/netns.sh
source "$REPO/scripts/netns.sh"
# Before scale.sh, whose own default (5000) would otherwise win.
export SCALE_CONNS=${SCALE_CONNS:-8000}
# shellcheck source=scripts/scale.sh
source "$REPO/scripts/scale.sh"

CMDLINE=$(printf '%q ' "$0" "$@")
CMDLINE=${CMDLINE% }
BENCH_MTUS=${BENCH_MTUS:-1500 9000}
BENCH_SECONDS=${BENCH_SECONDS:-5}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_OMIT=${BENCH_OMIT:-1}
BENCH_BIN_DIR=${BENCH_BIN_DIR:-$REPO/target/release}
BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$REPO/results}
BENCH_PORT=${BENCH_PORT:-5201}
BENCH_SOCKS5=${BENCH_SOCKS5:-1}
BENCH_SCALE=${BENCH_SCALE:-1}
TUN2PROXY_VERSION=${TUN2PROXY_VERSION:-0.8.7}
TUN2PROXY_ROOT=${TUN2PROXY_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/tungate/tun2proxy-$TUN2PROXY_VERSION}
SOCKS_ADDR=10.78.0.2
SOCKS_PORT=1080
DIRECTIONS=(upload download)
KNOWN_VARIANTS=" smoltcp lwip ipstack netstack-smoltcp system redirect "

say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 2; }

for v in BENCH_SECONDS BENCH_ROUNDS BENCH_OMIT BENCH_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
((BENCH_ROUNDS >= 1 && BENCH_SECONDS >= 1)) || die "BENCH_ROUNDS and BENCH_SECONDS must be >= 1"
for m in $BENCH_MTUS; do
  [[ "$m" =~ ^[0-9]+$ ]] || die "BENCH_MTUS: bad MTU '$m'"
done
[[ $EUID -eq 0 ]] || die "must run as root (network namespaces)"
for c in ip iperf3 timeout; do
  command -v "$c" >/dev/null 2>&1 || die "'$c' not found (run scripts/install-deps.sh)"
done
if command -v python3 >/dev/null 2>&1; then
  HAVE_PY=1
else
  HAVE_PY=0
  command -v jq >/dev/null 2>&1 || die "need python3 (or jq) to parse iperf3 JSON"
fi
((HAVE_PY)) || say "note: python3 missing: using jq for parsing; no markdown/JSON report will be written"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tungate-bench.XXXXXX")
export NETNS_RUNDIR="$WORK/netns"
RAW="$WORK/raw.tsv"     # section (an MTU, or socks5)  direction  subject  round  status  bps  reason
SCALE_RAW="$WORK/scale.tsv"  # scale_run rows (scripts/scale.sh)
NOTES="$WORK/notes.txt"
: >"$RAW"
: >"$SCALE_RAW"
: >"$NOTES"
IDS=()

# shellcheck disable=SC2317  # invoked via trap
cleanup() {
  local rc=$? id
  trap - EXIT INT TERM
  for id in "${IDS[@]}"; do
    netns_down "$id"
  done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

note() {
  say "note: $*"
  printf '%s\n' "$*" >>"$NOTES"
}

# ---- subjects -------------------------------------------------------------------------
SUBJECTS=(kernel)
declare -A BIN=()
declare -A ARGS=()

add_variant() { # add_variant NAME[/FLAG-VALUE] PATH [LABEL]
  local name=$1 path=$2 short=${1#tungate-} flags=""
  local label=${3:-}
  if [[ "$short" == */* ]]; then
    flags=${short#*/}
    short=${short%%/*}
    [[ "$flags" =~ ^[a-z0-9]+-[a-z0-9]+$ ]] || { note "skipped $name: flags must look like offload-off"; return 0; }
    flags="--${flags%%-*} ${flags#*-}"
  fi
  if [[ "$KNOWN_VARIANTS" != *" $short "* ]]; then
    note "skipped $name: unknown variant (don't know how to run it)"
    return 0
  fi
  [[ -n "$label" ]] && name=$label
  if [[ -n "${BIN[$name]:-}" ]]; then
    return 0
  fi
  if [[ ! -x "$path" || ! -f "$path" ]]; then
    note "requested variant $name not found at $path: its cells are FAILED"
    BIN[$name]="$path"
    SUBJECTS+=("$name")
    return 0
  fi
  BIN[$name]="$path"
  ARGS[$name]="$flags"
  SUBJECTS+=("$name")
}

if (($# > 0)); then
  for a in "$@"; do
    if [[ "$a" == *=* ]]; then
      add_variant "$(basename "${a#*=}")" "${a#*=}" "${a%%=*}"
    elif [[ -f "$a" || "$a" == /* || "$a" == ./* || "$a" == ../* ]]; then
      add_variant "$(basename "$a")" "$a"
    else
      b=${a#tungate-}
      add_variant "tungate-$b" "$BENCH_BIN_DIR/tungate-${b%%/*}"
    fi
  done
else
  shopt -s nullglob
  for f in "$BENCH_BIN_DIR"/tungate-*; do
    b=$(basename "$f")
    # only plain executables named tungate-<name> (skip tungate-*.d, hashed deps, …)
    [[ "$b" =~ ^tungate-[a-z0-9-]+$ && -f "$f" && -x "$f" ]] || continue
    add_variant "$b" "$f"
    # Offload-capable variants run with offload (the default, auto) and without.
    case "$b" in
      tungate-system | tungate-smoltcp) add_variant "$b/offload-off" "$f" ;;
    esac
  done
  shopt -u nullglob
fi
((${#SUBJECTS[@]} > 1)) || note "no gateway variants to run (looked in $BENCH_BIN_DIR): kernel baseline only"
for subj in "${SUBJECTS[@]}"; do
  case "$subj" in
    tungate-system | tungate-smoltcp) note "$subj runs with its default --offload auto (TUN offload on when the kernel takes it)" ;;
    tungate-redirect) note "tungate-redirect: no TUN; nftables REDIRECT to a local listener in the client namespace, kernel sockets spliced: the ceiling for capture approaches" ;;
  esac
done

# The SOCKS5 section: the two references, then each variant (offload default) through dante.
SOCKS_SUBJECTS=()
if [[ "$BENCH_SOCKS5" == 1 ]]; then
  SOCKS_SUBJECTS=(socks5-alone tun2proxy)
  for subj in "${SUBJECTS[@]}"; do
    [[ "$subj" == kernel || "$subj" == */* ]] && continue
    BIN[$subj+socks5]=${BIN[$subj]}
    ARGS[$subj+socks5]="${ARGS[$subj]:-} --proxy socks5://$SOCKS_ADDR:$SOCKS_PORT"
    SOCKS_SUBJECTS+=("$subj+socks5")
  done
  command -v danted >/dev/null 2>&1 || note "danted not found (scripts/install-deps.sh installs dante-server): SOCKS5 cells FAILED"
  command -v proxychains4 >/dev/null 2>&1 || note "proxychains4 not found: socks5-alone cells FAILED"
  if [[ ! -x "$TUN2PROXY_ROOT/bin/tun2proxy-bin" ]]; then
    say "installing tun2proxy $TUN2PROXY_VERSION from crates.io into $TUN2PROXY_ROOT (once; a few minutes)"
    cargo install tun2proxy --version "$TUN2PROXY_VERSION" --locked --root "$TUN2PROXY_ROOT" >&2 ||
      note "cargo install tun2proxy $TUN2PROXY_VERSION failed: tun2proxy cells FAILED"
  fi
  BIN[tun2proxy]="$TUN2PROXY_ROOT/bin/tun2proxy-bin"
  note "SOCKS5 section (MTU 1500): dante $(danted -v 2>/dev/null | head -n 1 | awk '{print $2}' | sed 's/\.$//') in the server namespace on $SOCKS_ADDR:$SOCKS_PORT; socks5-alone = iperf3 under proxychains4 through it (no TUN); tun2proxy $TUN2PROXY_VERSION (crates.io) --tcp-mss 1460 --proxy socks5:// to it; each variant with --proxy socks5:// to it"
fi

# ---- metadata (taken before anything is written under results/) -----------------------
META_NPROC=$(nproc 2>/dev/null || echo "?")
META_CPU=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)
META_CPU=${META_CPU:-unknown}
META_MEM=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2/1048576; exit}' /proc/meminfo 2>/dev/null || true)
META_KERNEL=$(uname -r)
META_RUSTC=$(rustc -V 2>/dev/null || echo "rustc not found")
META_IPERF=$(iperf3 --version 2>/dev/null | head -n 1 || true)
if META_GIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null); then
  if [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null || true)" ]]; then
    META_GIT+="-dirty"
  fi
else
  META_GIT="(no commit)"
fi
META_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

# ---- measurement ----------------------------------------------------------------------
record() { # record MTU DIR SUBJECT ROUND STATUS BPS REASON
  local reason=${7//$'\t'/ }
  reason=${reason//$'\n'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$reason" >>"$RAW"
}

progress() { # progress MTU DIR ROUND SUBJECT TEXT
  printf '[bench] mtu=%s %s round %s/%s %s: %s\n' "$1" "$2" "$3" "$BENCH_ROUNDS" "$4" "$5"
}

fail_all_dirs() { # fail_all_dirs MTU ROUND SUBJECT REASON
  local d
  for d in "${DIRECTIONS[@]}"; do
    record "$1" "$d" "$3" "$2" FAILED "" "$4"
    progress "$1" "$d" "$2" "$3" "FAILED ($4)"
  done
}

# parse_bps < iperf3-json  ->  "<bps>" or "ERR <reason>"
parse_bps() {
  if ((HAVE_PY)); then
    python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
except Exception as e:
    print("ERR iperf3 produced no valid JSON (%s)" % e.__class__.__name__); sys.exit(0)
if d.get("error"):
    print("ERR iperf3: %s" % d["error"]); sys.exit(0)
try:
    bps = float(d["end"]["sum_received"]["bits_per_second"])
except Exception:
    print("ERR iperf3 JSON has no end.sum_received.bits_per_second"); sys.exit(0)
print("ERR zero throughput" if bps <= 0 else "%.0f" % bps)
'
  else
    jq -r 'if .error then "ERR iperf3: " + .error
           else (.end.sum_received.bits_per_second // "ERR no sum_received" | tostring) end' 2>/dev/null ||
      echo "ERR iperf3 produced no valid JSON"
  fi
}

gbps() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e9 }'; }

# run_iperf ID DIRECTION [WRAPPER...] -> prints "<bps>" or "ERR <reason>"
run_iperf() {
  local id=$1 dir=$2 out errf res rc=0
  shift 2
  local args=(-c "$NETNS_SRV_V4" -p "$BENCH_PORT" -t "$BENCH_SECONDS" -O "$BENCH_OMIT" -J --connect-timeout 3000)
  [[ "$dir" == download ]] && args+=(-R)
  errf="$WORK/iperf-client.err"
  out=$(timeout -k 5 $((BENCH_SECONDS + BENCH_OMIT + 30)) \
    ip netns exec "$(netns_cli "$id")" "$@" iperf3 "${args[@]}" 2>"$errf") || rc=$?
  res=$(printf '%s' "$out" | parse_bps)
  if [[ "$res" != ERR* ]] && ((rc != 0)); then
    res="ERR iperf3 exited $rc"
  fi
  if [[ "$res" == ERR* && $rc -eq 124 ]]; then
    res="ERR iperf3 timed out"
  fi
  if [[ "$res" == ERR* && -s "$errf" ]]; then
    res+=" ($(tail -n 1 "$errf"))"
  fi
  printf '%s\n' "$res"
}

# start_dante ID: dante (no authentication) in the server namespace on SOCKS_ADDR:SOCKS_PORT.
start_dante() {
  local id=$1 conf="$WORK/danted.conf" i
  cat >"$conf" <<DANTE
logoutput: $WORK/danted-$1.log
internal: $SOCKS_ADDR port = $SOCKS_PORT
external: $NETNS_SRV_V4
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }
socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }
DANTE
  netns_srv_exec "$id" danted -f "$conf" </dev/null >/dev/null 2>&1 &
  _nns_record_pid "$id" $!
  for ((i = 0; i < 100; i++)); do
    [[ -n "$(netns_srv_exec "$id" ss -Hltn "sport = :$SOCKS_PORT" 2>/dev/null)" ]] && return 0
    sleep 0.05
  done
  return 1
}

# start_tun2proxy ID MTU: tun2proxy's own TUN in the client namespace, routed like ours.
start_tun2proxy() {
  local id=$1 mtu=$2 cli i log
  cli=$(netns_cli "$id")
  log=$(netns_gateway_log "$id")
  mkdir -p "$(dirname "$log")"
  # --tcp-mss: without it tun2proxy's stack advertises no MSS and Linux falls back to 536
  # bytes; the comparison runs it at its best, with the MSS our variants use.
  ip netns exec "$cli" "${BIN[tun2proxy]}" --tun "$NETNS_TUN" --mtu "$mtu" --tcp-mss $((mtu - 40)) \
    --proxy "socks5://$SOCKS_ADDR:$SOCKS_PORT" </dev/null >"$log" 2>&1 &
  _nns_record_pid "$id" $!
  # Without --setup (which would rewrite the namespace's default route), tun2proxy only
  # creates the TUN: address it and bring it up as our gateway does for itself.
  for ((i = 0; i < 100; i++)); do
    if ip -n "$cli" link show "$NETNS_TUN" >/dev/null 2>&1; then
      ip -n "$cli" addr add "$NETNS_TUN_ADDR4" dev "$NETNS_TUN" &&
        ip -n "$cli" link set "$NETNS_TUN" up txqueuelen "$NETNS_TUN_TXQUEUELEN" &&
        ip -n "$cli" route replace "$NETNS_SRV_NET4" dev "$NETNS_TUN" && return 0
      return 1
    fi
    sleep 0.05
  done
  return 1
}

SEQ=0
run_subject_round() { # SECTION MTU ROUND SUBJECT
  local section=$1 mtu=$2 round=$3 subj=$4 id res d reason gpid line wrapper=()
  SEQ=$((SEQ + 1))
  id="b$$-$SEQ"
  IDS+=("$id")

  if [[ "$subj" != kernel && "$subj" != socks5-alone && ! -x "${BIN[$subj]}" ]]; then
    fail_all_dirs "$section" "$round" "$subj" "binary not found: ${BIN[$subj]}"
    return 0
  fi
  if ! netns_up "$id" "$mtu"; then
    fail_all_dirs "$section" "$round" "$subj" "namespace setup failed"
    netns_down "$id"
    return 0
  fi
  if ! netns_start_iperf_server "$id" "$BENCH_PORT"; then
    fail_all_dirs "$section" "$round" "$subj" "iperf3 server did not start"
    netns_down "$id"
    return 0
  fi
  if [[ "$section" == socks5 ]] && ! start_dante "$id"; then
    fail_all_dirs "$section" "$round" "$subj" "dante did not start"
    netns_down "$id"
    return 0
  fi
  if [[ "$subj" == socks5-alone ]]; then
    printf 'strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\nsocks5 %s %s\n' \
      "$SOCKS_ADDR" "$SOCKS_PORT" >"$WORK/proxychains.conf"
    wrapper=(proxychains4 -q -f "$WORK/proxychains.conf")
  elif [[ "$subj" == tun2proxy ]]; then
    if ! start_tun2proxy "$id" "$mtu"; then
      fail_all_dirs "$section" "$round" "$subj" "tun2proxy: no $NETNS_TUN, or setting it up failed"
      netns_down "$id"
      return 0
    fi
  elif [[ "$subj" == kernel ]]; then
    if ! netns_route_baseline "$id"; then
      fail_all_dirs "$section" "$round" "$subj" "baseline route setup failed"
      netns_down "$id"
      return 0
    fi
  else
    # shellcheck disable=SC2086  # ARGS holds flags, split on purpose
    if ! netns_start_gateway "$id" "${BIN[$subj]}" "$mtu" ${ARGS[$subj]}; then
      line=$(grep -v '^#' "$(netns_gateway_log "$id")" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' |
        grep -v '^[[:space:]]*$' | tail -n 1 || true)
      reason=$(netns_gateway_error "$id" || true)
      reason=${reason:-gateway failed to start}
      [[ -n "$line" ]] && reason+="; last log line: ${line:0:200}"
      fail_all_dirs "$section" "$round" "$subj" "$reason"
      netns_down "$id"
      return 0
    fi
  fi

  for d in "${DIRECTIONS[@]}"; do
    gpid=""
    if [[ "$subj" != kernel && "$subj" != socks5-alone && "$subj" != tun2proxy ]]; then
      gpid=$(netns_gateway_pid "$id" || true)
      if [[ -z "$gpid" ]] || ! _nns_alive "$gpid"; then
        record "$section" "$d" "$subj" "$round" FAILED "" "gateway died"
        progress "$section" "$d" "$round" "$subj" "FAILED (gateway died)"
        continue
      fi
    fi
    res=$(run_iperf "$id" "$d" "${wrapper[@]}")
    if [[ "$res" == ERR* ]]; then
      reason=${res#ERR }
      if [[ -n "$gpid" ]] && ! _nns_alive "$gpid"; then
        reason="gateway died during the test; $reason"
        say "gateway log tail ($subj, mtu $mtu):"
        tail -n 20 "$(netns_gateway_log "$id")" >&2 || true
      fi
      record "$section" "$d" "$subj" "$round" FAILED "" "$reason"
      progress "$section" "$d" "$round" "$subj" "FAILED ($reason)"
      # a failed client can leave iperf3 -s wedged: restart it for the next direction
      netns_stop_iperf_server "$id" "$BENCH_PORT"
      netns_start_iperf_server "$id" "$BENCH_PORT" || true
    else
      record "$section" "$d" "$subj" "$round" ok "$res" ""
      progress "$section" "$d" "$round" "$subj" "$(gbps "$res") Gbit/s"
    fi
  done

  [[ "$subj" != kernel && "$subj" != socks5-alone ]] && netns_stop_gateway "$id"
  netns_down "$id"
  return 0
}

say "subjects: ${SUBJECTS[*]}; MTUs: $BENCH_MTUS; ${BENCH_ROUNDS} rounds x ${BENCH_SECONDS}s (+${BENCH_OMIT}s omitted)"
for mtu in $BENCH_MTUS; do
  for ((round = 1; round <= BENCH_ROUNDS; round++)); do
    for subj in "${SUBJECTS[@]}"; do
      run_subject_round "$mtu" "$mtu" "$round" "$subj"
    done
  done
done
if ((${#SOCKS_SUBJECTS[@]})); then
  say "SOCKS5 section: ${SOCKS_SUBJECTS[*]}; MTU 1500"
  for ((round = 1; round <= BENCH_ROUNDS; round++)); do
    for subj in "${SOCKS_SUBJECTS[@]}"; do
      run_subject_round socks5 1500 "$round" "$subj"
    done
  done
fi

if [[ "$BENCH_SCALE" == 1 ]]; then
  say "scale section: $SCALE_CONNS held connections per variant (default flags)"
  for subj in "${SUBJECTS[@]}"; do
    [[ "$subj" == kernel || -n "${ARGS[$subj]}" ]] && continue
    SEQ=$((SEQ + 1))
    IDS+=("b$$-$SEQ")
    scale_run "b$$-$SEQ" "$subj" "${BIN[$subj]}" "$SCALE_RAW"
  done
fi

FAILED=0
if grep -q $'\tFAILED\t' "$RAW" "$SCALE_RAW"; then FAILED=1; fi

# ---- report ---------------------------------------------------------------------------
if ((HAVE_PY)); then
  mkdir -p "$BENCH_RESULTS_DIR"
  MD="$BENCH_RESULTS_DIR/bench-$STAMP.md"
  export META_NPROC META_CPU META_MEM META_KERNEL META_RUSTC META_IPERF META_GIT META_DATE CMDLINE
  export BENCH_MTUS BENCH_SECONDS BENCH_ROUNDS BENCH_OMIT
  SOCKS_LIST="${SOCKS_SUBJECTS[*]}"
  export SOCKS_LIST SCALE_RAW SCALE_CONNS SCALE_BYTES SCALE_AFTER
  python3 - "$RAW" "$NOTES" "$MD" "$BENCH_RESULTS_DIR/latest.json" "${SUBJECTS[@]}" <<'PY'
import json, os, statistics, sys

raw, notes_path, md_path, json_path, *subjects = sys.argv[1:]
env = os.environ
mtus = [int(m) for m in env["BENCH_MTUS"].split()]
directions = ["upload", "download"]

cells = {}  # (mtu, dir, subject) -> [round dicts]
with open(raw) as f:
    for line in f:
        line = line.rstrip("\n")
        if not line:
            continue
        section, d, subj, rnd, status, bps, reason = line.split("\t")
        r = {"round": int(rnd), "status": status}
        if status == "ok":
            r["bits_per_second"] = float(bps)
            r["gbps"] = round(float(bps) / 1e9, 3)
        else:
            r["reason"] = reason
        cells.setdefault((section, d, subj), []).append(r)

with open(notes_path) as f:
    notes = [l.strip() for l in f if l.strip()]

def median_gbps(rounds):
    ok = [r["bits_per_second"] for r in rounds if r["status"] == "ok"]
    return round(statistics.median(ok) / 1e9, 3) if ok else None

socks_subjects = env.get("SOCKS_LIST", "").split()
# A section: its key in the raw file, its MTU, its subjects, its baseline and a second
# reference (the SOCKS5 section compares with tun2proxy too).
sections = [(str(m), m, subjects, "kernel", None) for m in mtus]
if socks_subjects:
    sections.append(("socks5", 1500, socks_subjects, "socks5-alone", "tun2proxy"))

def ratio(med, key, d, ref):
    base = median_gbps(cells.get((key, d, ref), [])) if ref else None
    return round(med / base, 3) if (med is not None and base) else None

results, failures = [], []
for key, mtu, subjs, baseline, second in sections:
    for subj in subjs:
        for d in directions:
            rounds = sorted(cells.get((key, d, subj), []), key=lambda r: r["round"])
            med = median_gbps(rounds)
            entry = {"section": key, "mtu": mtu, "direction": d, "subject": subj, "median_gbps": med,
                     "baseline": baseline, "ratio_to_baseline": ratio(med, key, d, baseline), "rounds": rounds}
            if second:
                entry["ratio_to_" + second] = ratio(med, key, d, second)
            results.append(entry)
            for r in rounds:
                if r["status"] != "ok":
                    failures.append("%s %s round %d %s: %s" % ("mtu=" + key if key != "socks5" else key, d, r["round"], subj, r["reason"]))

meta = {
    "machine": {"nproc": env["META_NPROC"], "cpu": env["META_CPU"], "memory": env["META_MEM"]},
    "kernel": env["META_KERNEL"], "rustc": env["META_RUSTC"], "iperf3": env["META_IPERF"],
    "git": env["META_GIT"], "date": env["META_DATE"], "command": env["CMDLINE"],
}
config = {"mtus": mtus, "seconds": int(env["BENCH_SECONDS"]), "omit_seconds": int(env["BENCH_OMIT"]),
          "rounds": int(env["BENCH_ROUNDS"]), "streams": 1, "baseline": "kernel",
          "directions": {"upload": "iperf3 -c (cli -> srv)", "download": "iperf3 -c -R (srv -> cli)"}}

def fmt(x):
    return "FAILED" if x is None else "%.2f" % x

L = []
L.append("# tungate throughput benchmark")
L.append("")
L.append("- machine: %s CPUs, %s, %s RAM" % (meta["machine"]["nproc"], meta["machine"]["cpu"], meta["machine"]["memory"]))
L.append("- kernel: %s" % meta["kernel"])
L.append("- rustc: %s" % meta["rustc"])
L.append("- iperf3: %s" % meta["iperf3"])
L.append("- git: %s" % meta["git"])
L.append("- date: %s" % meta["date"])
L.append("- command: `%s`" % meta["command"])
L.append("- method: iperf3 single TCP stream, %ds (+%ds omitted), %d rounds, subjects interleaved round by round; "
         "fresh namespace pair and gateway process per subject and round; ratio = median / kernel-baseline median "
         "of this run" % (config["seconds"], config["omit_seconds"], config["rounds"]))
L.append("")
def fmt_ratio(x):
    return "-" if x is None else "%.2f" % x

for key, mtu, subjs, baseline, second in sections:
    if key == "socks5":
        L.append("## SOCKS5 (dante in the server namespace), MTU 1500")
        L.append("")
        L.append("Ratios to `socks5-alone` (iperf3 through dante with proxychains4, no TUN: the ceiling) "
                 "and to `tun2proxy`, both measured in the same rounds.")
        L.append("")
        L.append("| subject | direction | median Gbit/s | ratio to socks5-alone | ratio to tun2proxy | all rounds (Gbit/s) |")
        L.append("|---|---|---:|---:|---:|---|")
    else:
        L.append("## MTU %d" % mtu)
        L.append("")
        L.append("| subject | direction | median Gbit/s | ratio to baseline | all rounds (Gbit/s) |")
        L.append("|---|---|---:|---:|---|")
    for r in results:
        if r["section"] != key:
            continue
        allr = ", ".join("%.2f" % x["gbps"] if x["status"] == "ok" else "FAILED" for x in r["rounds"])
        cols = [r["subject"], r["direction"], fmt(r["median_gbps"]), fmt_ratio(r["ratio_to_baseline"])]
        if second:
            cols.append(fmt_ratio(r.get("ratio_to_" + second)))
        cols.append(allr or "-")
        L.append("| " + " | ".join(cols) + " |")
    L.append("")
# Held connections (scripts/scale.sh) against issue 13's targets.
scale = []
with open(env["SCALE_RAW"]) as f:
    for line in f:
        c = line.rstrip("\n").split("\t")
        if len(c) < 12:
            continue
        row = {"subject": c[0], "status": c[1], "connections": int(c[2]), "opened": int(c[3]), "failed": int(c[4]),
               "rss_idle_kib": int(c[5]), "rss_held_kib": int(c[6]), "rss_after_kib": int(c[7]),
               "fds_idle": int(c[8]), "fds_held": int(c[9]), "fds_after": int(c[10]), "reason": c[11]}
        if row["status"] != "FAILED" and row["opened"]:
            n = row["opened"]
            row["kib_per_connection"] = round((row["rss_held_kib"] - row["rss_idle_kib"]) / n, 1)
            row["fds_per_connection"] = round((row["fds_held"] - row["fds_idle"]) / n, 2)
            allowed = max(4096, row["rss_idle_kib"] * 0.2)
            row["after_close_ok"] = row["rss_after_kib"] - row["rss_idle_kib"] <= allowed
            small = row["subject"].replace("tungate-", "") in ("system", "smoltcp", "lwip")
            row["per_connection_ok"] = row["kib_per_connection"] <= 8 if small else None
        else:
            failures.append("scale %s: %s" % (row["subject"], row["reason"]))
        scale.append(row)
if scale:
    L.append("## Held connections (%s at once, %s bytes echoed each, MTU 1500)" % (env["SCALE_CONNS"], env.get("SCALE_BYTES", "64")))
    L.append("")
    L.append("scripts/scale.sh: gateway RSS and open fds (from /proc) at idle, with every connection held (2 s after "
             "the last opened) and %s s after every client closed. Per connection = (held - idle) / held. Targets: "
             "<= 8 KiB per connection for system, smoltcp and lwIP; after close at most max(4 MiB, 20 %%) above idle." % env.get("SCALE_AFTER", "10"))
    L.append("")
    L.append("| subject | held | RSS idle KiB | RSS held KiB | KiB per connection | <= 8 KiB | fds per connection | RSS after close KiB | after close vs idle | within max(4 MiB, 20 %) | fds after close (idle) |")
    L.append("|---|---:|---:|---:|---:|:-:|---:|---:|---:|:-:|---:|")
    yes = lambda b: "-" if b is None else ("yes" if b else "**no**")
    for r in scale:
        if "kib_per_connection" not in r:
            L.append("| %s | FAILED: %s | | | | | | | | | |" % (r["subject"], r["reason"]))
            continue
        held = str(r["opened"]) if r["opened"] == r["connections"] else "%d of %d" % (r["opened"], r["connections"])
        d = r["rss_after_kib"] - r["rss_idle_kib"]
        L.append("| %s | %s | %d | %d | %.1f | %s | %.2f | %d | %+.1f MiB (%+.0f %%) | %s | %d (%d) |" % (
            r["subject"], held, r["rss_idle_kib"], r["rss_held_kib"], r["kib_per_connection"], yes(r["per_connection_ok"]),
            r["fds_per_connection"], r["rss_after_kib"], d / 1024, 100 * d / r["rss_idle_kib"], yes(r["after_close_ok"]),
            r["fds_after"], r["fds_idle"]))
    L.append("")

if failures:
    L.append("## Failures")
    L.append("")
    L.extend("- " + x for x in failures)
    L.append("")
if notes:
    L.append("## Notes")
    L.append("")
    L.extend("- " + x for x in notes)
    L.append("")

text = "\n".join(L)
with open(md_path, "w") as f:
    f.write(text)
with open(os.path.join(os.path.dirname(md_path), "latest.md"), "w") as f:
    f.write(text)
with open(json_path, "w") as f:
    json.dump({"meta": meta, "config": config, "subjects": subjects, "socks5_subjects": socks_subjects, "results": results,
               "scale": scale,
               "failures": failures, "notes": notes, "failed": bool(failures),
               "report": os.path.basename(md_path)}, f, indent=2)
    f.write("\n")
PY
  say "wrote $MD, $BENCH_RESULTS_DIR/latest.md, $BENCH_RESULTS_DIR/latest.json"
  cat "$BENCH_RESULTS_DIR/latest.md"
fi

if ((FAILED)); then
  say "some measurements FAILED (see the report)"
  exit 1
fi
exit 0
