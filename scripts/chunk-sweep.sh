#!/usr/bin/env bash
# Chooses chunk and segment sizes by measurement: runs scripts/bench.sh (vmrepo only) on the
# same generated VM and the same nightly churn (fixed seeds) for each parameter set, and prints
# first/nightly ingest time, bytes stored per night and index size for each.
# usage: scripts/chunk-sweep.sh [--size 4G] [--fill 1500M] [--nights 5] [SETS...]
#        a SET is AVG_KIB/SEGMENT_MIB, e.g. 64/16 (default sets: 16/16 32/16 64/16 128/16 256/16 64/4 64/64)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=4G FILL=1500M NIGHTS=5 SETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$2; shift 2 ;;
        --fill) FILL=$2; shift 2 ;;
        --nights) NIGHTS=$2; shift 2 ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) SETS+=("$1"); shift ;;
    esac
done
[ ${#SETS[@]} -gt 0 ] || SETS=(16/16 32/16 64/16 128/16 256/16 64/4 64/64)
OUT=/tmp/vmrepo-sweep.md
echo "| chunk avg KiB | segment MiB | first s | nightly s | first stored MB | nightly stored MB | index MB |" > "$OUT"
echo "|---|---|---|---|---|---|---|" >> "$OUT"
for set in "${SETS[@]}"; do
    avg=${set%/*} seg=${set#*/}
    scripts/bench.sh --tools vmrepo --size "$SIZE" --fill "$FILL" --nights "$NIGHTS" \
        --chunk-avg "$avg" --segment-size "$seg" --work /tmp/vmrepo-sweep-run > /tmp/vmrepo-sweep-run.log 2>&1 ||
        { cat /tmp/vmrepo-sweep-run.log; exit 1; }
    python3 - "$avg" "$seg" /tmp/vmrepo-sweep-run/results.tsv /tmp/vmrepo-sweep-run/vmrepo/index.sqlite >> "$OUT" <<'PY'
import sys, os
avg, seg, tsv, idx = sys.argv[1:]
rows = [l.split("\t") for l in open(tsv)][1:]
v = [(int(r[0]), float(r[2]), int(r[3])) for r in rows if r[1] == "vmrepo" and r[0].isdigit()]
first = [x for x in v if x[0] == 1][0]
nights = [x for x in v if x[0] > 1]
ns = sum(x[1] for x in nights) / len(nights)
nb = sum(x[2] for x in nights) / len(nights)
print(f"| {avg} | {seg} | {first[1]:.2f} | {ns:.2f} | {first[2]/1e6:.1f} | {nb/1e6:.1f} | {os.path.getsize(idx)/1e6:.2f} |")
PY
    tail -1 "$OUT"
done
echo
cat "$OUT"
