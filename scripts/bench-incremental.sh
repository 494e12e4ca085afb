#!/usr/bin/env bash
# Change-aware ingest vs full re-ingest of the same disk (issue target: >= 20x faster when the
# new delta holds 2% of a 20 GiB disk). Builds a dense disk image, ingests it once, changes 2%
# of it in one of two patterns, then times -- on two copies of the same repository, page cache
# dropped where possible -- the change-aware ingest against a full re-ingest of the same disk.
#
# usage: scripts/bench-incremental.sh [--size-gib 20] [--percent 2] [--pattern clustered|scattered]
#                                     [--source chain|ranges] [--work DIR]
#   clustered: the changes are 10 MiB runs (files rewritten in place, a database's hot area)
#   scattered: the changes are 1 MiB pieces at random offsets (a worst case for 4 MiB segments)
#   chain:  the KVM daily-snapshot scheme: night 1 backs up overlay ov1 (empty) over the raw
#           image, night 2 the new overlay ov2 (holding the changes) over ov1; change-aware is
#           plain `vmrepo ingest` (it sees the chain grew), full is `vmrepo ingest --full-read`
#   ranges: the image is changed in place; change-aware is `--changed-ranges FILE --since`,
#           full is a plain `vmrepo ingest`
# needs: python3, qemu-utils (qemu-img, qemu-io); root to drop the page cache between runs
# disk: about 3.2x the image (the image, two copies of the repository, the overlays); the work
# directory is kept for the next run (the image takes minutes to write): rm -rf it when done
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_GIB=20 PERCENT=2 PATTERN=clustered SOURCE=chain WORK=/tmp/vmrepo-bench-incr
while [ $# -gt 0 ]; do
    case "$1" in
        --size-gib) SIZE_GIB=$2; shift 2 ;;
        --percent) PERCENT=$2; shift 2 ;;
        --pattern) PATTERN=$2; shift 2 ;;
        --source) SOURCE=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

cargo build --release -q
VMREPO=$PWD/target/release/vmrepo
mkdir -p "$WORK"
IMG=$WORK/disk.img

if [ ! -f "$IMG" ] || [ "$(stat -c %s "$IMG")" != "$((SIZE_GIB << 30))" ]; then
    echo "== writing a dense ${SIZE_GIB} GiB image"
    python3 - "$IMG" "$SIZE_GIB" <<'PY'
import os, sys
path, gib = sys.argv[1], int(sys.argv[2])
block = bytearray(os.urandom(1 << 20))
with open(path, "wb") as f:
    for i in range(gib << 10):
        # Every MiB differs (a counter in each 4 KiB block) and half of it compresses.
        for o in range(0, 1 << 20, 4096):
            block[o:o + 8] = (i * 256 + o // 4096).to_bytes(8, "little")
        block[512 << 10:] = b"log line " * ((512 << 10) // 9) + b"x" * ((512 << 10) % 9)
        f.write(block)
PY
fi

rm -rf "$WORK/repo" "$WORK/repo-full" "$WORK/repo-incr" "$WORK/ov1.qcow2" "$WORK/ov2.qcow2"
"$VMREPO" init "$WORK/repo" >/dev/null
if [ "$SOURCE" = chain ]; then
    qemu-img create -q -f qcow2 -b "$IMG" -F raw "$WORK/ov1.qcow2"
    echo "== first ingest (setup): night 1, the empty overlay ov1 over the image"
    "$VMREPO" ingest "$WORK/repo" "$WORK/ov1.qcow2" --name bench --json > "$WORK/first.json"
    qemu-img create -q -f qcow2 -b "$WORK/ov1.qcow2" -F qcow2 "$WORK/ov2.qcow2"
    TARGET=$WORK/ov2.qcow2
else
    echo "== first ingest (setup)"
    "$VMREPO" ingest "$WORK/repo" "$IMG" --name bench --json > "$WORK/first.json"
    TARGET=$IMG
fi

echo "== changing ${PERCENT}% of the disk (${PATTERN}, into $(basename "$TARGET"))"
python3 - "$IMG" "$PERCENT" "$PATTERN" "$WORK/changes.json" "$SOURCE" "$TARGET" <<'PY'
import json, os, random, subprocess, sys, tempfile
path, pct, pattern, out, source, target = sys.argv[1:]
pct = float(pct)
size = os.path.getsize(path)
piece = (10 << 20) if pattern == "clustered" else (1 << 20)
n = int(size * pct / 100 // piece)
rng = random.Random(7)
ranges = []
def content():
    # Half random, half text: every piece differs.
    return os.urandom(piece // 2) + b"changed " * (piece // 16)
if source == "ranges":
    with open(path, "r+b") as f:
        for _ in range(n):
            off = rng.randrange(0, size - piece) // 4096 * 4096
            f.seek(off)
            f.write(content())
            ranges.append({"offset": off, "length": piece})
else:
    # Guest writes into the new overlay: qemu-io writes each piece from a file of its bytes.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as tmp:
        cmds = []
        for i in range(n):
            off = rng.randrange(0, size - piece) // 4096 * 4096
            src = os.path.join(tmp, f"piece{i}")
            with open(src, "wb") as f:
                f.write(content())
            cmds += ["-c", f"write -q -s {src} {off} {piece}"]
            ranges.append({"offset": off, "length": piece})
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, target], check=True)
json.dump(ranges, open(out, "w"))
print(f"{n} pieces of {piece >> 20} MiB = {n * piece / size * 100:.1f}% of the disk")
PY

cp -a "$WORK/repo" "$WORK/repo-incr"
mv "$WORK/repo" "$WORK/repo-full"
drop_cache() {
    sync
    # Drop the image from the page cache when allowed, so both runs read from the disk.
    if [ -w /proc/sys/vm/drop_caches ]; then echo 1 > /proc/sys/vm/drop_caches; fi
}
timed() {
    local label=$1; shift
    drop_cache
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > "$WORK/$label.json"
    t1=$(date +%s.%N)
    awk "BEGIN{print $t1 - $t0}" > "$WORK/$label.seconds"
}
if [ "$SOURCE" = chain ]; then
    echo "== full re-ingest (--full-read)"
    timed full "$VMREPO" ingest "$WORK/repo-full" "$TARGET" --name bench --json --full-read
    echo "== change-aware ingest (the chain grew by ov2)"
    timed incr "$VMREPO" ingest "$WORK/repo-incr" "$TARGET" --name bench --json
else
    echo "== full re-ingest"
    timed full "$VMREPO" ingest "$WORK/repo-full" "$IMG" --name bench --json
    echo "== change-aware ingest (--changed-ranges)"
    timed incr "$VMREPO" ingest "$WORK/repo-incr" "$IMG" --name bench --json \
        --changed-ranges "$WORK/changes.json" --since bench
fi

python3 - "$WORK" "$SIZE_GIB" "$PERCENT" "$PATTERN" "$SOURCE" <<'PY'
import json, sys
w, gib, pct, pattern, source = sys.argv[1:]
full = json.load(open(f"{w}/full.json")); incr = json.load(open(f"{w}/incr.json"))
tf = float(open(f"{w}/full.seconds").read()); ti = float(open(f"{w}/incr.seconds").read())
GB = 1e9
print(f"{gib} GiB disk, {pct}% changed ({pattern}, {source}):")
print(f"  full re-ingest     {tf:7.2f} s, read {full['stats']['bytes_read']/GB:6.2f} GB ({full['stats']['bytes_read']/tf/1e6:.0f} MB/s), stored {full['stats']['bytes_stored']/1e6:7.1f} MB")
print(f"  change-aware       {ti:7.2f} s, read {incr['stats']['bytes_read']/GB:6.2f} GB, stored {incr['stats']['bytes_stored']/1e6:7.1f} MB, "
      f"{incr['incremental']['segments_taken']} of {incr['stats']['segments_total']} segments taken unread")
print(f"  speed-up           {tf/ti:.1f}x")
assert incr["incremental"]["full_reads"] == [], incr["incremental"]
PY
# Same content, same result: both repositories restore the same bytes for the new generation.
"$VMREPO" check "$WORK/repo-incr" >/dev/null
