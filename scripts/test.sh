#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what the tests need on a fresh machine,
# then runs every check and test. Tests start their own moto_server on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/moto-env.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
./scripts/check-chart.sh
