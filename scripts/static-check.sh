#!/usr/bin/env bash
# Builds vmrepo linked statically (glibc with crt-static) and runs it in an empty chroot that
# holds only that binary and busybox: no shared libraries, no /proc, no /dev. That is how a
# ghettoVCB-style tool runs on a host without the libraries of a Linux distribution. In the
# chroot: init, ingest of a sparse disk image made there, a second night, extract, byte
# comparison with busybox cmp, check --read-data.
# usage: scripts/static-check.sh      (as root: chroot)
# needs: busybox-static (apt-get install -y busybox-static), readelf (binutils)
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
# getrandom finds glibc's getrandom() through dlsym, which a static binary cannot do, and then
# falls back to /dev/urandom, which an empty chroot lacks: ask for the system call itself.
RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
    cargo build --release --target "$target"
bin=target/$target/release/vmrepo
if readelf -d "$bin" | grep -q NEEDED; then
    echo "static-check: $bin still needs shared libraries:" >&2
    readelf -d "$bin" | grep NEEDED >&2
    exit 1
fi
busybox=$(command -v busybox) || { echo "static-check: busybox missing (apt-get install -y busybox-static)" >&2; exit 1; }
if readelf -d "$busybox" | grep -q NEEDED; then
    echo "static-check: $busybox is not static (apt-get install -y busybox-static)" >&2
    exit 1
fi
root=$(mktemp -d "${TMPDIR:-/tmp}/vmrepo-static.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp"
cp "$bin" "$root/bin/vmrepo"
cp "$busybox" "$root/bin/busybox"
ls -la "$root" "$root/bin"
chroot "$root" /bin/busybox sh -euc '
    /bin/busybox --install -s /bin
    export PATH=/bin
    cd /tmp
    vmrepo --version
    # A 64 MiB sparse disk holding two stretches of text.
    truncate -s 64M disk.img
    seq 1 300000 | dd of=disk.img conv=notrunc bs=65536
    seq 500000 700000 | dd of=disk.img conv=notrunc bs=65536 seek=512
    vmrepo init repo
    vmrepo ingest repo disk.img --name web01
    seq 900000 901000 | dd of=disk.img conv=notrunc bs=4096 seek=100
    vmrepo ingest repo disk.img --name web01
    vmrepo list repo web01
    vmrepo extract repo web01 out
    cmp out/disk.img disk.img
    vmrepo extract repo web01@-1 first
    test "$(wc -c < first/disk.img)" = 67108864
    vmrepo check repo --read-data
    echo "static-check: the static build backs up and restores in an empty chroot"
'
