#!/usr/bin/env bash
# scripts/fuzz.sh [TARGET...] — runs each cargo-fuzz target (default: all of
# fuzz/fuzz_targets) for FUZZ_SECONDS (600) or FUZZ_RUNS (10 000 000) executions,
# whichever comes first, one after another on the nightly toolchain with AddressSanitizer;
# then minimises its corpus (`cargo fuzz cmin`) so what is committed stays small. Writes
# results/fuzz-<date>.md (machine, revision, command, executions, coverage, crashes).
# A crash leaves its input in fuzz/artifacts/<target>/ and makes the script exit 1 after
# the remaining targets ran; copy it to fuzz/regressions/<target>/ with the fix, so
# `make test` replays it on stable from then on.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-600}
RUNS=${FUZZ_RUNS:-10000000}

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
logs="$REPO/target/fuzz-logs/$stamp"
mkdir -p "$logs" results
report="results/fuzz-$(date -u +%Y%m%d).md"
failed=()
rows=()
total=${#targets[@]}
i=0
for t in "${targets[@]}"; do
  i=$((i + 1))
  echo "== fuzz $t ($i of $total): up to ${SECONDS_PER_TARGET}s or $RUNS runs, started $(date -u +%H:%M:%S)" >&2
  status=ok
  if ! cargo +nightly fuzz run "$t" --features libfuzzer -- \
      -max_total_time="$SECONDS_PER_TARGET" -runs="$RUNS" -timeout=30 -rss_limit_mb=4096 \
      -print_final_stats=1 >"$logs/$t.log" 2>&1; then
    status="CRASH (see fuzz/artifacts/$t/, log $logs/$t.log)"
    failed+=("$t")
  fi
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$logs/$t.log" | awk '{print $2}' | tail -1 || true)
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$logs/$t.log" | awk '{print $5}' | tail -1 || true)
  rate=$(grep -o 'stat::average_exec_per_sec: [0-9]*' "$logs/$t.log" | awk '{print $2}' | tail -1 || true)
  if [[ -z "$rate" && -n "$runs" && -n "$secs" && "$secs" -gt 0 ]]; then rate=$((runs / secs)); fi
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$logs/$t.log" | tail -1 || true)
  before=$(find "fuzz/corpus/$t" -type f | wc -l)
  cargo +nightly fuzz cmin "$t" --features libfuzzer >"$logs/$t.cmin.log" 2>&1 || echo "fuzz: cmin of $t failed (log $logs/$t.cmin.log)" >&2
  after=$(find "fuzz/corpus/$t" -type f | wc -l)
  echo "   $t: ${runs:-?} runs in ${secs:-?} s (${rate:-?}/s), ${cov:-no coverage line}, corpus $before -> $after, $status" >&2
  rows+=("| $t | ${runs:-?} | ${secs:-?} | ${rate:-?} | ${cov:-?} | $after | $status |")
done

# `cargo fuzz cmin` keeps what covers most, which may drop a hand-made seed; they are
# written again (the seeds are the readable starting points, kept in every corpus).
cargo run -q --release --locked -p tungate-fuzz --bin tungate-fuzz-seeds >"$logs/seeds.log" 2>&1 || echo "fuzz: writing the seeds failed (log $logs/seeds.log)" >&2

{
  echo "# Fuzzing run $stamp"
  echo
  echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; kernel $(uname -r)"
  echo "- toolchain: $(rustc +nightly --version), $(cargo +nightly fuzz --version)"
  echo "- revision: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
  echo "- command: FUZZ_SECONDS=$SECONDS_PER_TARGET FUZZ_RUNS=$RUNS scripts/fuzz.sh ${*:-}"
  echo "- each target: AddressSanitizer, libFuzzer, until the time or the run count is reached; corpus minimised after"
  echo
  echo "| target | executions | seconds | per second | coverage at end | corpus kept | result |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$report"
echo "fuzz: report in $report" >&2
if ((${#failed[@]} > 0)); then
  echo "fuzz: crashes in: ${failed[*]}" >&2
  exit 1
fi
