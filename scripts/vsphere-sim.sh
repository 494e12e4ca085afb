#!/usr/bin/env bash
# A vSphere API simulator (ESXi or vCenter) on loopback for tests/vsphere.rs, built from
# govmomi's simulator library as Debian packages it.
#
#   scripts/vsphere-sim.sh install            apt-get the Go toolchain and the library, build
#   scripts/vsphere-sim.sh start DIR [esx|vpx] start one in DIR; prints DIR/env
#   scripts/vsphere-sim.sh stop DIR           stop it
#
# DIR/env holds shell assignments: VSIM_HOST (127.0.0.1:PORT), VSIM_USER, VSIM_PASSWORD,
# VSIM_THUMBPRINT (the host certificate's SHA-256 fingerprint, as `openssl x509 -noout
# -fingerprint -sha256` prints it), VSIM_CA (the CA that signed it, PEM), VSIM_DC (datacenter),
# VSIM_DS (the VMs' datastore), VSIM_DS_DIR (its directory on this machine), VSIM_DS1 and
# VSIM_DS1_DIR (a second, empty datastore), VSIM_CBT_DIR (where a test writes VMNAME.json, the
# changed areas the simulator's stand-in for QueryChangedDiskAreas answers; see main.go),
# VSIM_PID.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${VSIM_BUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/vmrepo-vsphere-sim}
bin=$build/vsphere-sim

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

install() {
    if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi ]; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            golang-go golang-github-vmware-govmomi-dev openssl
    fi
    mkdir -p "$build/gopath/src/vsphere-sim"
    if [ -x "$bin" ] && cmp -s "$here/vsphere-sim/main.go" "$build/gopath/src/vsphere-sim/main.go"; then
        return
    fi
    cp "$here/vsphere-sim/main.go" "$build/gopath/src/vsphere-sim/main.go"
    (cd "$build/gopath/src/vsphere-sim" &&
        GO111MODULE=off GOPATH="$build/gopath:/usr/share/gocode" GOCACHE="$build/gocache" \
            go build -o "$bin" .)
    echo "built $bin"
}

start() {
    local dir=$1 mode=${2:-esx}
    [ -x "$bin" ] || { echo "vsphere-sim: not built; run: $0 install" >&2; exit 1; }
    mkdir -p "$dir/tmp" "$dir/cbt"
    dir=$(cd "$dir" && pwd)
    # A CA of its own (VSIM_CA, for --tls-ca) and the host's certificate it signs (whose
    # fingerprint is VSIM_THUMBPRINT, for --tls-thumbprint), as a site CA would issue it.
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=vmrepo test CA" \
        -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
        -keyout "$dir/key.pem" -out "$dir/host.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >"$dir/host.ext"
    openssl x509 -req -in "$dir/host.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
        -CAcreateserial -days 2 -extfile "$dir/host.ext" -out "$dir/cert.pem" 2>/dev/null
    local password=vmrepo-test-$RANDOM
    TMPDIR=$dir/tmp setsid "$bin" -listen 127.0.0.1:0 -cert "$dir/cert.pem" -key "$dir/key.pem" \
        -user root -pass "$password" -mode "$mode" -cbt "$dir/cbt" >"$dir/out" 2>"$dir/log" &
    local pid=$!
    for _ in $(seq 100); do
        grep -q '^VSIM_ADDR=' "$dir/out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { echo "vsphere-sim: it died:" >&2; cat "$dir/log" >&2; exit 1; }
        sleep 0.1
    done
    local addr
    addr=$(sed -n 's/^VSIM_ADDR=//p' "$dir/out")
    [ -n "$addr" ] || { echo "vsphere-sim: no address after 10 s" >&2; kill "$pid"; exit 1; }
    local dc=ha-datacenter
    [ "$mode" = vpx ] && dc=DC0
    local ds_dir
    ds_dir=$(ls -d "$dir"/tmp/govcsim-*-LocalDS_0-* | head -1)
    local ds1_dir
    ds1_dir=$(ls -d "$dir"/tmp/govcsim-*-LocalDS_1-* | head -1)
    local fp
    fp=$(openssl x509 -noout -fingerprint -sha256 -in "$dir/cert.pem" | sed 's/.*=//')
    cat >"$dir/env" <<EOT
VSIM_HOST=$addr
VSIM_USER=root
VSIM_PASSWORD=$password
VSIM_THUMBPRINT=$fp
VSIM_CA=$dir/ca.pem
VSIM_DC=$dc
VSIM_DS=LocalDS_0
VSIM_DS_DIR=$ds_dir
VSIM_DS1=LocalDS_1
VSIM_DS1_DIR=$ds1_dir
VSIM_CBT_DIR=$dir/cbt
VSIM_PID=$pid
EOT
    echo "$dir/env"
}

stop() {
    local dir=$1 pid
    pid=$(sed -n 's/^VSIM_PID=//p' "$dir/env" 2>/dev/null || true)
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
    install) install ;;
    start) [ $# -ge 2 ] || usage 2; start "$2" "${3:-esx}" ;;
    stop) [ $# -ge 2 ] || usage 2; stop "$2" ;;
    -h|--help|help) usage ;;
    *) usage 2 ;;
esac
