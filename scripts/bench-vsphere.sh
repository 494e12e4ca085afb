#!/usr/bin/env bash
# Agentless read speed: the same VM backed up from its datastore directory on this machine and
# through the vSphere API (HTTPS on loopback, scripts/vsphere-sim.sh), into fresh repositories,
# RUNS times each, in one run; prints the medians, their ratio, and plain HTTPS and cat rates.
# Then RUNS nightly runs with changed-block tracking (the simulator's stand-in for
# QueryChangedDiskAreas) after 2% of the disk was rewritten in 1 MiB pieces: time and bytes on
# the wire.
#
#   scripts/bench-vsphere.sh [SIZE_MIB] [RUNS]      (default 1024 MiB, 3 runs)
#
# The disk is half random (stored as is) and half compressible, so hashing, compression and
# the transfer all count. Needs `scripts/vsphere-sim.sh install` first.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}
runs=${2:-3}
cargo build --release -q
bin=target/release/vmrepo
work=$(mktemp -d "${TMPDIR:-/tmp}/vmrepo-bench-vsphere.XXXXXX")
trap 'scripts/vsphere-sim.sh stop "$work/sim" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
scripts/vsphere-sim.sh start "$work/sim" esx >/dev/null
# shellcheck disable=SC1091
. "$work/sim/env"
vm=$VSIM_DS_DIR/ha-host_VM0
python3 - "$vm" "$size" <<'PY'
import os, sys
d, mib = sys.argv[1], int(sys.argv[2])
open(f"{d}/ha-host_VM0.vmx", "w").write(
    'displayName = "ha-host_VM0"\nscsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\n'
    'scsi0:0.fileName = "disk1.vmdk"\n')
with open(f"{d}/disk1-flat.vmdk", "wb") as f:
    for i in range(mib):
        f.write(os.urandom(1 << 20) if i % 2 == 0 else bytes([i % 251]) * (1 << 20))
open(f"{d}/disk1.vmdk", "w").write(
    '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n'
    f'RW {mib * 2048} VMFS "disk1-flat.vmdk"\n')
PY
cat "$vm/disk1-flat.vmdk" >/dev/null
export VMREPO_SOURCE_PASSWORD=$VSIM_PASSWORD
seconds() { /usr/bin/time -f %e "$@" 2>&1 >/dev/null | tail -1; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
local_t=() remote_t=() curl_t=() cat_t=()
for _ in $(seq "$runs"); do
    rm -rf "$work/r1" "$work/r2"
    $bin init "$work/r1" >/dev/null
    $bin init "$work/r2" >/dev/null
    local_t+=("$(seconds $bin ingest "$work/r1" "$vm" --allow-path "$VSIM_DS_DIR")")
    remote_t+=("$(seconds $bin ingest "$work/r2" "esxi://root@$VSIM_HOST/ha-host_VM0" --tls-thumbprint "$VSIM_THUMBPRINT")")
    curl_t+=("$(seconds curl -sk -o /dev/null "https://$VSIM_HOST/folder/ha-host_VM0/disk1-flat.vmdk?dcPath=ha-datacenter&dsName=LocalDS_0")")
    cat_t+=("$(seconds cat "$vm/disk1-flat.vmdk")")
done
# Nightly runs with changed-block tracking: a first backup, then 2% of the disk rewritten in
# 1 MiB pieces at random places, the host's answer naming exactly those.
set -a
# shellcheck disable=SC1091
. "$work/sim/env"
set +a
probe=tests/fixtures/vsphere_probe.py
bytes=$((size << 20))
night_t=() night_b=()
for night in $(seq "$runs"); do
    rm -rf "$work/r3"
    $bin init "$work/r3" >/dev/null
    python3 $probe cbt ha-host_VM0 "52 00/$night-1" $bytes
    echo "{\"capacity\": $bytes, \"since\": {\"*\": [[0, $bytes]]}}" >"$VSIM_CBT_DIR/ha-host_VM0.json"
    $bin ingest "$work/r3" "esxi://root@$VSIM_HOST/ha-host_VM0" --tls-thumbprint "$VSIM_THUMBPRINT" >/dev/null 2>&1
    python3 - "$vm/disk1-flat.vmdk" "$size" "$night" "$VSIM_CBT_DIR/ha-host_VM0.json" <<'PY2'
import json, os, random, sys
path, mib, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pieces = sorted(random.Random(seed).sample(range(mib), max(1, mib * 2 // 100)))
with open(path, "r+b") as f:
    for p in pieces:
        f.seek(p << 20)
        f.write(os.urandom(1 << 20))
json.dump({"capacity": mib << 20, "since": {f"52 00/{seed}-1": [[p << 20, 1 << 20] for p in pieces]}},
          open(out, "w"))
PY2
    python3 $probe cbt ha-host_VM0 "52 00/$night-2" $bytes
    start=$(date +%s%N)
    down=$($bin ingest "$work/r3" "esxi://root@$VSIM_HOST/ha-host_VM0" --tls-thumbprint "$VSIM_THUMBPRINT" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["host_traffic"]["bytes_down"])')
    night_t+=("$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')")
    night_b+=("$down")
done
n=$(printf '%s\n' "${night_t[@]}" | median)
nb=$(printf '%s\n' "${night_b[@]}" | median)
l=$(printf '%s\n' "${local_t[@]}" | median)
r=$(printf '%s\n' "${remote_t[@]}" | median)
c=$(printf '%s\n' "${curl_t[@]}" | median)
k=$(printf '%s\n' "${cat_t[@]}" | median)
echo "disk: $size MiB, $runs runs, medians (all runs: local ${local_t[*]}; esxi ${remote_t[*]}; CBT nights ${night_t[*]})"
awk -v l="$l" -v r="$r" -v c="$c" -v k="$k" -v m="$size" 'BEGIN {
    printf "ingest from the local directory  %6.2f s  %7.0f MiB/s\n", l, m / l
    printf "ingest over the vSphere API      %6.2f s  %7.0f MiB/s  (%.0f%% of local)\n", r, m / r, 100 * l / r
    printf "curl of the flat file over HTTPS %6.2f s  %7.0f MiB/s\n", c, m / c
    printf "cat of the flat file             %6.2f s  %7.0f MiB/s\n", k, m / k
}'
awk -v n="$n" -v b="$nb" -v r="$r" -v m="$size" 'BEGIN {
    printf "nightly with CBT, 2%% changed      %6.2f s  %7.1f MiB on the wire of %d MiB  (%.1fx faster than a full read over the API)\n", n, b / 1048576, m, r / n
}'
