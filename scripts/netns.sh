# shellcheck shell=bash
# scripts/netns.sh — sourceable bash library: the tungate test/bench topology in
# network namespaces that it creates and deletes itself (see the netns-testing guide).
#
#   ns "tg-srv-<ID>": lo    10.77.0.2/32, fd77::2/128        (servers bind here)
#                     s0    10.78.0.2/24, fd78::2/64          (veth)
#   ns "tg-cli-<ID>": c0    10.78.0.1/24, fd78::1/64          (veth peer)
#                     tun0  198.18.0.1/24, fd18::1/64         (created by the gateway)
#                     main:      10.77.0.0/24 dev tun0        fd77::/64 dev tun0
#                     rule:      fwmark 0x100 lookup 100      (v4 and v6)
#                     table 100: 10.77.0.0/24 via 10.78.0.2   fd77::/64 via fd78::2
#   kernel baseline:  main: 10.77.0.0/24 via 10.78.0.2  (no TUN)
#
# Nothing here touches the root namespace: every `ip` call carries `-n NS` or runs
# under `ip netns exec NS`, and the veth pair is created directly inside the namespaces.
#
# API (every function returns non-zero with a message on stderr on failure, and works
# both under `set -euo pipefail` and inside `if`/`||`):
#   netns_up ID MTU                      create both namespaces + veth (MTU), addresses, lo up
#   netns_route_baseline ID              kernel path: 10.77.0.0/24 (+fd77::/64) via the veth
#   netns_start_gateway ID BIN MTU [ARG...]   start BIN in the cli ns, wait for tun0, add routes
#                                        (tungate-redirect: baseline route + an nftables
#                                        REDIRECT rule in the cli ns instead of a TUN)
#   netns_stop_gateway ID                remove routes, SIGTERM (15 s) then SIGKILL
#   netns_start_iperf_server ID [PORT]   iperf3 -s -B 10.77.0.2 in the srv ns (tracked pid)
#   netns_stop_iperf_server ID
#   netns_down ID                        kill everything, delete both namespaces (idempotent,
#                                        never fails: safe in a trap)
#   netns_srv ID / netns_cli ID          print the namespace names
#   netns_srv_exec ID CMD... / netns_cli_exec ID CMD...
#   netns_gateway_log ID / netns_gateway_pid ID / netns_gateway_error ID (why start failed)
#
# Tunables (set before sourcing or before calling): NETNS_RUNDIR, NETNS_IPV6 (1),
# NETNS_MARK (0x100), NETNS_TABLE (100), NETNS_GATEWAY_TIMEOUT (5), NETNS_GATEWAY_OWN (0: pass
# --proxy/--log-level too; 1: only --tun/--mtu/--address/--mark), NETNS_GATEWAY_LOG_LEVEL
# (info), NETNS_TUN_TXQUEUELEN (10000), NETNS_KEEP_STATE (0: state dir removed by netns_down),
# NETNS_GATEWAY_SETUP (0; 1: the gateway runs with --setup, netns_start_gateway adds no routes),
# NETNS_GATEWAY_WRAP (a command the gateway runs under, e.g. `setpriv …` for another user).

if [[ -n "${_TUNGATE_NETNS_SH_LOADED:-}" ]]; then
  return 0
fi
_TUNGATE_NETNS_SH_LOADED=1

: "${NETNS_RUNDIR:=${TMPDIR:-/tmp}/tungate-netns}"
: "${NETNS_IPV6:=1}"
: "${NETNS_MARK:=0x100}"
: "${NETNS_TABLE:=100}"
: "${NETNS_RULE_PREF:=100}"
: "${NETNS_GATEWAY_TIMEOUT:=5}"
: "${NETNS_GATEWAY_LOG_LEVEL:=info}"
: "${NETNS_TUN_TXQUEUELEN:=10000}"
: "${NETNS_KEEP_STATE:=0}"

NETNS_SRV_V4=10.77.0.2
NETNS_SRV_V6=fd77::2
NETNS_SRV_NET4=10.77.0.0/24
NETNS_SRV_NET6=fd77::/64
NETNS_VETH_SRV_V4=10.78.0.2
NETNS_VETH_CLI_V4=10.78.0.1
NETNS_VETH_SRV_V6=fd78::2
NETNS_VETH_CLI_V6=fd78::1
NETNS_VETH_CLI=c0
NETNS_VETH_SRV=s0
NETNS_TUN=tun0
NETNS_TUN_ADDR4=198.18.0.1/24
NETNS_TUN_ADDR6=fd18::1/64

_nns_log() { printf '[netns] %s\n' "$*" >&2; }
_nns_err() { printf '[netns] ERROR: %s\n' "$*" >&2; }

# Run a command; on failure print it with its status and return 1.
_nns_do() {
  "$@" || {
    local rc=$?
    _nns_err "command failed (rc=$rc): $*"
    return 1
  }
}

_nns_check_id() {
  [[ "${1:-}" =~ ^[A-Za-z0-9_.-]{1,40}$ ]] || { _nns_err "bad namespace ID '${1:-}' (want [A-Za-z0-9_.-]{1,40})"; return 1; }
}

netns_srv() { printf 'tg-srv-%s\n' "$1"; }
netns_cli() { printf 'tg-cli-%s\n' "$1"; }
_nns_dir() { printf '%s/%s\n' "$NETNS_RUNDIR" "$1"; }
_nns_exists() { [[ -e "/run/netns/$1" ]]; }

netns_srv_exec() { local id=$1; shift; ip netns exec "tg-srv-$id" "$@"; }
netns_cli_exec() { local id=$1; shift; ip netns exec "tg-cli-$id" "$@"; }
netns_gateway_log() { printf '%s/gateway.log\n' "$(_nns_dir "$1")"; }
netns_gateway_error() {
  local f
  f="$(_nns_dir "$1")/gateway.error"
  [[ -s "$f" ]] && cat "$f"
}
netns_gateway_pid() {
  local f
  f="$(_nns_dir "$1")/gateway.pid"
  [[ -s "$f" ]] && cat "$f"
}

# Alive = /proc entry exists and it is not a zombie.
_nns_alive() {
  local pid=$1 stat
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat:0:1}" != Z ]]
}

# Whether PID lives in one of this library's namespaces (tg-srv-*/tg-cli-*). A recorded
# pid may have exited and been reused by an unrelated process elsewhere: never signal that.
_nns_pid_in_our_ns() {
  local pid=$1 ino f
  ino=$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) || return 1
  for f in /run/netns/tg-srv-* /run/netns/tg-cli-*; do
    [[ -e "$f" ]] || continue
    [[ "$(stat -L -c %i "$f" 2>/dev/null)" == "$ino" ]] && return 0
  done
  return 1
}

# _nns_kill_wait SECONDS PID... : SIGTERM, wait up to SECONDS, then SIGKILL. Never fails.
# Only processes inside our namespaces are signalled.
_nns_kill_wait() {
  local secs=$1 pid i alive ours=()
  shift
  for pid in "$@"; do
    _nns_alive "$pid" && _nns_pid_in_our_ns "$pid" && ours+=("$pid")
  done
  set -- "${ours[@]}"
  (($# > 0)) || return 0
  for pid in "$@"; do
    _nns_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  for ((i = 0; i < secs * 20; i++)); do
    alive=0
    for pid in "$@"; do
      if _nns_alive "$pid"; then alive=1; break; fi
    done
    ((alive)) || break
    sleep 0.05
  done
  for pid in "$@"; do
    if _nns_alive "$pid"; then
      _nns_log "pid $pid did not exit after SIGTERM within ${secs}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  # Reap our own children (silently ignore pids that are not children of this shell).
  for pid in "$@"; do
    wait "$pid" 2>/dev/null || true
  done
  return 0
}

_nns_record_pid() {
  local dir
  dir=$(_nns_dir "$1")
  mkdir -p "$dir" && printf '%s\n' "$2" >>"$dir/pids"
}

_nns_sysctls() {
  local ns=$1 kv
  shift
  for kv in "$@"; do
    _nns_do ip netns exec "$ns" sysctl -qw "$kv" >/dev/null || return 1
  done
}

# netns_up ID MTU
netns_up() {
  local id=${1:-} mtu=${2:-} srv cli
  _nns_check_id "$id" || return 1
  [[ "$mtu" =~ ^[0-9]+$ ]] && ((mtu >= 576 && mtu <= 65535)) || {
    _nns_err "netns_up: bad MTU '$mtu'"
    return 1
  }
  [[ $EUID -eq 0 ]] || { _nns_err "netns_up: must run as root"; return 1; }
  srv=$(netns_srv "$id")
  cli=$(netns_cli "$id")
  if _nns_exists "$srv" || _nns_exists "$cli"; then
    _nns_err "netns_up: namespace $srv or $cli already exists (stale? run netns_down $id)"
    return 1
  fi
  if ! _nns_up_body "$id" "$mtu" "$srv" "$cli"; then
    _nns_err "netns_up $id failed: removing the half-built namespaces"
    netns_down "$id"
    return 1
  fi
}

_nns_up_body() {
  local id=$1 mtu=$2 srv=$3 cli=$4 dir
  dir=$(_nns_dir "$id")
  mkdir -p "$dir" || { _nns_err "cannot create $dir"; return 1; }
  : >"$dir/pids"

  _nns_do ip netns add "$srv" || return 1
  _nns_do ip netns add "$cli" || return 1

  # Before any interface exists, so `default.*` applies to veth and tun too.
  # rp_filter loose (2): the gateway's marked upstream replies arrive on c0 while the
  # main table routes 10.77.0.0/24 to tun0. No DAD / RA: addresses usable at once.
  local common=(
    net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2
    net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
    net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0
  )
  _nns_sysctls "$srv" "${common[@]}" || return 1
  _nns_sysctls "$cli" "${common[@]}" net.ipv4.conf.all.src_valid_mark=1 || return 1

  _nns_do ip -n "$srv" link set lo up || return 1
  _nns_do ip -n "$cli" link set lo up || return 1

  # veth created inside cli with its peer moved straight into srv: never in the root ns.
  _nns_do ip -n "$cli" link add "$NETNS_VETH_CLI" type veth peer name "$NETNS_VETH_SRV" netns "$srv" || return 1
  _nns_do ip -n "$cli" link set "$NETNS_VETH_CLI" mtu "$mtu" || return 1
  _nns_do ip -n "$srv" link set "$NETNS_VETH_SRV" mtu "$mtu" || return 1

  _nns_do ip -n "$srv" addr add "$NETNS_SRV_V4/32" dev lo || return 1
  _nns_do ip -n "$srv" addr add "$NETNS_VETH_SRV_V4/24" dev "$NETNS_VETH_SRV" || return 1
  _nns_do ip -n "$cli" addr add "$NETNS_VETH_CLI_V4/24" dev "$NETNS_VETH_CLI" || return 1
  if [[ "$NETNS_IPV6" == 1 ]]; then
    _nns_do ip -n "$srv" -6 addr add "$NETNS_SRV_V6/128" dev lo nodad || return 1
    _nns_do ip -n "$srv" -6 addr add "$NETNS_VETH_SRV_V6/64" dev "$NETNS_VETH_SRV" nodad || return 1
    _nns_do ip -n "$cli" -6 addr add "$NETNS_VETH_CLI_V6/64" dev "$NETNS_VETH_CLI" nodad || return 1
  fi
  _nns_do ip -n "$srv" link set "$NETNS_VETH_SRV" up || return 1
  _nns_do ip -n "$cli" link set "$NETNS_VETH_CLI" up || return 1
  # srv's return path to 10.78.0.0/24 (incl. 10.78.0.1) and fd78::/64 is the connected route.
  return 0
}

# netns_route_baseline ID : kernel path cli -> srv over the veth, no TUN.
netns_route_baseline() {
  local id=${1:-} cli
  _nns_check_id "$id" || return 1
  cli=$(netns_cli "$id")
  _nns_exists "$cli" || { _nns_err "netns_route_baseline: $cli does not exist"; return 1; }
  _nns_do ip -n "$cli" route replace "$NETNS_SRV_NET4" via "$NETNS_VETH_SRV_V4" dev "$NETNS_VETH_CLI" || return 1
  if [[ "$NETNS_IPV6" == 1 ]]; then
    _nns_do ip -n "$cli" -6 route replace "$NETNS_SRV_NET6" via "$NETNS_VETH_SRV_V6" dev "$NETNS_VETH_CLI" || return 1
  fi
}

netns_unroute_baseline() {
  local id=${1:-} cli
  cli=$(netns_cli "$id")
  ip -n "$cli" route del "$NETNS_SRV_NET4" via "$NETNS_VETH_SRV_V4" 2>/dev/null || true
  ip -n "$cli" -6 route del "$NETNS_SRV_NET6" via "$NETNS_VETH_SRV_V6" 2>/dev/null || true
}

_nns_gateway_fail() {
  local id=$1 msg=$2 log pid
  log=$(netns_gateway_log "$id")
  pid=$(netns_gateway_pid "$id" || true)
  printf '%s\n' "$msg" >"$(_nns_dir "$id")/gateway.error" 2>/dev/null || true
  {
    printf '[netns] ERROR: %s\n' "$msg"
    printf '[netns] ---- gateway stderr (%s) ----\n' "$log"
    tail -n 50 "$log" 2>/dev/null || true
    printf '[netns] ---- end of gateway stderr ----\n'
  } >&2
  [[ -n "$pid" ]] && _nns_kill_wait 2 "$pid"
  rm -f "$(_nns_dir "$id")/gateway.pid"
  return 0
}

NETNS_REDIRECT_PORT=12345

# _nns_spawn_gateway ID BIN ARG... : start BIN in the cli ns in the background with its
# output in gateway.log; sets NNS_GATEWAY_PID and records the pid.
# The gateway's readiness: the one JSON line it prints on stdout when it serves traffic
# (log lines go to stderr and never start with '{').
_nns_ready() {
  grep -qE '^\{.*"event": ?"ready"' "$1" 2>/dev/null
}

_nns_spawn_gateway() {
  local id=$1 bin=$2 dir log
  shift 2
  dir=$(_nns_dir "$id")
  log="$dir/gateway.log"
  : >"$log"
  rm -f "$dir/gateway.error"
  printf '# %s %s\n' "$bin" "$*" >>"$log"
  # shellcheck disable=SC2086 # NETNS_GATEWAY_WRAP is a command prefix, split on purpose
  ip netns exec "$(netns_cli "$id")" ${NETNS_GATEWAY_WRAP:-} "$bin" "$@" </dev/null >>"$log" 2>&1 &
  NNS_GATEWAY_PID=$!
  printf '%s\n' "$NNS_GATEWAY_PID" >"$dir/gateway.pid"
  _nns_record_pid "$id" "$NNS_GATEWAY_PID"
}

# The no-TUN baseline: tungate-redirect listens on loopback; an nftables REDIRECT rule in
# the cli namespace (only there) captures TCP to the server networks, except the
# gateway's own marked dials; the traffic itself takes the kernel baseline route.
_nns_start_redirect() {
  local id=$1 bin=$2 cli dir log pid i
  shift 2
  cli=$(netns_cli "$id")
  dir=$(_nns_dir "$id")
  netns_route_baseline "$id" || return 1
  local args=(--listen "127.0.0.1:$NETNS_REDIRECT_PORT" --listen "[::1]:$NETNS_REDIRECT_PORT")
  args+=(--mark "$NETNS_MARK" --log-level "$NETNS_GATEWAY_LOG_LEVEL" "$@")
  log="$dir/gateway.log"
  _nns_spawn_gateway "$id" "$bin" "${args[@]}"
  pid=$NNS_GATEWAY_PID
  for ((i = 0; i < NETNS_GATEWAY_TIMEOUT * 20; i++)); do
    _nns_alive "$pid" || { _nns_gateway_fail "$id" "gateway $(basename "$bin") exited during startup"; return 1; }
    _nns_ready "$log" && break
    sleep 0.05
  done
  _nns_ready "$log" || { _nns_gateway_fail "$id" "gateway $(basename "$bin") printed no ready event within ${NETNS_GATEWAY_TIMEOUT}s"; return 1; }
  ip netns exec "$cli" nft -f - <<NFT || { _nns_gateway_fail "$id" "nftables REDIRECT rule failed"; return 1; }
table inet tungate {
  chain output {
    type nat hook output priority -100;
    meta mark $NETNS_MARK return
    ip daddr $NETNS_SRV_NET4 meta l4proto tcp redirect to :$NETNS_REDIRECT_PORT
    ip6 daddr $NETNS_SRV_NET6 meta l4proto tcp redirect to :$NETNS_REDIRECT_PORT
  }
}
NFT
  _nns_log "gateway $(basename "$bin") up in $cli (pid $pid, nftables REDIRECT to :$NETNS_REDIRECT_PORT)"
}

# netns_start_gateway ID BIN MTU [EXTRA_ARG...]
netns_start_gateway() {
  local id=${1:-} bin=${2:-} mtu=${3:-} cli dir log pid i link up ready
  shift 3 || { _nns_err "usage: netns_start_gateway ID BIN MTU [ARG...]"; return 1; }
  if [[ "$(basename "$bin")" == tungate-redirect ]]; then
    _nns_check_id "$id" || return 1
    _nns_exists "$(netns_cli "$id")" || { _nns_err "netns_start_gateway: $(netns_cli "$id") does not exist (netns_up first)"; return 1; }
    _nns_start_redirect "$id" "$bin" "$@"
    return
  fi
  local extra=("$@")
  _nns_check_id "$id" || return 1
  cli=$(netns_cli "$id")
  dir=$(_nns_dir "$id")
  _nns_exists "$cli" || { _nns_err "netns_start_gateway: $cli does not exist (netns_up first)"; return 1; }
  [[ -x "$bin" && -f "$bin" ]] || { _nns_err "netns_start_gateway: '$bin' is not an executable file"; return 1; }
  pid=$(netns_gateway_pid "$id" || true)
  if [[ -n "$pid" ]] && _nns_alive "$pid"; then
    _nns_err "netns_start_gateway: a gateway (pid $pid) is already running in $cli"
    return 1
  fi
  local args=(--tun "$NETNS_TUN" --mtu "$mtu" --address "$NETNS_TUN_ADDR4")
  [[ "$NETNS_IPV6" == 1 ]] && args+=(--address "$NETNS_TUN_ADDR6")
  args+=(--mark "$NETNS_MARK")
  # tungate's own binaries take these too; a program of the user's own (the examples)
  # is started with NETNS_GATEWAY_OWN=1 and gets only the flags above.
  if [[ "${NETNS_GATEWAY_OWN:-0}" != 1 ]]; then
    [[ " ${extra[*]} " == *" --proxy "* ]] || args+=(--proxy direct)
    args+=(--log-level "$NETNS_GATEWAY_LOG_LEVEL")
  fi
  args+=("${extra[@]}")

  log="$dir/gateway.log"
  _nns_spawn_gateway "$id" "$bin" "${args[@]}"
  pid=$NNS_GATEWAY_PID

  up=0 ready=0
  local up_re='<([^>]*,)?UP[,>]'
  for ((i = 0; i < NETNS_GATEWAY_TIMEOUT * 20; i++)); do
    if ! _nns_alive "$pid"; then
      local rc=0
      wait "$pid" 2>/dev/null || rc=$?
      _nns_gateway_fail "$id" "gateway $(basename "$bin") exited during startup (status $rc)"
      return 1
    fi
    link=$(ip -n "$cli" -o link show "$NETNS_TUN" 2>/dev/null || true)
    up=0
    [[ "$link" =~ $up_re ]] && up=1
    _nns_ready "$log" && ready=1
    ((up && ready)) && break
    sleep 0.05
  done
  if ((!up)); then
    _nns_gateway_fail "$id" "gateway $(basename "$bin") did not bring $NETNS_TUN up within ${NETNS_GATEWAY_TIMEOUT}s (link: ${link:-absent})"
    return 1
  fi
  if ((!ready)); then
    _nns_gateway_fail "$id" "gateway $(basename "$bin") brought $NETNS_TUN up but printed no ready event within ${NETNS_GATEWAY_TIMEOUT}s"
    return 1
  fi

  ip -n "$cli" link set "$NETNS_TUN" txqueuelen "$NETNS_TUN_TXQUEUELEN" ||
    _nns_log "warning: could not set $NETNS_TUN txqueuelen $NETNS_TUN_TXQUEUELEN"

  # The gateway routes for itself (--setup): nothing to add here.
  if [[ "${NETNS_GATEWAY_SETUP:-0}" == 1 ]]; then
    _nns_log "gateway $(basename "$bin") up in $cli (pid $pid, mtu $mtu, its own --setup)"
    return 0
  fi

  # Marked (gateway-own) dials bypass the TUN: rule + table first, then the TUN route.
  ip -n "$cli" rule del pref "$NETNS_RULE_PREF" 2>/dev/null || true
  _nns_do ip -n "$cli" rule add pref "$NETNS_RULE_PREF" fwmark "$NETNS_MARK" lookup "$NETNS_TABLE" ||
    { _nns_gateway_fail "$id" "policy rule setup failed"; return 1; }
  _nns_do ip -n "$cli" route replace "$NETNS_SRV_NET4" via "$NETNS_VETH_SRV_V4" dev "$NETNS_VETH_CLI" table "$NETNS_TABLE" ||
    { _nns_gateway_fail "$id" "table $NETNS_TABLE setup failed"; return 1; }
  _nns_do ip -n "$cli" route replace "$NETNS_SRV_NET4" dev "$NETNS_TUN" ||
    { _nns_gateway_fail "$id" "route $NETNS_SRV_NET4 dev $NETNS_TUN failed"; return 1; }
  if [[ "$NETNS_IPV6" == 1 ]]; then
    ip -n "$cli" -6 rule del pref "$NETNS_RULE_PREF" 2>/dev/null || true
    _nns_do ip -n "$cli" -6 rule add pref "$NETNS_RULE_PREF" fwmark "$NETNS_MARK" lookup "$NETNS_TABLE" ||
      { _nns_gateway_fail "$id" "IPv6 policy rule setup failed"; return 1; }
    _nns_do ip -n "$cli" -6 route replace "$NETNS_SRV_NET6" via "$NETNS_VETH_SRV_V6" dev "$NETNS_VETH_CLI" table "$NETNS_TABLE" ||
      { _nns_gateway_fail "$id" "IPv6 table $NETNS_TABLE setup failed"; return 1; }
    ip -n "$cli" -6 route replace "$NETNS_SRV_NET6" dev "$NETNS_TUN" ||
      _nns_log "warning: IPv6 route $NETNS_SRV_NET6 dev $NETNS_TUN failed (no IPv6 on $NETNS_TUN?); IPv4 only"
  fi
  _nns_log "gateway $(basename "$bin") up in $cli (pid $pid, mtu $mtu)"
  return 0
}

# netns_stop_gateway ID : remove TUN/policy routes, SIGTERM, 15 s, SIGKILL. Never fails.
netns_stop_gateway() {
  local id=${1:-} cli dir pid i
  cli=$(netns_cli "$id")
  dir=$(_nns_dir "$id")
  if _nns_exists "$cli"; then
    ip netns exec "$cli" nft delete table inet tungate 2>/dev/null || true
    ip -n "$cli" route del "$NETNS_SRV_NET4" dev "$NETNS_TUN" 2>/dev/null || true
    ip -n "$cli" route del "$NETNS_SRV_NET4" table "$NETNS_TABLE" 2>/dev/null || true
    ip -n "$cli" rule del pref "$NETNS_RULE_PREF" 2>/dev/null || true
    ip -n "$cli" -6 route del "$NETNS_SRV_NET6" dev "$NETNS_TUN" 2>/dev/null || true
    ip -n "$cli" -6 route del "$NETNS_SRV_NET6" table "$NETNS_TABLE" 2>/dev/null || true
    ip -n "$cli" -6 rule del pref "$NETNS_RULE_PREF" 2>/dev/null || true
  fi
  pid=$(netns_gateway_pid "$id" 2>/dev/null || true)
  if [[ -n "$pid" ]]; then
    # Past the gateway's default drain (5 s) and the resets after it.
    _nns_kill_wait 15 "$pid"
    rm -f "$dir/gateway.pid"
  fi
  # A non-persistent TUN disappears when its fd closes; give the kernel a moment.
  if _nns_exists "$cli"; then
    for ((i = 0; i < 20; i++)); do
      ip -n "$cli" link show "$NETNS_TUN" >/dev/null 2>&1 || break
      sleep 0.05
    done
  fi
  return 0
}

# netns_start_iperf_server ID [PORT]
netns_start_iperf_server() {
  local id=${1:-} port=${2:-5201} srv dir pid i ss_out
  _nns_check_id "$id" || return 1
  srv=$(netns_srv "$id")
  dir=$(_nns_dir "$id")
  _nns_exists "$srv" || { _nns_err "netns_start_iperf_server: $srv does not exist"; return 1; }
  ip netns exec "$srv" iperf3 -s -B "$NETNS_SRV_V4" -p "$port" </dev/null >"$dir/iperf3-server-$port.log" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$dir/iperf3-server-$port.pid"
  _nns_record_pid "$id" "$pid"
  for ((i = 0; i < 100; i++)); do
    _nns_alive "$pid" || break
    ss_out=$(ip netns exec "$srv" ss -Hltn "sport = :$port" 2>/dev/null || true)
    [[ -n "$ss_out" ]] && return 0
    sleep 0.05
  done
  _nns_err "iperf3 server in $srv did not start listening on $NETNS_SRV_V4:$port: $(tail -n 5 "$dir/iperf3-server-$port.log" 2>/dev/null)"
  _nns_kill_wait 1 "$pid"
  return 1
}

netns_stop_iperf_server() {
  local id=${1:-} port=${2:-5201} f pid
  f="$(_nns_dir "$id")/iperf3-server-$port.pid"
  [[ -s "$f" ]] || return 0
  pid=$(cat "$f")
  _nns_kill_wait 2 "$pid"
  rm -f "$f"
  return 0
}

# netns_down ID : kill every pid we started and anything left inside our namespaces,
# delete both namespaces. Idempotent; never fails (safe in an EXIT trap under set -e).
netns_down() {
  local id=${1:-} dir ns pids=() p
  _nns_check_id "$id" 2>/dev/null || return 0
  dir=$(_nns_dir "$id")
  netns_stop_gateway "$id" || true
  if [[ -s "$dir/pids" ]]; then
    while read -r p; do
      [[ "$p" =~ ^[0-9]+$ ]] && pids+=("$p")
    done <"$dir/pids" || true
  fi
  for ns in "$(netns_srv "$id")" "$(netns_cli "$id")"; do
    if _nns_exists "$ns"; then
      while read -r p; do
        [[ "$p" =~ ^[0-9]+$ ]] && pids+=("$p")
      done < <(ip netns pids "$ns" 2>/dev/null || true)
    fi
  done
  ((${#pids[@]})) && _nns_kill_wait 2 "${pids[@]}"
  for ns in "$(netns_srv "$id")" "$(netns_cli "$id")"; do
    if _nns_exists "$ns"; then
      ip netns del "$ns" 2>/dev/null || _nns_log "warning: could not delete namespace $ns"
    fi
  done
  # Files a test put in place of the server namespace's /etc entries (`ip netns exec`
  # bind-mounts /etc/netns/NS/*): hosts, resolv.conf, a passwd/shadow with a proxy test user.
  rm -rf "/etc/netns/$(netns_srv "$id")" "/etc/netns/$(netns_cli "$id")" 2>/dev/null || true
  [[ "$NETNS_KEEP_STATE" == 1 ]] || rm -rf "$dir" 2>/dev/null || true
  return 0
}
