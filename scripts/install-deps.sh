#!/usr/bin/env bash
# scripts/install-deps.sh — idempotently install what building, testing and benchmarking
# tungate needs (Debian). Installs only what is missing, with one `apt-get update`.
# rustfmt/clippy are added through rustup when rustup exists and they are missing; a
# failure there (e.g. offline) is only a warning.
set -euo pipefail

log() { printf '[install-deps] %s\n' "$*"; }
warn() { printf '[install-deps] warning: %s\n' "$*" >&2; }

missing=()
add_missing() {
  local p
  for p in "${missing[@]}"; do [[ "$p" == "$1" ]] && return 0; done
  missing+=("$1")
}
need_cmd() { # need_cmd COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 || add_missing "$2"
}
need_pkg() { # need_pkg PACKAGE (checked with dpkg)
  local st
  st=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
  [[ "$st" == "install ok installed" ]] || add_missing "$1"
}

need_cmd iperf3 iperf3
need_cmd ip iproute2
need_cmd ss iproute2
need_cmd nft nftables
need_cmd curl curl
need_cmd python3 python3
need_cmd pkg-config pkg-config
need_cmd clang clang
need_cmd strip binutils
need_cmd openssl openssl
need_cmd tcpdump tcpdump
need_cmd ping iputils-ping
# Proxies and a resolver the namespace tests run in the server namespace.
need_cmd danted dante-server
need_cmd microsocks microsocks
need_cmd tinyproxy tinyproxy
need_cmd dig dnsutils
need_cmd dnsmasq dnsmasq-base
need_cmd proxychains4 proxychains4
need_pkg libclang-dev
need_pkg build-essential
# A private system bus and systemd's D-Bus tool, for the test of --setup beside
# systemd-resolved (see below).
need_cmd dbus-daemon dbus-daemon
need_cmd busctl systemd

if ((${#missing[@]} == 0)); then
  log "system packages: all present"
else
  log "system packages missing: ${missing[*]}"
  if [[ $EUID -ne 0 ]]; then
    printf '[install-deps] ERROR: need root to apt-get install: %s\n' "${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  log "running apt-get update"
  apt-get update -q
  log "running apt-get install -y --no-install-recommends ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  log "installed: ${missing[*]}"
fi

# systemd-resolved, for the namespace test of --setup with a stub resolver: unpacked
# into a directory of its own, never installed (installing it would point this machine's
# own /etc/resolv.conf at it). The version that matches the installed systemd first (it
# links systemd's private library), else the archive's.
RESOLVED_DIR=${TUNGATE_RESOLVED_DIR:-/var/cache/tungate/systemd-resolved}
if [[ -x "$RESOLVED_DIR/lib/systemd/systemd-resolved" ]]; then
  log "systemd-resolved (unpacked): present in $RESOLVED_DIR"
elif [[ $EUID -ne 0 ]]; then
  warn "not root: cannot unpack systemd-resolved into $RESOLVED_DIR (its namespace test will fail)"
else
  tmp=$(mktemp -d)
  version=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
  if ! (cd "$tmp" && { apt-get download -q "systemd-resolved=$version" || apt-get download -q systemd-resolved; }) >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    (cd "$tmp" && { apt-get download -q "systemd-resolved=$version" || apt-get download -q systemd-resolved; }) >/dev/null 2>&1 ||
      warn "could not download systemd-resolved (its namespace test will fail)"
  fi
  if compgen -G "$tmp/systemd-resolved_*.deb" >/dev/null; then
    mkdir -p "$RESOLVED_DIR"
    dpkg -x "$tmp"/systemd-resolved_*.deb "$RESOLVED_DIR"
    log "systemd-resolved unpacked into $RESOLVED_DIR ($(basename "$tmp"/systemd-resolved_*.deb))"
  fi
  rm -rf "$tmp"
fi

# Rust components for `make lint`.
if command -v rustup >/dev/null 2>&1; then
  installed=$(rustup component list --installed 2>/dev/null || true)
  for comp in rustfmt clippy; do
    if grep -q "^$comp" <<<"$installed"; then
      log "rustup component $comp: present"
    else
      log "rustup component add $comp"
      rustup component add "$comp" || warn "could not add rustup component $comp (offline?); continuing"
    fi
  done
else
  cargo fmt --version >/dev/null 2>&1 || warn "no rustup and 'cargo fmt' is unavailable: make lint will fail"
  cargo clippy --version >/dev/null 2>&1 || warn "no rustup and 'cargo clippy' is unavailable: make lint will fail"
fi
command -v cargo >/dev/null 2>&1 || warn "cargo is not on PATH"
log "done"
