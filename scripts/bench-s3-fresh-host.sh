#!/usr/bin/env bash
# A fresh host's first command on a repository in object storage that holds many generations:
# how long building its cache takes, and how much it reads, from the packs' descriptions (as
# written at each seal, then after gc compacted them) and, for comparison, from the packs alone
# (descriptions removed).
#
# usage: scripts/bench-s3-fresh-host.sh [seaweedfs|ceph] [GENERATIONS]
#   GENERATIONS (default 300) nightly generations of a 64 MiB disk with 1% churn, over 4 VMs.
# Needs: scripts/s3-store.sh install <store>, a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-seaweedfs}
gens=${2:-300}
work=$(mktemp -d "${TMPDIR:-/tmp}/vmrepo-bench-fresh.XXXXXX")
trap 'scripts/s3-store.sh stop "$work/store" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
V=$PWD/target/release/vmrepo
envf=$(scripts/s3-store.sh start "$store" "$work/store")
# shellcheck disable=SC1090
. "$envf"
url=s3://$S3_BUCKET/fleet
PY=${VMREPO_S3_ROOT:-/opt/vmrepo-s3}/venv/bin/python
sizes() { # bytes under each prefix: data/, pack-index/
    "$PY" - "$S3_BUCKET" <<'PYEOF'
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"])
for prefix in ("fleet/data/", "fleet/pack-index/"):
    n = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[1], Prefix=prefix):
        for o in page.get("Contents", []):
            n += 1; size += o["Size"]
    print("%s %d objects, %.1f MB" % (prefix, n, size / 1e6), end="; ")
print()
PYEOF
}
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN { printf "%.2f", b - a }'; }
export XDG_CACHE_HOME=$work/cache-writer
$V init "$url" >/dev/null
for vm in 0 1 2 3; do
    python3 - "$work/vm$vm.img" "$vm" <<'PYEOF'
import random, sys
r = random.Random(int(sys.argv[2]))
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 20)
    for i in range(0, 32 << 20, 1 << 20):
        f.seek(i * 2)
        f.write(bytes(r.getrandbits(8) for _ in range(4096)) * 256)
PYEOF
done
echo "writing $gens generations over 4 VMs into $store ..."
for ((g = 0; g < gens; g++)); do
    vm=$((g % 4))
    python3 -c "
import os, random, sys
r = random.Random($g)
with open('$work/vm$vm.img', 'r+b') as f:
    for _ in range(10):
        f.seek(r.randrange(0, (64 << 20) - 65536, 4096)); f.write(os.urandom(65536))"
    $V ingest "$url" "$work/vm$vm.img" --name "vm$vm" >/dev/null 2>&1
done
fresh() { # a new cache directory, then `vmrepo list`
    rm -rf "$work/cache-fresh"
    XDG_CACHE_HOME=$work/cache-fresh t "$V" list "$url"
}
stash() { # move pack-index/ to stash/ (or back): a repository without descriptions
    "$PY" - "$S3_BUCKET" "$1" "$2" <<'PYEOF'
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"])
bucket, src, dst = sys.argv[1:4]
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=src):
    for o in page.get("Contents", []):
        s3.copy_object(Bucket=bucket, Key=dst + o["Key"][len(src):], CopySource={"Bucket": bucket, "Key": o["Key"]})
        s3.delete_object(Bucket=bucket, Key=o["Key"])
PYEOF
}
echo "$(sizes)"
echo "fresh host, a description per pack: $(fresh) s"
stash fleet/pack-index/ fleet-stash/
echo "fresh host, no descriptions (every pack read): $(fresh) s"
stash fleet-stash/ fleet/pack-index/
$V gc "$url" >/dev/null 2>&1
echo "after gc (descriptions compacted, nothing else changed): $(sizes)"
echo "fresh host, compacted descriptions: $(fresh) s"
