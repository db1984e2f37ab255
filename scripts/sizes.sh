#!/usr/bin/env bash
# scripts/sizes.sh [VARIANT...] — size table of target/release/tungate-<variant>, plus a
# stripped copy in target/release/stripped/. Default variants: $VARIANTS, else every
# tungate-* binary present. Exits 1 if a named variant's binary is missing.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BIN_DIR:-$REPO/target/release}
STRIP_DIR="$BIN_DIR/stripped"
STRIP=${STRIP:-strip}

variants=("$@")
if ((${#variants[@]} == 0)); then
  read -r -a variants <<<"${VARIANTS:-}"
fi
if ((${#variants[@]} == 0)); then
  shopt -s nullglob
  for f in "$BIN_DIR"/tungate-*; do
    b=$(basename "$f")
    [[ "$b" =~ ^tungate-[a-z0-9-]+$ && -f "$f" && -x "$f" ]] && variants+=("${b#tungate-}")
  done
  shopt -u nullglob
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

mkdir -p "$STRIP_DIR"
rc=0
printf '| %-20s | %-26s | %-26s |\n' variant size stripped
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..22})" "$(printf -- '-%.0s' {1..28})" "$(printf -- '-%.0s' {1..28})"
for v in "${variants[@]}"; do
  v=${v#tungate-}
  src="$BIN_DIR/tungate-$v"
  if [[ ! -f "$src" ]]; then
    printf '| %-20s | %-26s | %-26s |\n' "$v" "missing" "-"
    rc=1
    continue
  fi
  dst="$STRIP_DIR/tungate-$v"
  cp -f "$src" "$dst"
  "$STRIP" "$dst"
  s=$(stat -c %s "$src")
  t=$(stat -c %s "$dst")
  printf '| %-20s | %-26s | %-26s |\n' "$v" "$s ($(mib "$s"))" "$t ($(mib "$t"))"
done
exit "$rc"
