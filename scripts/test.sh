#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what the tests need on a fresh machine,
# then runs every check and test. Tests start their own moto_server on a free loopback port.
set -euo pipefail
cd "$(dirname "$0")/.."

# moto is pinned in its own venv: 5.2.1 (preinstalled on some images) answers
# CompleteMultipartUpload with the wrong XML root, which the Rust SDK rightly rejects.
MOTO_VERSION=5.2.5
VENV=target/test-venv
if ! "$VENV/bin/python" -c "import moto, flask, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  echo "test.sh: installing moto[server]==$MOTO_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
export PATH="$PWD/$VENV/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
