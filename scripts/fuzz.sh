#!/usr/bin/env bash
# Runs one fuzz target for a time budget: scripts/fuzz.sh TARGET SECONDS [SEED]
# TARGET is split, notification, cwlogs, template, or all (each for SECONDS, one after another).
# A stable-toolchain mutation fuzzer (examples/fuzz.rs) seeded from fuzz/corpus/ and the example
# delivery files; a failing input is saved under fuzz/crashes/TARGET/ and the script exits 1.
# Build once with FUZZ_PROFILE=release for long runs (faster executions, slower build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TARGET|all SECONDS [SEED]" >&2
  exit 2
fi
target=$1 secs=$2 seed=${3:-}
profile=()
[[ "${FUZZ_PROFILE:-dev}" == release ]] && profile=(--release)
cargo build --locked --example fuzz "${profile[@]}"
dir=target/debug/examples
[[ ${#profile[@]} -gt 0 ]] && dir=target/release/examples
if [[ $target == all ]]; then
  targets=(split notification cwlogs template)
else
  targets=("$target")
fi
for t in "${targets[@]}"; do
  "$dir/fuzz" "$t" "$secs" $seed
done
