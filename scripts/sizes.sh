#!/usr/bin/env bash
# scripts/sizes.sh [VARIANT...] — size table of every variant in the release profile
# (target/release/tungate-<variant>) and in the `size` profile (target/size/...), each as
# built and stripped (stripped copies go to <profile dir>/stripped/). Prints a Markdown
# table and writes results/sizes.csv (SIZES_CSV). Default variants: $VARIANTS, else all six.
# Exits 1 if a variant's release binary is missing.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${TARGET_DIR:-$REPO/target}
CSV=${SIZES_CSV:-$REPO/results/sizes.csv}
STRIP=${STRIP:-strip}
PROFILES=(release size)

variants=("$@")
if ((${#variants[@]} == 0)); then
  read -r -a variants <<<"${VARIANTS:-}"
fi
if ((${#variants[@]} == 0)); then
  variants=(smoltcp lwip ipstack netstack-smoltcp system redirect)
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- . ':!results' 2>/dev/null || rev="$rev+dirty"
rustc=$(rustc --version | awk '{ print $2 }')
date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
rows=("variant,profile,bytes,stripped_bytes,rustc,git_revision,measured_at")
rc=0
printf '| %-18s | %-12s | %-12s | %-12s | %-12s |\n' variant release "release strip" size "size strip"
printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..20})" "$(printf -- '-%.0s' {1..14})" \
  "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..14})"
for v in "${variants[@]}"; do
  v=${v#tungate-}
  cells=()
  for profile in "${PROFILES[@]}"; do
    src="$TARGET_DIR/$profile/tungate-$v"
    if [[ ! -f "$src" ]]; then
      cells+=("missing" "-")
      [[ "$profile" == release ]] && rc=1
      continue
    fi
    mkdir -p "$TARGET_DIR/$profile/stripped"
    dst="$TARGET_DIR/$profile/stripped/tungate-$v"
    cp -f "$src" "$dst"
    "$STRIP" "$dst"
    s=$(stat -c %s "$src")
    t=$(stat -c %s "$dst")
    cells+=("$(mib "$s")" "$(mib "$t")")
    rows+=("$v,$profile,$s,$t,$rustc,$rev,$date")
  done
  printf '| %-18s | %-12s | %-12s | %-12s | %-12s |\n' "$v" "${cells[@]}"
done
mkdir -p "$(dirname "$CSV")"
printf '%s\n' "${rows[@]}" >"$CSV"
echo "sizes written to ${CSV#"$REPO"/}"
exit "$rc"
