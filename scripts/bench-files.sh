#!/usr/bin/env bash
# Benchmark of single-file access inside a generation (`vmrepo ls`, `cat`, `diff`, `log`) on a
# realistic VM: a real ext4 filesystem (real files from /usr, made by make-sample-vm.py) on a
# large thin disk, with N nights of in-place churn (churn-vm.py), each ingested.
#
# Each command runs with the page cache dropped first (cold; needs root, else it says "warm")
# and is measured with /usr/bin/time: wall seconds, bytes read from the disk the repository is
# on (the kernel's block-input count, 512-byte units), and peak RSS. For scale, the same is
# measured for `cat` of the whole disk image from the repository (`vmrepo extract`).
# usage: scripts/bench-files.sh [--size 20G] [--fill 2000M] [--nights 30] [--work DIR]
# needs: e2fsprogs time python3 (apt-get install -y e2fsprogs time python3)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=20G FILL=2000M NIGHTS=30 WORK=/var/tmp/vmrepo-bench-files
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$2; shift 2 ;;
        --fill) FILL=$2; shift 2 ;;
        --nights) NIGHTS=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "bench-files.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
command -v /usr/bin/time >/dev/null || { echo "bench-files.sh: /usr/bin/time missing (apt-get install -y time)" >&2; exit 1; }

cargo build --release --quiet
VMREPO=$PWD/target/release/vmrepo
rm -rf "$WORK"; mkdir -p "$WORK/ds1"
VM=$WORK/ds1/files
REPO=$WORK/repo
echo "== generating a $SIZE VM with $FILL of files"
python3 scripts/make-sample-vm.py "$VM" --name files --size "$SIZE" --fill "$FILL" --seed 11 >/dev/null
"$VMREPO" init "$REPO" >/dev/null
echo "== ingesting $NIGHTS nights"
for n in $(seq 1 "$NIGHTS"); do
    [ "$n" -gt 1 ] && python3 scripts/churn-vm.py "$VM" --percent 2 --seed "$n" >/dev/null
    "$VMREPO" ingest "$REPO" "$VM" --time "$(date -u -d "2026-11-01 +$n days" +%Y-%m-%dT01:00:00Z)" >/dev/null 2>&1
done

COLD=cold
drop() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; else COLD=warm; fi
}
# measure LABEL CMD...: cold wall seconds, MiB read from disk, peak RSS MiB.
measure() {
    local label=$1; shift
    drop
    /usr/bin/time -f '%e %I %M' -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || {
        echo "bench-files.sh: $label failed:" >&2; cat "$WORK/err" >&2; exit 1; }
    read -r secs blocks rss <"$WORK/time"
    awk -v l="$label" -v s="$secs" -v b="$blocks" -v r="$rss" \
        'BEGIN { printf "| %s | %s | %.1f | %.0f |\n", l, s, b * 512 / 1048576, r / 1024 }'
}

# A directory with many entries, a file of about 1 MiB, and a file the nights added.
# From the file map churn-vm.py keeps: the directory with the most files, the file closest to
# 1 MiB, and the newest file the nights added under /var/log.
read -r DIR ENTRIES BIG BIG_SIZE HOT < <(python3 - "$VM/.churn-blockmap.json" <<'PY'
import json, os, sys
files = json.load(open(sys.argv[1]))["files"]
per_dir = {}
for _, path, size, _ in files:
    per_dir[os.path.dirname(path)] = per_dir.get(os.path.dirname(path), 0) + 1
d = max(per_dir, key=per_dir.get)
big = min(files, key=lambda f: abs(f[2] - (1 << 20)))
hot = [f[1] for f in files if f[1].startswith("/var/log/")]
print(d, per_dir[d], big[1], big[2], hot[-1] if hot else big[1])
PY
)
echo
echo "$NIGHTS generations of a $SIZE disk with $FILL of files; repository $(du -sh "$REPO" | cut -f1); $COLD page cache"
echo
echo "| command | seconds | MiB read from disk | peak RSS MiB |"
echo "|---|---|---|---|"
measure "list (the binary and the index: every command's base)" "$VMREPO" list "$REPO" files
measure "ls $DIR ($ENTRIES files)" "$VMREPO" ls "$REPO" files "disk0:$DIR"
measure "cat $BIG ($BIG_SIZE bytes)" "$VMREPO" cat "$REPO" files "disk0:$BIG"
measure "diff of the last two nights" "$VMREPO" diff "$REPO" files@-1 files
measure "log of $HOT over $NIGHTS nights" "$VMREPO" log "$REPO" files "disk0:$HOT"
measure "extract of the whole VM (for scale)" "$VMREPO" extract "$REPO" files "$WORK/extracted"
rm -rf "$WORK/extracted"
