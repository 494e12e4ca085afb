#!/usr/bin/env bash
# Read throughput of each disk reader on a large, mostly allocated image, against reading the
# same data flat. One guest image (an ext4 filesystem from make-sample-vm.py) is converted to
# monolithicSparse, streamOptimized, qcow2, compressed qcow2 (qemu-img) and to vmfs base + COWD
# or seSparse delta (scripts/make-delta.py); examples/read_disk.rs then reads each the way ingest
# does (4 MiB segments, allocation map, one read per allocated range), best of --passes, with
# every file in the page cache so the figures are the readers' own cost; with --cold the page
# cache is dropped before every pass (root), so each file is read from the disk as a nightly
# backup reads a datastore, and the compressed formats read fewer bytes from it.
#
# With --ingest, each file is also ingested (`vmrepo ingest`, best of --passes, each into a new
# repository, page cache warm): what a reader's cost means for a first backup, where cutting,
# hashing and compressing the data is paid as well.
#
# usage: scripts/bench-formats.sh [--size 2G] [--fill 1600M] [--passes 3] [--cold] [--ingest]
#                                 [--work DIR]
# needs: qemu-utils, e2fsprogs, python3
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=2G FILL=1600M PASSES=3 COLD="" INGEST="" WORK=/tmp/vmrepo-formats
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$2; shift 2 ;;
        --fill) FILL=$2; shift 2 ;;
        --passes) PASSES=$2; shift 2 ;;
        --cold) COLD=1; shift ;;
        --ingest) INGEST=1; shift ;;
        --work) WORK=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "bench-formats.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

cargo build --release --quiet --example read_disk --bin vmrepo
READ=${CARGO_TARGET_DIR:-$PWD/target}/release/examples/read_disk
VMREPO=${CARGO_TARGET_DIR:-$PWD/target}/release/vmrepo
SCRIPTS=$PWD/scripts
rm -rf "$WORK"; mkdir -p "$WORK"
echo "== generating a $SIZE guest image with $FILL of files"
python3 "$SCRIPTS/make-sample-vm.py" "$WORK/vm" --name g --size "$SIZE" --fill "$FILL" --seed 7 --hardlink >/dev/null
cd "$WORK"
cp --sparse=always vm/g-flat.vmdk flat.img
echo "== converting"
qemu-img convert -O vmdk -o subformat=monolithicSparse flat.img sparse.vmdk
qemu-img convert -O vmdk -o subformat=streamOptimized flat.img stream.vmdk
qemu-img convert -O qcow2 flat.img plain.qcow2
qemu-img convert -c -O qcow2 flat.img zlib.qcow2
python3 "$SCRIPTS/make-delta.py" flat.img cowd --format cowd
python3 "$SCRIPTS/make-delta.py" flat.img se --format sesparse
# Warm the page cache: every reader is measured from memory.
cat flat.img sparse.vmdk stream.vmdk plain.qcow2 zlib.qcow2 cowd/* se/* >/dev/null

printf '%-22s %-18s %12s %9s %10s %8s\n' FILE FORMAT BYTES_READ SECONDS MIB/S OF_FLAT
flat_rate=""
for f in flat.img sparse.vmdk stream.vmdk plain.qcow2 zlib.qcow2 cowd/delta.vmdk se/delta.vmdk; do
    if [ -n "$COLD" ]; then
        # Best of the passes, each from a dropped page cache.
        best=""
        for _ in $(seq "$PASSES"); do
            sync; echo 1 > /proc/sys/vm/drop_caches
            line=$("$READ" "$f" 1)
            r=$(cut -f5 <<<"$line")
            if [ -z "$best" ] || python3 -c "import sys; sys.exit(0 if $r > $(cut -f5 <<<"$best") else 1)"; then
                best=$line
            fi
        done
        IFS=$'\t' read -r path fmt bytes secs rate _ <<<"$best"
    else
        IFS=$'\t' read -r path fmt bytes secs rate _ < <("$READ" "$f" "$PASSES")
    fi
    [ -z "$flat_rate" ] && flat_rate=$rate
    pct=$(python3 -c "print(f'{100*$rate/$flat_rate:.0f}%')")
    printf '%-22s %-18s %12s %9s %10s %8s\n' "$path" "$fmt" "$bytes" "$secs" "$rate" "$pct"
done

[ -z "$INGEST" ] && exit 0
echo
echo "== first ingest of each file (best of $PASSES, each into a new repository, page cache warm)"
cat flat.img sparse.vmdk stream.vmdk plain.qcow2 zlib.qcow2 cowd/* se/* >/dev/null
printf '%-22s %9s %10s %8s\n' FILE SECONDS MIB/S OF_FLAT
flat_rate=""
for f in flat.img sparse.vmdk stream.vmdk plain.qcow2 zlib.qcow2 cowd/delta.vmdk se/delta.vmdk; do
    best=""
    for _ in $(seq "$PASSES"); do
        rm -rf repo && "$VMREPO" init repo >/dev/null
        secs=$("$VMREPO" ingest repo "$f" --name g --json | python3 -c "import json,sys; print(json.load(sys.stdin)['seconds'])")
        if [ -z "$best" ] || python3 -c "import sys; sys.exit(0 if $secs < $best else 1)"; then best=$secs; fi
    done
    # Throughput over the disk's virtual size: every format delivers the same guest disk.
    rate=$(python3 -c "print(f'{$(stat -c %s flat.img) / $best / 2**20:.1f}')")
    [ -z "$flat_rate" ] && flat_rate=$rate
    pct=$(python3 -c "print(f'{100*$rate/$flat_rate:.0f}%')")
    printf '%-22s %9.3f %10s %8s\n' "$f" "$best" "$rate" "$pct"
done
rm -rf repo
