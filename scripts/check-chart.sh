#!/usr/bin/env bash
# Chart, alert and dashboard checks (called by scripts/test.sh). Installs pinned tools under
# target/ once: the Helm SDK venv and promtool (scripts/chart-env.sh), and @grafana/schema +
# TypeScript from npm. Then runs scripts/check_chart.py.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/chart-env.sh

NODE_DIR=target/chart-node
PACKAGE='{"private": true, "dependencies": {"@grafana/schema": "13.2.3", "typescript": "7.0.2"}}'
if [ "$(cat "$NODE_DIR/package.json" 2>/dev/null)" != "$PACKAGE" ] || [ ! -x "$NODE_DIR/node_modules/.bin/tsc" ]; then
  echo "installing @grafana/schema and typescript into $NODE_DIR"
  rm -rf "$NODE_DIR" && mkdir -p "$NODE_DIR"
  echo "$PACKAGE" > "$NODE_DIR/package.json"
  (cd "$NODE_DIR" && npm install --quiet --no-audit --no-fund --ignore-scripts >/dev/null)
fi

# The binary `cargo test` just built. `cargo test --no-run` is a no-op when it is fresh; a plain
# `cargo build --bin` would resolve features without the dev-dependencies and rebuild every
# shared dependency a second time.
cargo test --no-run --all-targets --quiet --locked
"$CHART_VENV/bin/python" scripts/check_chart.py target/debug/trailhose "$PROMTOOL" "$NODE_DIR"
