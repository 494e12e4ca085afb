#!/usr/bin/env bash
# Runs qemu-system-x86_64 from Debian's packages, unpacked (not installed) into a cache
# directory, so that it can sit beside the newer qemu-utils the tests use for qemu-img: installing
# Debian 12's qemu-system-x86 with apt would replace qemu-utils 10 by 7.2. Used by the boot test
# (tests/nbd_boot.rs) and by docs/RESTORE.md's instant-recovery example on such hosts.
#
# usage: scripts/qemu-system.sh [qemu-system-x86_64 arguments...]
#        QEMU_SYSTEM_CACHE=DIR (default: target/qemu-system next to this script's repository)
# needs: apt-get (downloads only; no root needed for the unpacking, apt-get download may be run
#        as any user with network access to the Debian mirrors)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${QEMU_SYSTEM_CACHE:-$here/target/qemu-system}"
root="$cache/root"
bin="$root/usr/bin/qemu-system-x86_64"

# The emulator, its firmware and data, and the shared libraries Debian 12's build links that a
# minimal machine lacks.
packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios
          libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2
          libndctl6 libdaxctl1 libnl-3-200 libnl-route-3-200)

if [ ! -x "$bin" ] || [ ! -f "$cache/.complete" ]; then
    rm -rf "$cache"
    mkdir -p "$cache/debs" "$root"
    (cd "$cache/debs" && apt-get download "${packages[@]}" >&2) || {
        echo "qemu-system.sh: cannot download ${packages[*]} with apt-get" >&2
        exit 1
    }
    for deb in "$cache"/debs/*.deb; do
        dpkg -x "$deb" "$root"
    done
    touch "$cache/.complete"
fi

export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
if [ "${1:-}" = "--version" ]; then
    exec "$bin" --version
fi
exec "$bin" -bios "$root/usr/share/seabios/bios-256k.bin" -L "$root/usr/share/qemu" "$@"
