#!/usr/bin/env bash
# Generates what the Debian package ships besides the binary: the man pages and the bash
# completion, from the release build itself (so they match its --help). Then:
#   cargo deb --no-build        -> target/debian/vmrepo_VERSION_ARCH.deb
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/vmrepo
[ -x "$bin" ] || { echo "package-assets: build first: cargo build --release" >&2; exit 1; }
out=target/package-assets
rm -rf "$out"
mkdir -p "$out"
"$bin" man "$out/man1" >/dev/null
gzip -9n "$out"/man1/*.1
"$bin" completions bash >"$out/vmrepo.bash"
echo "package-assets: $(ls "$out/man1" | wc -l) man pages and the bash completion in $out"
