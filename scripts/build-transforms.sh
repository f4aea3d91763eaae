#!/usr/bin/env bash
# Builds the transform modules in transforms/ into target/transforms/ (called by scripts/test.sh;
# the tests and the benchmark load them from there):
#   Rust modules   → target/transforms/wasm32-wasip2/release/<name>.wasm (wit-bindgen, wasm32-wasip2)
#   Python module  → target/transforms/python/tag_account.wasm (componentize-py, pinned, own venv;
#                    built against trailhose:transform@0.1.0 on purpose: the tests load a 0.1.0
#                    module beside the 0.2.0 Rust ones in one binary)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "installing the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi
cargo build --release --locked --quiet --manifest-path transforms/Cargo.toml \
  --target wasm32-wasip2 --target-dir target/transforms

COMPONENTIZE_PY_VERSION=0.25.1
VENV=target/guest-venv
if ! "$VENV/bin/componentize-py" --version 2>/dev/null | grep -q "$COMPONENTIZE_PY_VERSION"; then
  echo "installing componentize-py==$COMPONENTIZE_PY_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi
out=target/transforms/python/tag_account.wasm
src=transforms/python/tag-account/app.py
if [ ! -f "$out" ] || [ "$src" -nt "$out" ] || [ wit/v0.1.0/transform.wit -nt "$out" ]; then
  mkdir -p "$(dirname "$out")"
  (cd "$(dirname "$src")" && "$ROOT/$VENV/bin/componentize-py" --wit-path "$ROOT/wit/v0.1.0" \
    --world transform componentize app -o "$ROOT/$out.tmp" >/dev/null)
  mv "$out.tmp" "$out"
fi
