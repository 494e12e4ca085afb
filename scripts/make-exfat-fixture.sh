#!/usr/bin/env bash
# Makes tests/fixtures/exfat.img: a 4 MiB exFAT volume written by the real tools (mkfs.exfat
# from exfatprogs, files through the exfat-fuse driver on a loop device), read by
# tests/guest_files.rs and the mutation test. Needs root, a free loop device and FUSE:
#   apt-get install -y exfatprogs exfat-fuse && sudo scripts/make-exfat-fixture.sh
# The contents are what the test expects; change both together.
set -euo pipefail
out=${1:-tests/fixtures/exfat.img}
work=$(mktemp -d)
dev=
cleanup() {
    mountpoint -q "$work/mnt" && umount "$work/mnt"
    [ -n "$dev" ] && losetup -d "$dev"
    rm -rf "$work"
}
trap cleanup EXIT
truncate -s 4M "$work/exfat.img"
mkfs.exfat -L CAMERA "$work/exfat.img" >/dev/null
dev=$(losetup -f --show "$work/exfat.img")
mkdir "$work/mnt"
mount.exfat-fuse "$dev" "$work/mnt" 2>/dev/null
m=$work/mnt
mkdir -p "$m/Docs/Sub" "$m/DCIM/100CAMERA"
printf 'hello from exFAT\n' >"$m/Docs/hello.txt"
seq 1 20000 >"$m/Docs/Sub/numbers.txt"
# 120 names of three entries each: a directory longer than one 4 KiB cluster.
for i in $(seq 1 120); do
    printf 'photo %d\n' "$i" >"$m/DCIM/100CAMERA/IMG_$(printf %04d "$i").JPG"
done
printf 'ünïcödé\n' >"$m/Docs/A rather long file name – ünïcödé.txt"
# Two files grown in turns, so that their clusters interleave (FAT chains, not contiguous).
for i in $(seq 0 39); do
    head -c 4096 /dev/zero | tr '\0' "$(printf "\\$(printf %o $((97 + i % 26)))")" >>"$m/a.bin"
    head -c 4096 /dev/zero | tr '\0' "$(printf "\\$(printf %o $((65 + i % 26)))")" >>"$m/b.bin"
done
: >"$m/empty"
umount "$m"
losetup -d "$dev"
dev=
fsck.exfat -n "$work/exfat.img" >/dev/null
cp "$work/exfat.img" "$out"
echo "wrote $out"
