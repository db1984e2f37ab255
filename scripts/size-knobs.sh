#!/usr/bin/env bash
# scripts/size-knobs.sh [VARIANT] — what each knob of Cargo.toml's `size` profile saves:
# builds VARIANT (default smoltcp) once per step, each step adding one knob to the ones
# before (opt-level "z", then fat LTO, then one codegen unit, then panic = "abort"), in
# its own target directory (target/knobs), strips each binary and writes a Markdown table
# to results/sizes-knobs-<date>.md. Takes a few minutes per step.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
V=${1:-smoltcp}
CARGO=${CARGO:-cargo}
export CARGO_TARGET_DIR=$REPO/target/knobs
OUT=$REPO/results/sizes-knobs-$(date -u +%Y%m%d).md
STRIP=${STRIP:-strip}

# step label | opt-level | lto | codegen-units | panic
# The first step is the release build `make all` made (target/release), not built again.
STEPS=(
  'release profile (opt-level 3, no LTO, 4 codegen units, unwind)|-|-|-|-'
  '+ opt-level "z"|z|false|4|unwind'
  '+ lto = true (fat)|z|true|4|unwind'
  '+ codegen-units = 1|z|true|1|unwind'
  '+ panic = "abort" (the size profile)|z|true|1|abort'
)

mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
rows=()
prev=
i=0
for step in "${STEPS[@]}"; do
  i=$((i + 1))
  IFS='|' read -r label opt lto cgu panic <<<"$step"
  printf '[size-knobs] step %d of %d: %s\n' "$i" "${#STEPS[@]}" "$label" >&2
  start=$(date +%s)
  if [[ "$opt" == - ]]; then
    bin=$REPO/target/release/tungate-$V
    [[ -f "$bin" ]] || { echo "[size-knobs] $bin missing: run make all first" >&2; exit 1; }
    cp -f "$bin" "$CARGO_TARGET_DIR.release-$V" 2>/dev/null || { mkdir -p "$CARGO_TARGET_DIR"; cp -f "$bin" "$CARGO_TARGET_DIR.release-$V"; }
    "$STRIP" "$CARGO_TARGET_DIR.release-$V"
    s=$(stat -c %s "$CARGO_TARGET_DIR.release-$V")
    rows+=("| $label | $s ($(mib "$s") MiB) | - | (make all) |")
    prev=$s
    continue
  fi
  CARGO_PROFILE_SIZE_OPT_LEVEL=$opt CARGO_PROFILE_SIZE_LTO=$lto CARGO_PROFILE_SIZE_CODEGEN_UNITS=$cgu \
    CARGO_PROFILE_SIZE_PANIC=$panic \
    "$CARGO" build -q --profile size --locked -p tungate --no-default-features --features "$V" --bin "tungate-$V"
  secs=$(($(date +%s) - start))
  bin=$CARGO_TARGET_DIR/size/tungate-$V
  cp -f "$bin" "$bin.stripped"
  "$STRIP" "$bin.stripped"
  s=$(stat -c %s "$bin.stripped")
  delta=-
  [[ -n "$prev" ]] && delta=$(awk -v a="$s" -v b="$prev" 'BEGIN { printf "%+.1f %%", (a - b) * 100 / b }')
  rows+=("| $label | $s ($(mib "$s") MiB) | $delta | ${secs} s |")
  prev=$s
done

{
  echo "# Size knobs, tungate-$V, stripped"
  echo
  echo "Each step adds one knob to the step before; the last step is Cargo.toml's \`size\` profile."
  echo "Build: the wall time of that step's cargo build in target/knobs, which reuses what an earlier"
  echo "run built with the same knobs (from scratch, a step takes 60-90 s on this machine)."
  echo
  echo "- machine: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores"
  echo "- kernel: $(uname -r)"
  echo "- rustc: $(rustc --version)"
  echo "- git revision: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!results' || echo ' (with uncommitted changes)')"
  echo "- command: scripts/size-knobs.sh $V"
  echo
  echo "| step | stripped | change | build |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$OUT"
cat "$OUT"
