#!/usr/bin/env bash
# End-to-end benchmark on a realistic VM: a real ext4 filesystem image (real files from /usr,
# a database-like file, logs) with nightly in-place churn of ~2% of used blocks, ingested for
# N nights by vmrepo, and -- in the same run, on the same data -- by restic and borg.
# Prints per-night time and stored bytes for each tool, ratios, b3sum/cat floors, peak RSS and
# restore time; writes the table to $WORK/results.md.
#
# Then reads the last night back three ways on the same repository: extract, a sequential read
# of the disk through `vmrepo mount`, and `qemu-img convert` from `vmrepo serve-nbd`.
# usage: scripts/bench.sh [--size 4G] [--fill 1500M] [--nights 7] [--percent 2]
#                         [--work DIR] [--tools vmrepo,restic,borg] [--chunk-avg KIB] [--segment-size MIB]
# needs: restic borgbackup b3sum time fuse3 qemu-utils zstd (apt-get install -y restic borgbackup b3sum time fuse3 qemu-utils zstd)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=4G FILL=1500M NIGHTS=7 PERCENT=2 WORK=/tmp/vmrepo-bench TOOLS=vmrepo,restic,borg CHUNK_AVG="" SEGMENT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$2; shift 2 ;;
        --fill) FILL=$2; shift 2 ;;
        --nights) NIGHTS=$2; shift 2 ;;
        --percent) PERCENT=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --tools) TOOLS=$2; shift 2 ;;
        --chunk-avg) CHUNK_AVG=$2; shift 2 ;;
        --segment-size) SEGMENT=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
has() { case ",$TOOLS," in *,"$1",*) return 0 ;; *) return 1 ;; esac; }
for t in b3sum /usr/bin/time zstd; do command -v "$t" >/dev/null || { echo "bench.sh: $t missing (apt-get install -y b3sum time zstd)" >&2; exit 1; }; done
has restic && { command -v restic >/dev/null || { echo "bench.sh: restic missing (apt-get install -y restic)" >&2; exit 1; }; }
has borg && { command -v borg >/dev/null || { echo "bench.sh: borg missing (apt-get install -y borgbackup)" >&2; exit 1; }; }

cargo build --release --quiet
VMREPO=$PWD/target/release/vmrepo
rm -rf "$WORK"; mkdir -p "$WORK"
VM=$WORK/ds1/bench
mkdir -p "$WORK/ds1"
echo "== generating a $SIZE VM with $FILL of files"
python3 scripts/make-sample-vm.py "$VM" --name bench --size "$SIZE" --fill "$FILL" --seed 7 --hardlink >/dev/null
FLAT=$VM/bench-flat.vmdk
EXCL=$VM/.churn-blockmap.json

export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$WORK/restic BORG_REPO=$WORK/borg
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
INIT_ARGS=()
[ -n "$CHUNK_AVG" ] && INIT_ARGS+=(--chunk-avg "$CHUNK_AVG")
[ -n "$SEGMENT" ] && INIT_ARGS+=(--segment-size "$SEGMENT")
"$VMREPO" init "$WORK/vmrepo" "${INIT_ARGS[@]}" >/dev/null
has restic && restic init -q
has borg && borg init -e none

RES=$WORK/results.tsv
printf 'night\ttool\tseconds\tstored_bytes\tpeak_rss_kib\n' > "$RES"
size_of() { du -sb "$1" | cut -f1; }
# timed TOOL NIGHT REPO_DIR CMD...: wall seconds, repository growth, peak RSS.
timed() {
    local tool=$1 night=$2 repo=$3; shift 3
    local before after t0 t1 rss
    before=$(size_of "$repo")
    # Start every tool with no writeback pending from the previous one (or from the churn).
    sync
    t0=$(date +%s.%N)
    /usr/bin/time -f '%M' -o "$WORK/rss" "$@" >"$WORK/$tool.out" 2>"$WORK/$tool.err" || {
        echo "bench.sh: $tool failed on night $night:" >&2; cat "$WORK/$tool.err" >&2; exit 1; }
    t1=$(date +%s.%N)
    after=$(size_of "$repo")
    rss=$(tail -1 "$WORK/rss")
    printf '%s\t%s\t%.2f\t%s\t%s\n' "$night" "$tool" "$(awk "BEGIN{print $t1 - $t0}")" "$((after - before))" "$rss" >> "$RES"
}

for night in $(seq 1 "$NIGHTS"); do
    if [ "$night" -gt 1 ]; then
        python3 scripts/churn-vm.py "$VM" --percent "$PERCENT" --seed "$night" >/dev/null
    fi
    echo "== night $night"
    # Warm the page cache equally for everyone, and measure the floors.
    cat "$FLAT" > /dev/null
    timed cat "$night" "$WORK/ds1" cat "$FLAT"
    timed b3sum "$night" "$WORK/ds1" b3sum "$FLAT"
    has vmrepo && timed vmrepo "$night" "$WORK/vmrepo" "$VMREPO" ingest "$WORK/vmrepo" "$VM" --json
    # The floor of exact 4 KiB-block dedup: tonight's new blocks, compressed with zstd -3.
    read -r floor _ < <(python3 scripts/block-floor.py "$WORK/floor.state" "$FLAT")
    printf '%s\tfloor4k\t0\t%s\t0\n' "$night" "$floor" >> "$RES"
    has restic && timed restic "$night" "$WORK/restic" restic backup -q --exclude "$EXCL" "$VM"
    has borg && timed borg "$night" "$WORK/borg" borg create --compression zstd,3 --exclude "$EXCL" "::night$night" "$VM"
    grep -P "^$night\t" "$RES" | cut -f2- | column -t
done

echo "== restore of the last night"
cat "$FLAT" > /dev/null
has vmrepo && timed vmrepo-extract restore "$WORK/ds1" "$VMREPO" extract "$WORK/vmrepo" bench "$WORK/out-vmrepo"
has vmrepo && cmp "$FLAT" "$WORK/out-vmrepo/bench-flat.vmdk"
has restic && timed restic-restore restore "$WORK/ds1" restic restore -q latest --target "$WORK/out-restic"
has borg && timed borg-extract restore "$WORK/ds1" sh -c "mkdir -p '$WORK/out-borg' && cd '$WORK/out-borg' && borg extract ::night$NIGHTS"
rm -rf "$WORK/out-vmrepo" "$WORK/out-restic" "$WORK/out-borg"

if has vmrepo; then
    # Reading the last night in place, against extract on the same repository (packs warm for
    # all three): the whole flat disk read sequentially through `vmrepo mount` (dd to
    # /dev/null), and the disk copied over NBD by `qemu-img convert` from `vmrepo serve-nbd`
    # into a sparse raw file. Two rounds each; the summary takes the best.
    echo "== reading the last night in place: FUSE mount and NBD vs extract"
    for t in fusermount3 qemu-img; do command -v "$t" >/dev/null || { echo "bench.sh: $t missing (apt-get install -y fuse3 qemu-utils)" >&2; exit 1; }; done
    MNT=$WORK/mnt; mkdir -p "$MNT"
    MPID="" NPID=""
    cleanup() {
        [ -n "$MPID" ] && { fusermount3 -u -z "$MNT" 2>/dev/null; kill "$MPID" 2>/dev/null; }
        [ -n "$NPID" ] && kill "$NPID" 2>/dev/null
        return 0
    }
    trap cleanup EXIT
    wait_for() { # FILE PATTERN: until FILE has a line matching PATTERN (at most 60 s)
        for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
        echo "bench.sh: timed out waiting for '$2' in $1:" >&2; cat "$1" >&2; exit 1
    }
    for round in 1 2; do
        timed vmrepo-extract "read$round" "$WORK/ds1" "$VMREPO" extract "$WORK/vmrepo" bench "$WORK/out-vmrepo"
        rm -rf "$WORK/out-vmrepo"

        "$VMREPO" mount "$WORK/vmrepo" "$MNT" bench > "$WORK/mount.out" 2>&1 & MPID=$!
        wait_for "$WORK/mount.out" '^mounted '
        timed vmrepo-mount-read "read$round" "$WORK/ds1" dd if="$MNT/bench/latest/bench-flat.vmdk" of=/dev/null bs=1M
        cmp "$FLAT" "$MNT/bench/latest/bench-flat.vmdk"
        fusermount3 -u "$MNT"; wait "$MPID"; MPID=""

        "$VMREPO" serve-nbd "$WORK/vmrepo" bench --listen 127.0.0.1:0 > "$WORK/nbd.out" 2> "$WORK/nbd.err" & NPID=$!
        wait_for "$WORK/nbd.out" '^listening on nbd://'
        URI=$(sed -n 's/^listening on //p' "$WORK/nbd.out" | head -1)
        timed vmrepo-nbd-read "read$round" "$WORK/ds1" qemu-img convert -f raw -O raw "$URI" "$WORK/out-nbd.raw"
        cmp "$FLAT" "$WORK/out-nbd.raw"
        rm -f "$WORK/out-nbd.raw"
        kill -INT "$NPID"; wait "$NPID"; NPID=""
    done
    grep -P "^read[12]\t" "$RES" | cut -f1-3 | column -t
fi

# Retention: drop the oldest night, then free its space. vmrepo reads only metadata to find
# what is live and copies only what sits in mostly-dead data files.
echo "== prune the oldest night and collect garbage"
KEEP=$((NIGHTS - 1))
if [ "$KEEP" -ge 1 ]; then
    has vmrepo && timed vmrepo-gc gc "$WORK/vmrepo" "$VMREPO" prune "$WORK/vmrepo" --keep-last "$KEEP" --gc --json
    has vmrepo && cp "$WORK/vmrepo-gc.out" "$WORK/gc.json"
    has restic && timed restic-gc gc "$WORK/restic" restic forget -q --keep-last "$KEEP" --prune
    has borg && timed borg-gc gc "$WORK/borg" sh -c "borg prune --keep-last $KEEP && borg compact"
    has vmrepo && "$VMREPO" check "$WORK/vmrepo" --read-data >/dev/null
fi

# Encryption cost: the same VM ingested (all data new) into a fresh plain and a fresh encrypted
# repository, twice each in alternation so that noise hits both.
if has vmrepo; then
    echo "== encryption overhead (first ingest into fresh repositories)"
    export VMREPO_PASSWORD=bench
    for round in 1 2; do
        for mode in none aes-256-gcm; do
            rm -rf "$WORK/enc-$mode"
            "$VMREPO" init "$WORK/enc-$mode" --encryption "$mode" "${INIT_ARGS[@]}" >/dev/null
            timed "vmrepo-$mode" "enc$round" "$WORK/enc-$mode" "$VMREPO" ingest "$WORK/enc-$mode" "$VM" --json
        done
    done
    rm -rf "$WORK/enc-none" "$WORK/enc-aes-256-gcm"
fi

python3 - "$RES" "$SIZE" "$FILL" "$NIGHTS" "$PERCENT" "$(nproc)" "${CHUNK_AVG:-default}" "$(size_of "$WORK/vmrepo/index.sqlite")" "${SEGMENT:-default}" "$WORK/gc.json" "$(size_of "$WORK/vmrepo")" > "$WORK/results.md" <<'PY'
import sys, collections
res, size, fill, nights, pct, cores, chunk, index_bytes, segment, gc_json, repo_bytes = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(res)][1:]
d = collections.defaultdict(dict)
for night, tool, sec, stored, rss in rows:
    d[tool][night] = (float(sec), int(stored), int(rss))
MB = 1e6
def night_avg(tool, i):
    v = [d[tool][str(n)][i] for n in range(2, int(nights) + 1) if str(n) in d[tool]]
    return sum(v) / len(v) if v else float("nan")
tools = [t for t in ("vmrepo", "restic", "borg") if t in d]
print(f"Disk {size} virtual, {fill} of files, {nights} nights of {pct}% in-place churn, {cores} cores, vmrepo chunk avg {chunk} KiB, segment {segment} MiB.\n")
print("| tool | first ingest s | first MB/s | nightly s (avg) | nightly MB/s | first stored MB | nightly stored MB (avg) | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
vsize = {"4G": 4 << 30}.get(size)
import re
m = re.match(r"(\d+)([GM])", size); vbytes = int(m.group(1)) << (30 if m.group(2) == "G" else 20)
for t in tools + ["cat", "b3sum"]:
    if t not in d: continue
    f = d[t]["1"]; ns = night_avg(t, 0)
    rss = max(v[2] for v in d[t].values()) / 1024
    stored = f"{f[1]/MB:.1f}" if t in tools else "-"
    nstored = f"{night_avg(t,1)/MB:.1f}" if t in tools else "-"
    print(f"| {t} | {f[0]:.2f} | {vbytes/f[0]/MB:.0f} | {ns:.2f} | {vbytes/ns/MB:.0f} | {stored} | {nstored} | {rss:.0f} |")
print()
for t in ("restic", "borg"):
    if t in d and "vmrepo" in d:
        print(f"- vmrepo vs {t}: first ingest {d[t]['1'][0]/d['vmrepo']['1'][0]:.2f}x faster, "
              f"nightly {night_avg(t,0)/night_avg('vmrepo',0):.2f}x faster, "
              f"nightly stored {night_avg('vmrepo',1)/night_avg(t,1):.2f}x of {t}'s")
if "vmrepo" in d and "floor4k" in d:
    per_night = [d["vmrepo"][str(n)][1] / d["floor4k"][str(n)][1]
                 for n in range(2, int(nights) + 1) if str(n) in d["floor4k"] and d["floor4k"][str(n)][1]]
    print(f"- stored per night against exact 4 KiB-block dedup + zstd -3 of the new blocks: vmrepo "
          f"{night_avg('vmrepo',1)/MB:.1f} MB, floor {night_avg('floor4k',1)/MB:.1f} MB "
          f"(ratio of averages {night_avg('vmrepo',1)/night_avg('floor4k',1):.2f}; per night "
          + ", ".join(f"{r:.2f}" for r in per_night) + f"); first night {d['vmrepo']['1'][1]/MB:.1f} MB "
          f"against {d['floor4k']['1'][1]/MB:.1f} MB")
if "vmrepo" in d:
    print(f"- vmrepo nightly time / b3sum time over the same flat file: {night_avg('vmrepo',0)/night_avg('b3sum',0):.2f}")
    print(f"- vmrepo index.sqlite after all nights: {int(index_bytes)/MB:.2f} MB")
    print(f"- vmrepo ingest CPU: see {res}; nights 2..{nights} averaged above")
rest = {t: d[t]["restore"][0] for t in ("vmrepo-extract", "restic-restore", "borg-extract") if t in d and "restore" in d[t]}
if rest:
    print("- restore of the last night: " + ", ".join(f"{t} {s:.2f} s" for t, s in rest.items()))
    if "vmrepo-extract" in rest and "restic-restore" in rest:
        print(f"- vmrepo extract vs restic restore: {rest['restic-restore']/rest['vmrepo-extract']:.2f}x faster")
enc = {m: min(d[f"vmrepo-{m}"][r][0] for r in ("enc1", "enc2") if r in d.get(f"vmrepo-{m}", {}))
       for m in ("none", "aes-256-gcm") if f"vmrepo-{m}" in d}
if len(enc) == 2:
    print(f"- encrypted first ingest: {enc['aes-256-gcm']:.2f} s vs {enc['none']:.2f} s unencrypted "
          f"(best of 2 each; the encrypted run includes deriving the key from the passphrase, "
          f"argon2id with 64 MiB): throughput {enc['none']/enc['aes-256-gcm']*100:.0f}% of unencrypted")
gcs = {t: d[t]["gc"] for t in ("vmrepo-gc", "restic-gc", "borg-gc") if t in d and "gc" in d[t]}
if gcs:
    print("- prune of the oldest night + garbage collection: " + ", ".join(
        f"{t[:-3]} {v[0]:.2f} s, {-v[1]/MB:.1f} MB freed" for t, v in gcs.items()))
    import json, os
    if os.path.exists(gc_json):
        g = json.load(open(gc_json))["gc"]
        print(f"- vmrepo gc read {g['metadata_read']/MB:.2f} MB of metadata and copied {g['bytes_copied']/MB:.1f} MB "
              f"of live data ({g['packs_rewritten']} data files rewritten, {g['packs_deleted']} deleted) "
              f"in a {int(repo_bytes)/MB:.0f} MB repository")
reads = {t: min(v[0] for n, v in d[t].items() if n.startswith("read")) for t in ("vmrepo-extract", "vmrepo-mount-read", "vmrepo-nbd-read") if t in d and any(n.startswith("read") for n in d[t])}
if len(reads) == 3:
    e = reads["vmrepo-extract"]
    print(f"- reading the last night's {size} disk (best of 2): extract {e:.2f} s, "
          f"sequential read through `vmrepo mount` {reads['vmrepo-mount-read']:.2f} s "
          f"({e / reads['vmrepo-mount-read']:.2f}x extract's throughput), "
          f"`qemu-img convert` from `vmrepo serve-nbd` {reads['vmrepo-nbd-read']:.2f} s "
          f"({e / reads['vmrepo-nbd-read']:.2f}x)")
PY
echo
cat "$WORK/results.md"
