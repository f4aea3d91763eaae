#!/usr/bin/env bash
# The benchmark's service path: generated delivery files in S3, one notification each on SQS,
# `trailhose run` in-process until the queue is drained, once at the shipped batch defaults
# (max_age_secs = 300, so the run lasts at least five minutes) and once at max_age_secs = 1.
# Reports files/s, events/s, the peak of unacknowledged messages and the acknowledgement latency
# (p50/p99) of each. Both S3 and SQS are a local moto_server (the only S3 + SQS server
# available from the registries here).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/moto-env.sh
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null' EXIT
for _ in $(seq 50); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.2; done
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
cargo run --release --quiet -- bench --mb "${MB:-64}" --file-mb 2 --service-endpoint "http://127.0.0.1:$port" "$@"
