#!/usr/bin/env bash
# Builds a large repository synthetically and measures time and peak memory of every command on
# it at growing sizes, so that growth with the repository shows.
#
# The data: VMs of 112 MiB disks whose every 4 KiB block is unique (a tag and a counter, then
# zeros), so each generation brings 108 MiB of unique data that compresses to about 1 MB. The
# repository is made with --chunk-max 16: every chunk is exactly 16 KiB, the default average,
# so 1 TiB of unique data is 2^26 chunks, as a real 1 TiB would be. Generations go round-robin
# over --vms VMs, one night apart; one 4 MiB segment of each VM's disk stays the same every night.
#
# At each size (GiB of unique data) it runs and measures: ingest of one more generation, list,
# stats, extract of one generation, a mount of the whole repository with one disk read through
# it, check, check --read-data, check --rebuild-index, prune (the oldest night of one VM) and gc.
# Peak RSS is the process's maximum resident set (wait4 for commands, VmHWM for the mount).
#
# usage: scripts/scale-sim.sh [--sizes "64 256 1024"] [--vms 100] [--work DIR] [--out FILE]
#                             [--only-build] [--skip CMD,CMD]
# CMD: ingest list stats extract mount check read-data rebuild prune gc. A run continues from
# the repository and state file a former run left in WORK. The work directory needs about 18 GB
# per TiB simulated, and a few GB more while gc and stats run (their temporary sets); the
# results are appended to --out (default WORK/results.md) as a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="64 256 1024" VMS=100 WORK=/var/tmp/vmrepo-scale OUT="" ONLY_BUILD=0 SKIP=""
while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES=$2; shift 2 ;;
        --vms) VMS=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --only-build) ONLY_BUILD=1; shift ;;
        --skip) SKIP=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "scale-sim: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || OUT=$WORK/results.md
VMREPO=${VMREPO:-target/release/vmrepo}
[ -x "$VMREPO" ] || cargo build --release --quiet
mkdir -p "$WORK"
exec python3 - "$VMREPO" "$WORK" "$OUT" "$VMS" "$ONLY_BUILD" "$SKIP" $SIZES <<'PY'
import json, os, struct, subprocess, sys, time, shutil, datetime

vmrepo, work, out, vms, only_build, skip = sys.argv[1:7]
vmrepo = os.path.abspath(vmrepo)
vms, only_build = int(vms), only_build == "1"
skip = set(s for s in skip.split(",") if s)
sizes = [int(s) for s in sys.argv[7:]]
repo = os.path.join(work, "repo")
state_file = os.path.join(work, "state.json")
SEG = 4 << 20
SHARED, NEW = 1, 27                       # segments per disk: same every night, new each night
NEW_BYTES = NEW * SEG
scratch = "/dev/shm" if os.path.isdir("/dev/shm") else work

def disk(vm, night, path):
    """Writes VM's disk of that night: every 4 KiB block unique to (vm, night, block)."""
    buf = bytearray(SEG)
    with open(path, "wb") as f:
        for s in range(SHARED + NEW):
            n = 0 if s < SHARED else night
            for b in range(0, SEG, 4096):
                struct.pack_into("<16sIII", buf, b, b"vmrepo-scale-sim", vm, n, s * 1024 + b // 4096)
            f.write(buf)

def when(g):
    base = datetime.datetime(2020, 1, 1, 1, 0, tzinfo=datetime.timezone.utc)
    night, vm = divmod(g, vms)
    t = base + datetime.timedelta(days=night, minutes=vm)
    return night + 1, vm, t.strftime("%Y-%m-%dT%H:%M:%SZ")

def run(argv, done_if=None, **kw):
    """Runs argv; returns (seconds, peak RSS in MiB, stdout). A failure whose message holds
    done_if counts as done (a run killed after its ingest but before the state file)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    stdout = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    secs = time.monotonic() - t0
    if p.returncode != 0 and not (done_if and done_if in err.decode(errors="replace")):
        sys.exit(f"scale-sim: {' '.join(argv)} failed ({p.returncode}):\n{err.decode(errors='replace')}")
    return secs, ru.ru_maxrss / 1024, stdout

state = json.load(open(state_file)) if os.path.exists(state_file) else {"gens": 0}
if not os.path.exists(repo):
    subprocess.run([vmrepo, "init", repo, "--chunk-max", "16"], check=True, stdout=subprocess.DEVNULL)
    state = {"gens": 0}

def ingest_one(g, path):
    night, vm, t = when(g)
    disk(vm, night, path)
    r = run([vmrepo, "ingest", repo, path, "--name", f"sim{vm:03d}", "--time", t], done_if="already has a generation at")
    state["gens"] = g + 1
    json.dump(state, open(state_file, "w"))
    return r

if not os.path.exists(out):
    with open(out, "w") as f:
        f.write("| unique data | generations | objects | command | seconds | peak RSS MiB |\n|---|---|---|---|---|---|\n")

def index_counts():
    """Objects and generations the index lists."""
    import sqlite3
    db = sqlite3.connect(f"file:{repo}/index.sqlite?mode=ro", uri=True)
    try:
        return tuple(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("all_objects", "generations"))
    finally:
        db.close()

def record(size, what, secs, rss):
    objects, gens = index_counts()
    line = f"| {size} GiB | {gens} | {objects} | {what} | {secs:.2f} | {rss:.0f} |"
    print(line, flush=True)
    with open(out, "a") as f:
        f.write(line + "\n")

img = os.path.join(scratch, "vmrepo-scale-disk.img")
for size in sizes:
    target = -(-size * (1 << 30) // NEW_BYTES)   # generations holding `size` GiB of new data
    t0 = time.monotonic()
    start = state["gens"]
    while state["gens"] < target:
        ingest_one(state["gens"], img)
        done = state["gens"] - start
        if done % 100 == 0:
            rate = done * NEW_BYTES / (time.monotonic() - t0) / 1e6
            print(f"scale-sim: {state['gens']}/{target} generations, {rate:.0f} MB/s", file=sys.stderr, flush=True)
    if only_build:
        continue
    def want(name):
        return name not in skip
    if want("ingest"):
        s, m, _ = ingest_one(state["gens"], img)
        record(size, "ingest (one more generation, 112 MiB)", s, m)
    if want("list"):
        s, m, _ = run([vmrepo, "list", repo])
        record(size, "list", s, m)
    if want("stats"):
        s, m, _ = run([vmrepo, "stats", repo])
        record(size, "stats", s, m)
    night, vm, t = when(state["gens"] - 1)
    gen = f"sim{vm:03d}@{t}"
    if want("extract"):
        dest = os.path.join(scratch, "vmrepo-scale-extract")
        shutil.rmtree(dest, ignore_errors=True)
        s, m, _ = run([vmrepo, "extract", repo, gen, dest])
        shutil.rmtree(dest, ignore_errors=True)
        record(size, "extract (one generation)", s, m)
    if want("mount"):
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt, exist_ok=True)
        t0 = time.monotonic()
        p = subprocess.Popen([vmrepo, "mount", repo, mnt], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        gen_dir = os.path.join(mnt, f"sim{vm:03d}", "latest")
        for _ in range(600):
            if os.path.isdir(gen_dir):
                break
            if p.poll() is not None:
                sys.exit("scale-sim: mount failed: " + p.stderr.read().decode(errors="replace"))
            time.sleep(0.1)
        n = 0
        for name in sorted(os.listdir(gen_dir)):
            path = os.path.join(gen_dir, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    while True:
                        b = f.read(1 << 20)
                        if not b:
                            break
                        n += len(b)
        hwm = [l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM:")][0]
        rss = int(hwm.split()[1]) / 1024
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        p.wait()
        record(size, f"mount, read one generation ({n >> 20} MiB)", time.monotonic() - t0, rss)
    if want("check"):
        s, m, _ = run([vmrepo, "check", repo])
        record(size, "check", s, m)
    if want("read-data"):
        s, m, _ = run([vmrepo, "check", repo, "--read-data"])
        record(size, "check --read-data", s, m)
    if want("rebuild"):
        s, m, _ = run([vmrepo, "check", repo, "--rebuild-index"])
        record(size, "check --rebuild-index", s, m)
    if want("prune"):
        import sqlite3
        db = sqlite3.connect(f"file:{repo}/index.sqlite?mode=ro", uri=True)
        nights = db.execute("SELECT count(*) FROM generations g JOIN vms v ON v.id = g.vm "
                            "WHERE v.name = 'sim000'").fetchone()[0]
        db.close()
        s, m, _ = run([vmrepo, "prune", repo, "sim000", "--keep-last", str(max(1, nights - 1))])
        record(size, "prune (the oldest night of one VM)", s, m)
    if want("gc"):
        s, m, _ = run([vmrepo, "gc", repo])
        record(size, "gc", s, m)
PY
