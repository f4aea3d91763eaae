#!/usr/bin/env bash
# Builds the trailhose container image without a registry or a daemon, the same image the
# Dockerfile describes: FROM scratch, the glibc binary with the few libraries it links, CA
# certificates, user 65532 (non-root), entrypoint `trailhose run --config /etc/trailhose/trailhose.toml`.
#
#   scripts/build-image.sh            build target/image/oci (OCI layout) and
#                                     target/image/trailhose.oci.tar (oci-archive:
#                                     `podman load -i …`, `skopeo copy oci-archive:… docker://…`)
#   scripts/build-image.sh --run      then start it with a read-only root and /tmp on tmpfs:
#                                     one `process` of examples/data, then `run` against moto
#                                     with /healthz and /readyz checked from outside
#
#   PROFILE=dist (default, as the Dockerfile: fat LTO) | release (faster to build)
#   BIN=path     use this binary instead of building one
#   RUNTIME=runc (default) | crun (crun 1.8 refuses this sandbox's hybrid cgroup mount:
#                                  "cgroups in hybrid mode not supported"; runc runs it)
#
# Not part of .ci/run (the dist build alone takes longer than the rest of CI): run it before a
# release and whenever the Dockerfile, the chart's securityContext or the binary's runtime needs
# (files, libraries, ports) change.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-dist}
RUNTIME=${RUNTIME:-runc}
if [ "$RUNTIME" = crun ]; then RUNTIME_FLAGS=${RUNTIME_FLAGS---cgroup-manager=disabled}; else RUNTIME_FLAGS=${RUNTIME_FLAGS-}; fi
OUT=$PWD/target/image
TAG=trailhose
RUN=false
[ "${1:-}" = "--run" ] && RUN=true

need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing Debian's $2 (for $1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null; } \
    || { echo "error: cannot install $2 (run as root, or install it)" >&2; exit 1; }
}
need umoci umoci

if [ -z "${BIN:-}" ]; then
  cargo build --profile "$PROFILE" --locked --bin trailhose
  BIN=target/$PROFILE/trailhose
fi
[ -x "$BIN" ] || { echo "error: $BIN is not an executable" >&2; exit 1; }

# The root filesystem: the binary, the libraries ldd resolves (at their own paths, symlinks
# followed), CA certificates and a passwd entry for 65532 so tools that look the user up work.
rm -rf "$OUT" && mkdir -p "$OUT/rootfs"
ROOT=$OUT/rootfs
# Debug info off (the symbols stay, so backtraces still name functions): most of the binary.
need objcopy binutils
install -d "$ROOT/usr/local/bin"
objcopy --strip-debug "$BIN" "$ROOT/usr/local/bin/trailhose"
chmod 0755 "$ROOT/usr/local/bin/trailhose"
ldd "$BIN" | awk '/=>/ {print $3} /^\t\/.*ld-linux/ {print $1}' | while read -r lib; do
  [ -n "$lib" ] && [ -e "$lib" ] || continue
  install -D -m 0755 "$(readlink -f "$lib")" "$ROOT$lib"
done
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$ROOT/tmp" "$ROOT/etc/trailhose" "$ROOT/home/nonroot"
chmod 1777 "$ROOT/tmp"
chown 65532:65532 "$ROOT/home/nonroot"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ROOT/etc/group"

# One layer on an empty image.
umoci init --layout "$OUT/oci"
umoci new --image "$OUT/oci:$TAG"
umoci unpack --image "$OUT/oci:$TAG" "$OUT/bundle" >/dev/null
cp -a "$ROOT/." "$OUT/bundle/rootfs/"
umoci repack --image "$OUT/oci:$TAG" "$OUT/bundle"
rm -rf "$OUT/bundle"
version=$("$BIN" --version | awk '{print $2}')
umoci config --image "$OUT/oci:$TAG" \
  --config.user 65532:65532 \
  --config.workingdir /home/nonroot \
  --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --config.exposedports 9090/tcp \
  --config.entrypoint /usr/local/bin/trailhose \
  --config.cmd run --config.cmd --config --config.cmd /etc/trailhose/trailhose.toml \
  --config.label "org.opencontainers.image.title=trailhose" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --history.created_by "scripts/build-image.sh (PROFILE=$PROFILE)"
umoci gc --layout "$OUT/oci"
tar -C "$OUT/oci" -cf "$OUT/trailhose.oci.tar" .
layer_bytes=$(find "$OUT/oci/blobs" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
rootfs_bytes=$(du -sb "$ROOT" | cut -f1)
echo "image: $OUT/oci:$TAG (oci-archive $OUT/trailhose.oci.tar)"
echo "size: $((rootfs_bytes / 1024 / 1024)) MiB unpacked, $((layer_bytes / 1024 / 1024)) MiB compressed (all blobs)"

$RUN || exit 0

# ---- Run it: a read-only root, /tmp as tmpfs, user 65532, no capabilities. ----------------------
command -v "$RUNTIME" >/dev/null || need "$RUNTIME" "$RUNTIME"
source scripts/moto-env.sh
work=$(mktemp -d)
cleanup() {
  "$RUNTIME" $RUNTIME_FLAGS kill trailhose-img KILL >/dev/null 2>&1 || true
  "$RUNTIME" $RUNTIME_FLAGS delete -f trailhose-img >/dev/null 2>&1 || true
  [ -n "${moto_pid:-}" ] && kill "$moto_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Each run gets a fresh bundle from the image; its config.json is the image's, adjusted only for
# what a Kubernetes pod would add (read-only root, tmpfs /tmp, volumes, the host's network here
# so that the probes can be reached from outside).
bundle() { # bundle DIR ARGS_JSON MOUNTS_JSON
  umoci unpack --image "$OUT/oci:$TAG" "$1" >/dev/null
  python3 - "$1/config.json" "$2" "$3" <<'EOF'
import json, sys
path, args, mounts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
c = json.load(open(path))
c["root"]["readonly"] = True
c["process"]["args"] = args
c["process"]["terminal"] = False
c["process"]["env"] += ["AWS_ACCESS_KEY_ID=testing", "AWS_SECRET_ACCESS_KEY=testing", "AWS_REGION=us-east-1"]
c["process"]["noNewPrivileges"] = True
c["process"]["capabilities"] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
c["mounts"] = [m for m in c["mounts"] if m["destination"] != "/tmp"] + [
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=64m"]}
] + [{"destination": d, "type": "bind", "source": s, "options": ["rbind", o]} for d, s, o in mounts]
json.dump(c, open(path, "w"))
EOF
}

echo "--- process examples/data inside the image"
mkdir -p "$work/out" "$work/etc"
chown 65532:65532 "$work/out"
cat >"$work/etc/process.toml" <<'EOF'
[output]
url = "/out"
[geoip]
city_db = "/data/examples/geoip/demo-city.mmdb"
asn_db = "/data/examples/geoip/demo-asn.mmdb"
EOF
bundle "$work/b1" '["/usr/local/bin/trailhose","process","/data/examples/data","--config","/etc/trailhose/trailhose.toml"]' \
  "[[\"/data/examples\",\"$PWD/examples\",\"ro\"],[\"/etc/trailhose/trailhose.toml\",\"$work/etc/process.toml\",\"ro\"],[\"/out\",\"$work/out\",\"rw\"]]"
"$RUNTIME" $RUNTIME_FLAGS run --bundle "$work/b1" trailhose-img
"$RUNTIME" $RUNTIME_FLAGS delete -f trailhose-img >/dev/null 2>&1 || true
objects=$(find "$work/out" -type f | wc -l)
[ "$objects" -gt 0 ] || { echo "error: process inside the image wrote nothing" >&2; exit 1; }
echo "process inside the image wrote $objects objects"

echo "--- run against moto inside the image"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
moto_port=$(free_port)
metrics_port=$(free_port)
moto_server -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$moto_port/moto-api/" >/dev/null && break; sleep 0.1; done
# The clients the checks below use, written once: moto's endpoint and its test credentials.
cat >"$work/moto_clients.py" <<EOF
import boto3
def client(name):
    return boto3.client(name, endpoint_url="http://127.0.0.1:$moto_port", region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")
EOF
export PYTHONPATH=$work
queue_url=$(python - <<'EOF'
from moto_clients import client
s3 = client("s3")
s3.create_bucket(Bucket="trail-logs")
s3.create_bucket(Bucket="out-bucket")
print(client("sqs").create_queue(QueueName="trail")["QueueUrl"])
EOF
)
cat >"$work/etc/run.toml" <<EOF
[source.sqs]
queue_url = "$queue_url"
endpoint_url = "http://127.0.0.1:$moto_port"
region = "us-east-1"
[[source.buckets]]
name = "trail-logs"
endpoint_url = "http://127.0.0.1:$moto_port"
force_path_style = true
[output]
url = "s3://out-bucket/cloudtrail/"
[output.s3]
endpoint_url = "http://127.0.0.1:$moto_port"
region = "us-east-1"
force_path_style = true
[server]
listen = "127.0.0.1:$metrics_port"
EOF
bundle "$work/b2" '["/usr/local/bin/trailhose","run","--config","/etc/trailhose/trailhose.toml"]' \
  "[[\"/etc/trailhose/trailhose.toml\",\"$work/etc/run.toml\",\"ro\"]]"
start=$(date +%s.%N)
"$RUNTIME" $RUNTIME_FLAGS run --detach --bundle "$work/b2" trailhose-img >"$work/run.log" 2>&1 \
  || { cat "$work/run.log"; exit 1; }
ready=""
for _ in $(seq 300); do
  if curl -fs "http://127.0.0.1:$metrics_port/readyz" >/dev/null; then ready=$(date +%s.%N); break; fi
  sleep 0.05
done
[ -n "$ready" ] || { echo "error: /readyz never answered 200" >&2; "$RUNTIME" $RUNTIME_FLAGS state trailhose-img || true; exit 1; }
curl -fs "http://127.0.0.1:$metrics_port/healthz" >/dev/null || { echo "error: /healthz failed" >&2; exit 1; }
curl -fs "http://127.0.0.1:$metrics_port/metrics" | grep -q '^trailhose_' || { echo "error: /metrics has no trailhose series" >&2; exit 1; }
echo "run inside the image: /healthz and /readyz 200 after $(python3 -c "print(f'{$ready - $start:.2f}')") s (start to ready, runtime start included)"
# One delivery file through the containerized worker at the default batch settings: it is
# received and held, SIGTERM writes it and acknowledges the message.
python - "$queue_url" "$PWD/examples/data/AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18/111122223333_CloudTrail_us-east-1_20240318T1415Z_example0001.json.gz" <<'EOF'
import json, sys, time
from moto_clients import client
queue, path = sys.argv[1:]
key = "AWSLogs/111122223333/CloudTrail/us-east-1/2024/03/18/" + path.rsplit("/", 1)[1]
client("s3").upload_file(path, "trail-logs", key)
sqs = client("sqs")
sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"s3Bucket": "trail-logs", "s3ObjectKey": [key]}))
for _ in range(300):
    a = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    if a["ApproximateNumberOfMessagesNotVisible"] == "1":
        break
    time.sleep(0.1)
else:
    sys.exit("the worker in the image never received the message")
EOF
"$RUNTIME" $RUNTIME_FLAGS kill trailhose-img TERM
for _ in $(seq 100); do
  [ "$("$RUNTIME" $RUNTIME_FLAGS state trailhose-img 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' 2>/dev/null)" = stopped ] && break
  sleep 0.1
done
python - "$queue_url" <<'EOF'
import sys
from moto_clients import client
queue = sys.argv[1]
keys = [o["Key"] for o in client("s3").list_objects_v2(Bucket="out-bucket").get("Contents", [])]
a = client("sqs").get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
left = int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])
if not any(k.startswith("cloudtrail/year=") for k in keys) or left:
    sys.exit(f"after SIGTERM: objects {keys}, messages left {left}")
print(f"run inside the image: the file was written ({len(keys)} objects) and its message deleted on SIGTERM")
EOF
echo "image OK"
