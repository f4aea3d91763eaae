#!/usr/bin/env bash
# The benchmark's service path: generated delivery files in S3, one notification each on SQS,
# `trailhose run` in-process, once at the shipped batch age (max_age_secs = 300, ended by the
# service's shutdown drain once every file is split, so the run does not idle for five minutes)
# and once at max_age_secs = 1 (ended when the queue is empty). Reports files/s, events/s, the
# peak of unacknowledged messages, the acknowledgement latency (p50/p99), and where the wall time
# goes: trailhose's CPU seconds beside each stand-in server's, and trailhose's CPU per MB over
# the local pipeline's on the same files (`cpu÷local`).
#
# SQS is always a local moto_server (pinned by scripts/moto-env.sh). S3 is
#   S3=s3s-fs (the default): a local s3s-fs on a temporary root directory, far faster than moto;
#   S3=moto: the same moto_server serves S3 too (the slower, older setup).
# s3s-fs is taken from PATH, else from /work/s3s-root/bin, else installed once with
# `cargo install --locked s3s-fs@0.14.1 --features binary` into target/s3s-fs (override with
# S3S_ROOT=DIR; 0.17 needs a newer rustc than the project's).
# MB=… sets the size (default 64, in 2 MB files); CARGO_FLAGS=… is passed to `cargo run`
# (e.g. --no-default-features); ONLY=… picks the local rows as `bench --only` does (default: just
# the codec floors and `pipeline, geo, gzip`, which the service rows are compared with).
# Both servers listen on free loopback ports and are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
S3=${S3:-s3s-fs}
case "$S3" in
  s3s-fs|moto) ;;
  *) echo "S3 must be s3s-fs or moto, not $S3" >&2; exit 2 ;;
esac
source scripts/moto-env.sh

if [ "$S3" = s3s-fs ]; then
  S3S_ROOT=${S3S_ROOT:-$PWD/target/s3s-fs}
  if command -v s3s-fs >/dev/null; then
    s3s_bin=$(command -v s3s-fs)
  elif [ -x /work/s3s-root/bin/s3s-fs ]; then
    s3s_bin=/work/s3s-root/bin/s3s-fs
  elif [ -x "$S3S_ROOT/bin/s3s-fs" ]; then
    s3s_bin=$S3S_ROOT/bin/s3s-fs
  else
    echo "installing s3s-fs 0.14.1 into $S3S_ROOT"
    cargo install --locked s3s-fs@0.14.1 --features binary --root "$S3S_ROOT"
    s3s_bin=$S3S_ROOT/bin/s3s-fs
  fi
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.2; done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

scratch=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$scratch"
}
trap cleanup EXIT

moto_port=$(free_port)
moto_server -H 127.0.0.1 -p "$moto_port" >"$scratch/moto.log" 2>&1 &
moto=$!
pids+=("$moto")
wait_port "$moto_port"
args=(--service-endpoint "http://127.0.0.1:$moto_port" --server-pid "moto=$moto")

if [ "$S3" = s3s-fs ]; then
  # Buckets are directories under the root; the benchmark creates its own with CreateBucket.
  mkdir -p "$scratch/s3"
  s3s_port=$(free_port)
  "$s3s_bin" --host 127.0.0.1 --port "$s3s_port" --access-key testing --secret-key testing \
    "$scratch/s3" >"$scratch/s3s-fs.log" 2>&1 &
  s3s=$!
  pids+=("$s3s")
  wait_port "$s3s_port"
  args+=(--s3-endpoint "http://127.0.0.1:$s3s_port" --server-pid "s3s-fs=$s3s")
fi

export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
# shellcheck disable=SC2086 # CARGO_FLAGS is a list of flags
cargo run --release --locked --quiet ${CARGO_FLAGS:-} -- bench --mb "${MB:-64}" --file-mb 2 \
  --only "${ONLY:-service}" --dir "$scratch/bench" "${args[@]}" "$@"
