#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what the tests need on a fresh machine,
# then runs every check and test. Tests start their own moto_server on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/moto-env.sh
# The Helm SDK, promtool and the real Prometheus server, and the chart's rendered alert rules:
# tests/prometheus.rs evaluates every dashboard query and alert on a live Prometheus.
source scripts/chart-env.sh
# The transform modules the tests load (installs the wasm32-wasip2 target and componentize-py).
scripts/build-transforms.sh

guests=(--manifest-path transforms/Cargo.toml --target-dir target/transforms --locked)
cargo fmt --all -- --check
cargo fmt --all --manifest-path transforms/Cargo.toml -- --check
cargo clippy --all-targets --locked -- -D warnings
# The README's first command builds without the default features (`transforms`, `parquet`,
# `query`): keep that build working. What it does instead (a configured module or Parquet output
# is refused, naming the key) is tested in the default build: `config::tests::a_build_without_…`,
# `transform::absent::tests` (a second test build would recompile ~70 dependencies).
cargo clippy --no-default-features --lib --bins --locked -- -D warnings
cargo clippy "${guests[@]}" --target wasm32-wasip2 -- -D warnings
cargo test "${guests[@]}"
cargo test --all-targets --locked
# A short smoke run of every fuzz target (long runs: scripts/fuzz.sh TARGET SECONDS).
./scripts/fuzz.sh all 10
./scripts/check-chart.sh
