#!/usr/bin/env bash
# Runs one fuzz target for a time budget: scripts/fuzz.sh TARGET SECONDS [SEED]
# TARGET is split, notification, cwlogs, template, or all (each for SECONDS, one after another).
# A stable-toolchain mutation fuzzer (examples/fuzz.rs) seeded from fuzz/corpus/ and the example
# delivery files; a failing input is saved under fuzz/crashes/TARGET/ and the script exits 1.
# For long runs build faster code: FUZZ_PROFILE=opt compiles trailhose itself at opt-level 3 in the
# dev profile (dependencies keep the dev profile's opt-level 1, so nothing else is rebuilt);
# FUZZ_PROFILE=release builds the release profile (fastest, but a full build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TARGET|all SECONDS [SEED]" >&2
  exit 2
fi
target=$1 secs=$2 seed=${3:-}
profile=()
case "${FUZZ_PROFILE:-dev}" in
  release) profile=(--release) ;;
  opt) export CARGO_PROFILE_DEV_OPT_LEVEL=3 ;;
  dev) ;;
  *) echo "FUZZ_PROFILE must be dev, opt or release" >&2; exit 2 ;;
esac
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
