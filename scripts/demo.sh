#!/usr/bin/env bash
# End-to-end demo of the nightly job on a fresh machine:
#   builds vmrepo, generates a sample VMware VM directory (a real ext4 filesystem image made by
#   mkfs.ext4 -d, a .vmx, .nvram, logs), ingests three nightly generations with realistic
#   in-place guest writes between them, lists them, extracts the middle one, verifies it with
#   cmp and qemu-img compare, and runs `vmrepo check --read-data`.
# Environment: DEMO_DIR (work directory, default a new /tmp/vmrepo-demo.*), DEMO_SIZE (disk
# size, default 2G), DEMO_FILL (bytes of files in the guest filesystem, default 400M).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${DEMO_DIR:-$(mktemp -d /tmp/vmrepo-demo.XXXXXX)}
SIZE=${DEMO_SIZE:-2G}
FILL=${DEMO_FILL:-400M}
mkdir -p "$WORK"

step() { printf '\n== %s\n' "$*"; }

step "build vmrepo (release)"
cargo build --release --quiet
VMREPO=$PWD/target/release/vmrepo

step "generate a sample VM in $WORK/ds1/web01 ($SIZE disk, $FILL of real files)"
rm -rf "$WORK/ds1" "$WORK/repo" "$WORK/expected" "$WORK/restore"
mkdir -p "$WORK/ds1"
python3 scripts/make-sample-vm.py "$WORK/ds1/web01" --name web01 --size "$SIZE" --fill "$FILL" --seed 1

step "vmrepo init"
"$VMREPO" init "$WORK/repo"

for night in 1 2 3; do
    if [ "$night" -gt 1 ]; then
        step "night $night: the guest writes in place (about 2% of used blocks)"
        python3 scripts/churn-vm.py "$WORK/ds1/web01" --percent 2 --seed "$night"
    fi
    step "night $night: vmrepo ingest"
    "$VMREPO" ingest "$WORK/repo" "$WORK/ds1/web01"
    if [ "$night" -eq 2 ]; then
        # Keep what night 2 looked like, to verify its restore later.
        mkdir -p "$WORK/expected"
        cp -a --sparse=always "$WORK/ds1/web01/." "$WORK/expected/"
    fi
done

step "vmrepo list"
"$VMREPO" list "$WORK/repo"
"$VMREPO" list "$WORK/repo" web01

step "vmrepo extract web01@-1 (night 2)"
"$VMREPO" extract "$WORK/repo" web01@-1 "$WORK/restore"

step "verify the restore against night 2"
for f in web01.vmx web01.vmxf web01.vmsd web01.nvram vmware.log web01.vmdk web01-flat.vmdk; do
    cmp "$WORK/expected/$f" "$WORK/restore/$f"
    echo "identical: $f"
done
qemu-img compare "$WORK/expected/web01.vmdk" "$WORK/restore/web01.vmdk"

step "vmrepo check --read-data"
"$VMREPO" check "$WORK/repo" --read-data

step "done: repository $(du -sh "$WORK/repo" | cut -f1) for 3 generations of a $SIZE VM ($WORK)"
