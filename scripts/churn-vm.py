#!/usr/bin/env python3
"""Simulate one night of in-place guest writes on a VM made by make-sample-vm.py.

Usage:
    churn-vm.py VMDIR --percent 2 --seed N [--name NAME] [--fsck] [--no-cache]

NAME defaults to the stem of the single *.vmx file in VMDIR; the disk is
VMDIR/NAME-flat.vmdk, a raw ext4 image (no partition table).  Nothing is mounted.

One "night" does:
  * in-place overwrites of data blocks of existing regular files, about --percent %
    of the filesystem's used space (dumpe2fs: (Block count - Free blocks) * Block
    size), counting the bytes that really differ afterwards plus the new files
    below.  Mostly runs of 1-64 blocks inside a file (files picked at random,
    weighted by size, with /var/lib and /var/log as hot spots), sometimes a whole
    small file.  New content is random bytes, text-like lines, or a mix, chosen to
    resemble what the file held.  Only bytes below EOF are written, file sizes and
    all filesystem metadata stay unchanged, so `e2fsck -fn` stays clean;
  * 2-3 new small files (a few hundred KiB total) under /var/log, /var/lib/appdb,
    /var/tmp or /home, added with `debugfs -w -f CMDFILE` (`write LOCAL /path`);
  * ~50 lines appended to VMDIR/vmware.log, a few bytes of NAME.nvram changed
    (never the 4-byte "MRVN" magic).

Physical block runs come from `debugfs dump_extents -l` (leaf extents only; the
`blocks` command also lists extent-tree index blocks, which must not be
overwritten).  The file -> extents map is built with a few batched debugfs runs
(one per directory depth level, one for all files) and cached in
VMDIR/.churn-blockmap.json; it is reused while the filesystem UUID and free
block/inode counts match what the last churn left (in-place writes never move
blocks) and extended with the files each night adds.

Prints one summary line.  The same VM state + seed gives the same result.
Standard library only; needs debugfs and dumpe2fs (e2fsck with --fsck).
"""

from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import glob
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

PROG = "churn-vm"
CACHE_NAME = ".churn-blockmap.json"
CACHE_VERSION = 1


class ArgParser(argparse.ArgumentParser):
    """argparse, but bad command lines exit with status 1 like all other input errors."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """Bad input or a failing tool: reported as 'churn-vm: error: ...', exit status 1."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(
        name, path=os.pathsep.join(["/usr/sbin", "/sbin", "/usr/local/sbin"]))
    if not path:
        raise UsageError(f"required tool {name!r} not found (install e2fsprogs)")
    return path


# --------------------------------------------------------------------------- e2fsprogs

def fs_info(dumpe2fs: str, image: str) -> dict:
    res = subprocess.run([dumpe2fs, "-h", image], capture_output=True, text=True,
                         errors="replace")
    if res.returncode != 0:
        raise UsageError(f"dumpe2fs -h {image} failed: {res.stderr.strip() or res.stdout.strip()} "
                         "(is it an ext2/3/4 image made by make-sample-vm.py?)")
    kv = {}
    for line in res.stdout.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            kv[k.strip()] = v.strip()
    try:
        info = {
            "uuid": kv["Filesystem UUID"],
            "block_size": int(kv["Block size"]),
            "block_count": int(kv["Block count"]),
            "free_blocks": int(kv["Free blocks"]),
            "inode_count": int(kv["Inode count"]),
            "free_inodes": int(kv["Free inodes"]),
        }
    except (KeyError, ValueError) as e:
        raise UsageError(f"cannot parse dumpe2fs -h output for {image}: missing {e}")
    if "needs_recovery" in kv.get("Filesystem features", ""):
        raise UsageError(f"{image}: journal needs recovery (was it mounted?); run e2fsck first")
    return info


def run_debugfs(debugfs: str, image: str, cmds: list[str], write: bool = False) -> list[list[str]]:
    """Run cmds through one `debugfs -f`; return each command's stdout lines, in order."""
    if not cmds:
        return []
    with tempfile.NamedTemporaryFile("w", prefix="churn-debugfs-", suffix=".cmds",
                                     delete=False, encoding="utf-8",
                                     errors="surrogateescape") as f:
        f.write("\n".join(cmds) + "\n")
        cmdfile = f.name
    try:
        argv = [debugfs] + (["-w"] if write else []) + ["-f", cmdfile, image]
        res = subprocess.run(argv, capture_output=True)
    finally:
        os.unlink(cmdfile)
    out = res.stdout.decode("utf-8", "surrogateescape")
    if res.returncode != 0:
        raise UsageError(f"debugfs failed on {image}: "
                         f"{res.stderr.decode('utf-8', 'replace').strip()}")
    segs: list[list[str]] = []
    for line in out.split("\n"):
        if line.startswith("debugfs: "):
            segs.append([])
        elif segs:
            segs[-1].append(line)
    if len(segs) != len(cmds):
        raise UsageError(f"unexpected debugfs output ({len(segs)} replies to {len(cmds)} "
                         f"commands): {res.stderr.decode('utf-8', 'replace').strip()[:500]}")
    return segs


LS_RE = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")
EXT_RE = re.compile(r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*(.*)$")


def parse_extents(lines: list[str], size: int, bs: int) -> list[list[int]]:
    """Leaf extents [logical, physical, count], clipped to the file size, skipping unwritten."""
    nlog = (size + bs - 1) // bs
    out = []
    for line in lines:
        m = EXT_RE.match(line)
        if not m:
            continue
        lstart, lend, pstart, pend, length = (int(m.group(i)) for i in range(1, 6))
        if "Uninit" in m.group(6) or length <= 0:
            continue
        length = min(length, nlog - lstart)
        if length > 0:
            out.append([lstart, pstart, length])
    return out


def extents_for(debugfs: str, image: str, inos: list[int], sizes: list[int], bs: int):
    segs = run_debugfs(debugfs, image, [f"dump_extents -l <{i}>" for i in inos])
    return [parse_extents(seg, size, bs) for seg, size in zip(segs, sizes)]


def build_map(debugfs: str, image: str, bs: int) -> dict:
    dirs = {"/": 2}
    files: dict[int, list] = {}
    level = [(2, "/")]
    seen_dirs = {2}
    while level:
        segs = run_debugfs(debugfs, image, [f"ls -p <{ino}>" for ino, _ in level])
        nxt = []
        for (_, path), lines in zip(level, segs):
            for line in lines:
                m = LS_RE.match(line)
                if not m:
                    continue
                ino, mode, name, size = int(m.group(1)), int(m.group(2), 8), m.group(5), m.group(6)
                if ino == 0 or name in (".", ".."):
                    continue
                full = path.rstrip("/") + "/" + name
                if stat.S_ISDIR(mode):
                    if ino not in seen_dirs:
                        seen_dirs.add(ino)
                        dirs[full] = ino
                        nxt.append((ino, full))
                elif stat.S_ISREG(mode) and ino not in files:
                    files[ino] = [full, int(size or 0)]
        level = nxt
    inos = sorted(files)
    exts = extents_for(debugfs, image, inos, [files[i][1] for i in inos], bs)
    return {"dirs": dirs,
            "files": [[ino, files[ino][0], files[ino][1], ext] for ino, ext in zip(inos, exts)]}


def fs_key(info: dict) -> dict:
    return {k: info[k] for k in ("uuid", "block_size", "block_count", "inode_count",
                                 "free_blocks", "free_inodes")}


def load_cache(path: str, info: dict):
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("version") != CACHE_VERSION or data.get("fs") != fs_key(info):
        return None
    return data


def save_cache(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- content

WORDS = ("kernel systemd network service started stopped request response user session "
         "connection timeout retry backup disk volume snapshot query index table commit "
         "transaction worker queue cache miss hit latency error warning info debug client "
         "server upload download sync config reload token auth accepted failed closed open "
         "pool thread memory allocation page flush checkpoint replica primary secondary "
         "order invoice customer product price amount status pending shipped delivered").split()
PROCS = ("systemd[1]", "sshd[812]", "cron[644]", "kernel", "postgres[1022]", "nginx[903]",
         "dockerd[731]", "appsvc[1201]", "rsyslogd[600]")


class TextGen:
    """Log / CSV / JSON-lines text; every line unique (timestamps, ids, counters)."""

    def __init__(self, rng: random.Random, start: _dt.datetime):
        self.rng = rng
        self.t = start

    def make(self, n: int) -> bytes:
        rng, parts, size = self.rng, [], 0
        choices, randint, bits = rng.choices, rng.randint, rng.getrandbits
        while size < n:
            self.t += _dt.timedelta(microseconds=randint(1000, 3_000_000))
            ts = self.t.strftime("%Y-%m-%dT%H:%M:%S")
            style = rng.random()
            block = []
            for _ in range(32):
                us = randint(0, 999999)
                if style < 0.5:
                    w = choices(WORDS, k=randint(4, 12))
                    block.append(f"{ts}.{us:06d}Z vm {PROCS[us % 9]}: {' '.join(w)} "
                                 f"id={bits(32):08x} took={us % 5000}ms\n")
                elif style < 0.75:
                    w = choices(WORDS, k=3)
                    block.append(f"{bits(40)},{w[0]},{w[1]},{w[2]},{us / 7919:.4f},{ts}\n")
                else:
                    w = choices(WORDS, k=2)
                    block.append(f'{{"ts":"{ts}.{us:06d}Z","user":"u{bits(16)}","event":"{w[0]}",'
                                 f'"detail":"{w[1]}","value":{bits(24)},"ok":{str(us % 3 > 0).lower()}}}\n')
            chunk = "".join(block).encode()
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:n]


def looks_text(data: bytes) -> bool:
    sample = data[:2048]
    if not sample or b"\0" in sample:
        return False
    printable = sum(1 for c in sample if 32 <= c < 127 or c in (9, 10, 13))
    return printable >= 0.9 * len(sample)


def new_content(rng: random.Random, tg: TextGen, kind: str, n: int, bs: int) -> bytes:
    if kind == "random":
        return rng.randbytes(n)
    if kind == "text":
        return tg.make(n)
    # mixed: per block, random or text, like pages holding both
    out = []
    for off in range(0, n, bs):
        m = min(bs, n - off)
        out.append(rng.randbytes(m) if rng.random() < 0.5 else tg.make(m))
    return b"".join(out)


def diff_bytes(a: bytes, b: bytes) -> int:
    n = len(a)
    if n == 0:
        return 0
    x = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")
    return n - x.count(0)


# --------------------------------------------------------------------------- night

def add_new_files(debugfs: str, image: str, bmap: dict, rng: random.Random, tg: TextGen,
                  seed: int, bs: int) -> tuple[list[int], int]:
    dirs = bmap["dirs"]
    paths = {f[1] for f in bmap["files"]}
    targets = [d for d in ("/var/log", "/var/log/app", "/var/lib/appdb", "/var/tmp", "/home")
               if d in dirs] or ["/"]
    kinds = [("log", "text"), ("json", "text"), ("bin", "random"), ("csv", "text")]
    specs = []
    for i in range(rng.randint(2, 3)):
        ext, kind = rng.choice(kinds)
        d = rng.choice(targets)
        stem = rng.choice(["export", "session", "report", "upload", "cache", "audit"])
        base = f"{d.rstrip('/')}/{stem}-s{seed}-{i}"
        path, k = f"{base}.{ext}", 1
        while path in paths:
            path, k = f"{base}-{k}.{ext}", k + 1
        paths.add(path)
        size = rng.randint(40, 160) * 1024 + rng.randint(0, 4095)
        specs.append((path, new_content(rng, tg, kind, size, bs)))
    tmpdir = tempfile.mkdtemp(prefix="churn-new-")
    try:
        cmds = []
        for j, (path, data) in enumerate(specs):
            local = os.path.join(tmpdir, f"f{j}")
            with open(local, "wb") as f:
                f.write(data)
            cmds.append(f'write "{local}" "{path}"')
        segs = run_debugfs(debugfs, image, cmds, write=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    added, nbytes = [], 0
    for (path, data), lines in zip(specs, segs):
        m = next((re.search(r"Allocated inode: (\d+)", l) for l in lines
                  if "Allocated inode" in l), None)
        if not m:
            raise UsageError(f"debugfs write of {path} failed: {' '.join(lines).strip()}")
        added.append((int(m.group(1)), path, len(data)))
        nbytes += len(data)
    exts = extents_for(debugfs, image, [a[0] for a in added], [a[2] for a in added], bs)
    for (ino, path, size), ext in zip(added, exts):
        bmap["files"].append([ino, path, size, ext])
    return [a[0] for a in added], nbytes


def churn_inplace(image: str, bmap: dict, rng: random.Random, tg: TextGen, target: int,
                  bs: int, exclude: set[int]) -> dict:
    # files added tonight are excluded: their bytes are already counted as new data
    files = [f for f in bmap["files"] if f[3] and f[0] not in exclude]
    stats = {"diff": 0, "written": 0, "runs": 0, "files": 0, "whole": 0}
    if not files or target <= 0:
        return stats
    weights, acc = [], 0
    for f in files:
        acc += sum(e[2] for e in f[3])
        weights.append(acc)
    total_blocks = acc
    hot = [i for i, f in enumerate(files) if f[1].startswith(("/var/lib/", "/var/log/"))]
    hot_w, acc = [], 0
    for i in hot:
        acc += sum(e[2] for e in files[i][3])
        hot_w.append(acc)
    touched: set[int] = set()
    touched_files: set[int] = set()
    fd = os.open(image, os.O_RDWR)
    try:
        attempts = 0
        while stats["diff"] < target and attempts < 200000:
            attempts += 1
            if len(touched) >= total_blocks * 0.9:
                break
            r = rng.random()
            if hot and r < 0.15:
                fi = hot[bisect.bisect_right(hot_w, rng.randrange(hot_w[-1]))]
            elif r < 0.35:
                fi = rng.randrange(len(files))
            else:
                fi = bisect.bisect_right(weights, rng.randrange(total_blocks))
            ino, path, size, ext = files[fi]
            nlog = (size + bs - 1) // bs
            remaining_blocks = max(1, -(-(target - stats["diff"]) // int(bs * 0.97)))
            whole = nlog <= 16 and (r >= 0.15 and r < 0.35 or nlog <= 2)
            if whole:
                lstart, count = 0, nlog
            else:
                count = min(nlog, 1 + int(63 * rng.random() ** 2.5), remaining_blocks)
                lstart = rng.randrange(nlog - count + 1)
            lend = lstart + count
            pieces = []  # (logical, physical, n) inside [lstart, lend)
            for l0, p0, n in ext:
                lo, hi = max(l0, lstart), min(l0 + n, lend)
                if lo < hi:
                    pieces.append((lo, p0 + (lo - l0), hi - lo))
            if not pieces or any(p + k in touched for _, p, n in pieces for k in range(n)):
                continue
            first_old = os.pread(fd, min(2048, bs), pieces[0][1] * bs)
            k = rng.random()
            if looks_text(first_old):
                kind = "text" if k < 0.85 else "mixed"
            else:
                kind = "random" if k < 0.7 else ("mixed" if k < 0.9 else "text")
            for l, p, n in pieces:
                nbytes = min(n * bs, size - l * bs)  # never write past EOF
                if nbytes <= 0:
                    continue
                off = p * bs
                old = os.pread(fd, nbytes, off)
                new = new_content(rng, tg, kind, nbytes, bs)
                os.pwrite(fd, new, off)
                stats["diff"] += diff_bytes(old, new)
                stats["written"] += nbytes
                touched.update(range(p, p + n))
            stats["runs"] += 1
            stats["whole"] += whole
            touched_files.add(ino)
        os.fsync(fd)
    finally:
        os.close(fd)
    stats["files"] = len(touched_files)
    return stats


LOGTS_RE = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?Z")


def append_log(path: str, name: str, rng: random.Random, seed: int) -> int:
    last = None
    if os.path.exists(path):
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            tail = f.read()
        for m in LOGTS_RE.finditer(tail):
            last = m.group(1)
    if last:
        t = _dt.datetime.strptime(last.decode(), "%Y-%m-%dT%H:%M:%S")
    else:
        t = _dt.datetime(2024, 1, 1) + _dt.timedelta(days=seed % 365)
    t += _dt.timedelta(hours=rng.randint(20, 27), seconds=rng.randint(0, 3599))
    msgs = [
        "vmx - Tools: Tools heartbeat timeout.",
        "vmx - GuestRpc: Got RPCI vsocket connection {n}, assigned to channel {c}.",
        "vmx - GuestRpc: Channel {c} reinitialized.",
        "vcpu-{c} - Guest: vmsvc: [vmsvc] Backup job {hex} started",
        "vmx - VigorTransportProcessClientPayload: opID={hex} seq={n}: Receiving "
        "PowerState.InitiateQuiesce request.",
        "vmx - ToolsBackup: changing quiesce state: IDLE -> STARTED",
        "vmx - ToolsBackup: changing quiesce state: STARTED -> COMMITTED",
        "vmx - ToolsBackup: changing quiesce state: COMMITTED -> IDLE",
        "vmx - HBACommon: First write on scsi0:0.fileName='/vmfs/volumes/ds1/{name}/{name}.vmdk'",
        "vmx - DDB: \"longContentID\" = \"{hex32}\" (was \"{hex32b}\")",
        "vmx - Balloon: Guest target {n} pages, current {c} pages",
        "mks - SWBScreen: Screen 0 Defined: xywh(0, 0, 1280, 800) flags=0x3",
        "vmx - Vix: [guestCommands.c:{n}]: VMAutomationTranslateGuestRequest: opcode=82",
    ]
    lines = []
    for _ in range(rng.randint(45, 55)):
        t += _dt.timedelta(microseconds=rng.randint(1000, 90_000_000))
        level = "Wa(03)" if rng.random() < 0.05 else "In(05)"
        msg = rng.choice(msgs).format(n=rng.randint(1, 99999), c=rng.randint(0, 7), name=name,
                                      hex=f"{rng.getrandbits(32):08x}",
                                      hex32=f"{rng.getrandbits(128):032x}",
                                      hex32b=f"{rng.getrandbits(128):032x}")
        lines.append(f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z {level} {msg}\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
    return len(lines)


def poke_nvram(path: str, rng: random.Random) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        if len(data) <= 4:
            return 0
        changed = 0
        for _ in range(rng.randint(4, 12)):
            off = rng.randrange(4, len(data))
            new = rng.randrange(256)
            if new == data[off]:
                new ^= 0xFF
            data[off] = new
            changed += 1
        f.seek(0)
        f.write(data)
    return changed


# --------------------------------------------------------------------------- main

def run(args) -> None:
    t0 = time.monotonic()
    vmdir = os.path.abspath(args.vmdir)
    if not os.path.isdir(vmdir):
        raise UsageError(f"VMDIR {vmdir} is not a directory")
    if not (0 <= args.percent <= 50):
        raise UsageError(f"--percent must be between 0 and 50 (got {args.percent})")
    name = args.name
    if name is None:
        vmxs = sorted(glob.glob(os.path.join(glob.escape(vmdir), "*.vmx")))
        if len(vmxs) != 1:
            raise UsageError(f"found {len(vmxs)} .vmx files in {vmdir}; pass --name NAME")
        name = os.path.basename(vmxs[0])[:-4]
    image = os.path.join(vmdir, f"{name}-flat.vmdk")
    if not os.path.isfile(image):
        raise UsageError(f"disk image {image} not found")
    debugfs, dumpe2fs = find_tool("debugfs"), find_tool("dumpe2fs")
    e2fsck = find_tool("e2fsck") if args.fsck else None

    info = fs_info(dumpe2fs, image)
    bs = info["block_size"]
    used = (info["block_count"] - info["free_blocks"]) * bs
    target = int(used * args.percent / 100)

    cache_path = os.path.join(vmdir, CACHE_NAME)
    bmap = None if args.no_cache else load_cache(cache_path, info)
    cache_state = "cached map"
    if bmap is None:
        bmap = build_map(debugfs, image, bs)
        cache_state = "built map"
    nfiles = len(bmap["files"])

    rng = random.Random(f"churn-vm:{args.seed}")
    tg = TextGen(random.Random(rng.getrandbits(64)),
                 _dt.datetime(2024, 6, 1) + _dt.timedelta(days=args.seed % 1000))

    new_inos, new_bytes = add_new_files(debugfs, image, bmap, rng, tg, args.seed, bs)
    n_new = len(new_inos)
    st = churn_inplace(image, bmap, rng, tg, max(0, target - new_bytes), bs, set(new_inos))
    log_lines = append_log(os.path.join(vmdir, "vmware.log"), name, rng, args.seed)
    nv = poke_nvram(os.path.join(vmdir, f"{name}.nvram"), rng)

    after = fs_info(dumpe2fs, image)
    bmap.update(version=CACHE_VERSION, image=os.path.basename(image), fs=fs_key(after))
    save_cache(cache_path, bmap)

    fsck_note = ""
    if e2fsck:
        res = subprocess.run([e2fsck, "-fn", image], capture_output=True, text=True)
        if res.returncode != 0:
            raise UsageError(f"e2fsck -fn {image} is not clean (exit {res.returncode}):\n"
                             f"{res.stdout}{res.stderr}")
        fsck_note = ", e2fsck clean"

    changed = st["diff"] + new_bytes
    pct = 100.0 * changed / used if used else 0.0
    print(f"{PROG}: {name} seed {args.seed}: changed {changed} bytes ({human(changed)}, "
          f"{pct:.2f}% of {human(used)} used): in-place {st['diff']} bytes differ "
          f"({st['written']} written) in {st['runs']} runs over {st['files']} files "
          f"({st['whole']} whole) + {n_new} new files {new_bytes} bytes; vmware.log +{log_lines} "
          f"lines, nvram {nv} bytes; {cache_state} of {nfiles} files{fsck_note}; "
          f"{time.monotonic() - t0:.1f}s")


def main(argv=None) -> int:
    ap = ArgParser(
        prog="churn-vm.py",
        description="Simulate one night of in-place guest writes on a VM directory made by "
                    "make-sample-vm.py (ext4 flat image; nothing is mounted).",
        epilog="example: churn-vm.py /tmp/vm1 --percent 2 --seed 1")
    ap.add_argument("vmdir", metavar="VMDIR", help="VM directory (holds NAME.vmx, NAME-flat.vmdk)")
    ap.add_argument("--percent", type=float, required=True,
                    help="percent of the used filesystem space to change (e.g. 2)")
    ap.add_argument("--seed", type=int, required=True, help="seed for this night's changes")
    ap.add_argument("--name", help="VM name (default: stem of the single .vmx in VMDIR)")
    ap.add_argument("--fsck", action="store_true",
                    help="run e2fsck -fn afterwards and fail unless it is clean")
    ap.add_argument("--no-cache", action="store_true",
                    help=f"ignore VMDIR/{CACHE_NAME} and rebuild the block map")
    args = ap.parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
