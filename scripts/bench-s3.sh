#!/usr/bin/env bash
# vmrepo and restic on a local directory and on an S3 store on loopback, same bytes, same run:
# first backup, an unchanged second backup, a full restore; and the store's own rate for the
# same amount of data (boto3, 8 MiB parts, 10 threads), which bounds what any client can reach.
#
# usage: scripts/bench-s3.sh [seaweedfs|ceph] [IMAGE]
#   IMAGE defaults to a 1 GiB sparse image with 384 MiB of half-random, half-text data.
# Needs: scripts/s3-store.sh install <store>, restic, a release build (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:-seaweedfs}
work=$(mktemp -d "${TMPDIR:-/tmp}/vmrepo-bench-s3.XXXXXX")
trap 'scripts/s3-store.sh stop "$work/store" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
img=${2:-$work/bench.img}
if [ ! -e "$img" ]; then
    python3 - "$img" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(1 << 30)
    for i in range(0, 384 << 20, 1 << 20):
        f.seek(i * 2)
        blk = os.urandom(512 << 10) + (b"vmrepo bench text line %d\n" % i) * 20000
        f.write(blk[: 1 << 20])
EOF
fi
V=$PWD/target/release/vmrepo
envf=$(scripts/s3-store.sh start "$store" "$work/store")
# shellcheck disable=SC1090
. "$envf"
export XDG_CACHE_HOME=$work/cache RESTIC_PASSWORD=bench
url=s3://$S3_BUCKET/vmrepo
rurl=s3:$AWS_ENDPOINT_URL/$S3_BUCKET/restic
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN { printf "%.2f", b - a }'; }
$V init "$work/local" >/dev/null
$V init "$url" >/dev/null
restic -r "$work/restic" init >/dev/null
restic -r "$rurl" init >/dev/null
echo "store: $store; data: $(du -m --apparent-size "$img" | cut -f1) MiB virtual, $(du -m "$img" | cut -f1) MiB allocated"
printf '%-28s %10s %10s\n' "" local s3
printf '%-28s %10s %10s\n' "vmrepo first backup (s)" "$(t "$V" ingest "$work/local" "$img" --name b)" "$(t "$V" ingest "$url" "$img" --name b)"
printf '%-28s %10s %10s\n' "vmrepo unchanged night (s)" "$(t "$V" ingest "$work/local" "$img" --name b)" "$(t "$V" ingest "$url" "$img" --name b)"
printf '%-28s %10s %10s\n' "vmrepo restore (s)" "$(t "$V" extract "$work/local" b "$work/o1")" "$(t "$V" extract "$url" b "$work/o2")"
cmp "$work/o2/$(basename "$img")" "$img"
printf '%-28s %10s %10s\n' "restic first backup (s)" "$(t restic -r "$work/restic" backup "$img")" "$(t restic -r "$rurl" backup "$img")"
printf '%-28s %10s %10s\n' "restic unchanged night (s)" "$(t restic -r "$work/restic" backup "$img")" "$(t restic -r "$rurl" backup "$img")"
printf '%-28s %10s %10s\n' "restic restore (s)" "$(t restic -r "$work/restic" restore latest --target "$work/r1")" "$(t restic -r "$rurl" restore latest --target "$work/r2")"
stored=$(du -sm "$work/local/data" | cut -f1)
head -c "${stored}M" /dev/urandom >"$work/raw"
/opt/vmrepo-s3/venv/bin/python - "$work/raw" <<'EOF'
import boto3, os, sys, time
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"])
size = os.path.getsize(sys.argv[1]) / 1e6
t = time.time(); s3.upload_file(sys.argv[1], os.environ["S3_BUCKET"], "raw"); up = time.time() - t
t = time.time(); s3.download_file(os.environ["S3_BUCKET"], "raw", sys.argv[1] + ".back"); down = time.time() - t
print("store itself, %.0f MB (what vmrepo stored): PUT %.2f s (%.0f MB/s), GET %.2f s (%.0f MB/s)" % (size, up, size / up, down, size / down))
EOF
# What a night costs in requests and bytes (the ingest's own report), unchanged and with 1% of
# the allocated data rewritten in 64 KiB pieces.
night() {
    "$V" ingest "$url" "$img" --name b --json 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin); t = j["transfer"]
print("%.2f s, %d requests, %.1f MB sent, %.1f MB received, %.1f MB stored" % (j["seconds"], t["requests"], t["bytes_up"] / 1e6, t["bytes_down"] / 1e6, j["stats"]["bytes_stored"] / 1e6))'
}
echo "vmrepo night on $store, unchanged: $(night)"
python3 - "$img" <<'EOF2'
import os, random, sys
r = random.Random(7)
with open(sys.argv[1], "r+b") as f:
    for _ in range(60):
        f.seek(r.randrange(0, 384 << 20, 65536) * 2 // 65536 * 65536)
        f.write(os.urandom(65536))
EOF2
echo "vmrepo night on $store, 1% changed: $(night)"
