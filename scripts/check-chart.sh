#!/usr/bin/env bash
# Chart, alert and dashboard checks (called by scripts/test.sh). Installs pinned tools under
# target/ once: a Python venv with the Helm v4 Go SDK and the Kubernetes schemas, promtool from
# Debian's prometheus package (extracted, never started as a service), and @grafana/schema +
# TypeScript from npm. Then runs scripts/check_chart.py.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/chart-venv
REQS=scripts/chart-requirements.txt
if ! cmp -s "$REQS" "$VENV/.requirements" 2>/dev/null; then
  echo "installing chart check tools into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/.requirements"
fi

# promtool: whatever revision of Debian's `prometheus` the archive offers now. An exact revision
# pin breaks every fresh machine once the archive moves on (2.42.0+ds-5+b6 became +deb12u1), so
# take the candidate, refresh the package lists once when it cannot be downloaded, and print it.
PROM_DIR=target/promtool
PROMTOOL=$PROM_DIR/usr/bin/promtool
candidate() { apt-cache policy prometheus | awk '/Candidate:/ {print $2}'; }
fetch_prometheus() {
  local version
  version=$(candidate)
  [ -n "$version" ] && [ "$version" != "(none)" ] && apt-get download -q "prometheus=$version" >/dev/null 2>&1 \
    && echo "$version"
}
if ! "$PROMTOOL" --version >/dev/null 2>&1; then
  rm -rf "$PROM_DIR" "$PROM_DIR.tmp" && mkdir -p "$PROM_DIR.tmp"
  if ! version=$(cd "$PROM_DIR.tmp" && fetch_prometheus); then
    echo "prometheus $(candidate) is not downloadable: refreshing the package lists"
    apt-get update -q >/dev/null
    version=$(cd "$PROM_DIR.tmp" && fetch_prometheus) \
      || { echo "error: cannot download Debian's prometheus package (candidate: $(candidate))" >&2; exit 1; }
  fi
  echo "installing promtool from Debian's prometheus $version into $PROM_DIR"
  dpkg-deb -x "$PROM_DIR.tmp"/prometheus_*.deb "$PROM_DIR.tmp/root"
  echo "$version" > "$PROM_DIR.tmp/root/.version"
  mv "$PROM_DIR.tmp/root" "$PROM_DIR" && rm -rf "$PROM_DIR.tmp"
fi
echo "promtool: Debian prometheus $(cat "$PROM_DIR/.version" 2>/dev/null || echo unknown)"

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
"$VENV/bin/python" scripts/check_chart.py target/debug/trailhose "$PROMTOOL" "$NODE_DIR"
