#!/usr/bin/env python3
"""Create a realistic VMware-style (ESXi) sample VM directory for vmrepo tests.

Usage:
    make-sample-vm.py OUTDIR --name NAME --size 4G --fill 1G [--seed N]
                      [--source-dirs /usr/share,/usr/lib] [--layout vmfs|monolithicFlat]
                      [--hardlink]

What it builds in OUTDIR (which must not exist, or be an empty directory):

    NAME.vmx          ESXi-style configuration (scsi0:0 disk, ide1:0 ISO cdrom,
                      ethernet0, annotation with |0A and |22 escapes, ...)
    NAME.vmdk         text descriptor; createType "vmfs" (extent type VMFS) or
                      "monolithicFlat" (extent type FLAT ... 0)
    NAME-flat.vmdk    raw disk of exactly --size bytes (sparse) holding an ext4
                      filesystem made with `mkfs.ext4 -d STAGING` (no mount, no root)
    NAME.nvram        8 KiB, starts with b"MRVN"
    NAME.vmsd         empty snapshot dictionary
    NAME.vmxf         small XML-ish team/foundry file
    vmware.log        a few hundred lines of plausible ESXi log text

The filesystem is populated from a staging directory (a temporary directory next
to OUTDIR, removed afterwards) holding about --fill bytes: regular files copied
from --source-dirs (sorted walk, seeded starting point and seeded per-directory
subset, relative paths preserved, e.g. usr/share/doc/...), plus generated files:
a database-like file of ~2% of --fill random bytes (/var/lib/appdb/app.db), log
files under /var/log and a few /etc files.  With --hardlink the real files are
hard-linked into the staging directory instead of copied (much faster; the source
files are only read, but link() bumps their ctime).

Everything that is generated (UUIDs, CID, nvram, logs, the file subset, the ext4
UUID/hash seed/timestamps) is derived from --seed; with the same host files the
result is reproducible.  Sizes accept K, M, G, T suffixes (binary, e.g. 512M).

Requires mkfs.ext4 from e2fsprogs >= 1.43 (for -d).  Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile

BLOCK = 4096
PROG = "make-sample-vm"


class ArgParser(argparse.ArgumentParser):
    """argparse, but bad command lines exit with status 1 like all other input errors."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """Bad input: reported as 'make-sample-vm: error: ...' with exit status 1."""


# --------------------------------------------------------------------------- helpers

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise UsageError(f"invalid size {text!r} (expected e.g. 4096, 512M, 4G, 1.5G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


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


def hexbytes(rng: random.Random, n: int) -> list[str]:
    return [f"{b:02x}" for b in rng.randbytes(n)]


def vmware_uuid(prefix: list[str], rng: random.Random) -> str:
    """16-byte UUID in VMware notation: 'aa bb cc dd ee ff 00 11-22 33 ...'."""
    b = prefix + hexbytes(rng, 16 - len(prefix))
    return " ".join(b[:8]) + "-" + " ".join(b[8:])


def rfc_uuid(rng: random.Random) -> str:
    h = rng.randbytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


# --------------------------------------------------------------------------- staging

def walk_sources(source_dirs: list[str], exclude: list[str]) -> list[tuple[str, str, int]]:
    """Sorted walk; returns (abs_path, parent_dir, size) for regular, readable files."""
    out: list[tuple[str, str, int]] = []
    excl = [os.path.realpath(e) for e in exclude]
    for top in source_dirs:
        if not os.path.isdir(top):
            raise UsageError(f"source dir {top!r} does not exist or is not a directory")
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            real = os.path.realpath(dirpath)
            if any(real == e or real.startswith(e + os.sep) for e in excl):
                dirnames[:] = []
                continue
            dirnames.sort()
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):  # skips symlinks, sockets, fifos, devices
                    continue
                if not os.access(p, os.R_OK):
                    continue
                out.append((p, dirpath, st.st_size))
    return out


def choose_files(files: list[tuple[str, str, int]], budget: int, rng: random.Random):
    """Seeded start index + seeded per-directory subset, in sorted order, until budget."""
    if not files or budget <= 0:
        return [], 0
    n = len(files)
    start = rng.randrange(n)
    max_one = max(budget // 10, 1 << 20)  # no single file eats more than ~10% of the fill
    dir_take: dict[str, bool] = {}
    chosen: list[int] = []
    taken = set()
    total = 0
    for pass_no in (0, 1):  # pass 0: ~60% of directories; pass 1: anything left
        for k in range(n):
            i = (start + k) % n
            if i in taken:
                continue
            path, parent, size = files[i]
            if pass_no == 0:
                if parent not in dir_take:
                    dir_take[parent] = rng.random() < 0.6
                if not dir_take[parent]:
                    continue
            remaining = budget - total
            if remaining < 16 * 1024:
                return chosen, total
            if size > max_one or size > remaining:
                continue
            chosen.append(i)
            taken.add(i)
            total += size
    return chosen, total


def copy_into_staging(files, chosen, staging: str, hardlink: bool) -> tuple[int, int]:
    """Copy the chosen files into staging; with hardlink, hard-link them when possible
    (mkfs.ext4 -d only reads them; saves writing --fill bytes twice), else copy."""
    copied = count = 0
    made_dirs = set()
    can_link = hardlink
    for i in sorted(chosen):
        src, parent, _ = files[i]
        rel = os.path.relpath(src, "/")
        dst = os.path.join(staging, rel)
        ddir = os.path.dirname(dst)
        if ddir not in made_dirs:
            os.makedirs(ddir, exist_ok=True)
            made_dirs.add(ddir)
        if os.path.lexists(dst):  # e.g. a generated /var/log file of the same name
            continue
        try:
            linked = False
            if can_link:
                try:
                    os.link(src, dst, follow_symlinks=False)
                    linked = True
                except OSError:  # EXDEV, EPERM (protected_hardlinks), ...
                    can_link = False
            if not linked:
                shutil.copy2(src, dst, follow_symlinks=False)
        except OSError:
            try:
                os.unlink(dst)
            except OSError:
                pass
            continue
        copied += os.path.getsize(dst)
        count += 1
    return copied, count


WORDS = ("kernel systemd network service started stopped request response user session "
         "connection timeout retry backup disk volume snapshot query index table commit "
         "transaction worker queue cache miss hit latency error warning info debug client "
         "server upload download sync config reload token auth accepted failed closed open "
         "pool thread memory allocation page flush checkpoint replica primary secondary").split()


def log_lines(rng: random.Random, start: _dt.datetime, n: int, host: str) -> list[str]:
    procs = ["systemd[1]", "sshd[812]", "cron[644]", "kernel", "postgres[1022]", "nginx[903]",
             "dockerd[731]", "appsvc[1201]", "rsyslogd[600]"]
    t = start
    lines = []
    for _ in range(n):
        t += _dt.timedelta(seconds=rng.randint(0, 90), microseconds=rng.randint(0, 999999))
        proc = rng.choice(procs)
        msg = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        extra = rng.choice(["", f" id={rng.getrandbits(32):08x}", f" took {rng.randint(1, 9999)}ms",
                            f" from 10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                            f" pid={rng.randint(100, 65000)}"])
        lines.append(f"{t:%b %d %H:%M:%S} {host} {proc}: {msg}{extra}")
    return lines


def generate_files(staging: str, fill: int, rng: random.Random, name: str,
                   base: _dt.datetime) -> tuple[int, list[str]]:
    """Write the generated files; return (bytes, list of their paths)."""
    total = 0
    # database-like file: ~2% of fill, 8 KiB pages with a small header, random payload
    db_size = max(64 * 1024, (fill * 2 // 100) // 8192 * 8192)
    dbdir = os.path.join(staging, "var", "lib", "appdb")
    os.makedirs(dbdir, exist_ok=True)
    page = 8192
    with open(os.path.join(dbdir, "app.db"), "wb") as f:
        for pno in range(db_size // page):
            hdr = b"PGv1" + pno.to_bytes(4, "little") + rng.getrandbits(32).to_bytes(4, "little")
            f.write(hdr + rng.randbytes(page - len(hdr)))
    total += db_size
    write_text(os.path.join(dbdir, "app.db-wal"), "")
    # log-like text files (~1% of fill, at least a few hundred KiB together)
    logdir = os.path.join(staging, "var", "log")
    os.makedirs(os.path.join(logdir, "app"), exist_ok=True)
    log_budget = max(256 * 1024, fill // 100)
    logs = {"syslog": 0.4, "auth.log": 0.1, "kern.log": 0.15, "app/app.log": 0.3, "dpkg.log": 0.05}
    for rel, share in logs.items():
        want = int(log_budget * share)
        chunks, size = [], 0
        t = base - _dt.timedelta(days=7)
        while size < want:
            lines = log_lines(rng, t, 500, name)
            t += _dt.timedelta(hours=6)
            text = "\n".join(lines) + "\n"
            chunks.append(text)
            size += len(text)
        data = "".join(chunks)[:want]
        data = data[: data.rfind("\n") + 1] if "\n" in data else data
        write_text(os.path.join(logdir, rel), data)
        total += len(data.encode())
    etc = os.path.join(staging, "etc")
    os.makedirs(etc, exist_ok=True)
    write_text(os.path.join(etc, "hostname"), name + "\n")
    write_text(os.path.join(etc, "hosts"),
               f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}.example.internal\t{name}\n")
    write_text(os.path.join(etc, "fstab"),
               "# <file system> <mount point> <type> <options> <dump> <pass>\n"
               f"UUID={rfc_uuid(rng)} / ext4 errors=remount-ro 0 1\n")
    os.makedirs(os.path.join(staging, "var", "tmp"), exist_ok=True)
    os.makedirs(os.path.join(staging, "home"), exist_ok=True)
    paths = []
    for dirpath, _, filenames in os.walk(staging):
        paths += [os.path.join(dirpath, fn) for fn in filenames]
    return total, paths


def normalize_times(staging: str, generated: list[str], epoch: int) -> None:
    """Give generated files and all staging directories a fixed timestamp (reproducible
    image).  Never touches copied/linked files: a hard link shares the source's inode."""
    for p in generated:
        os.utime(p, (epoch, epoch), follow_symlinks=False)
    for dirpath, dirnames, _ in os.walk(staging, topdown=False):
        os.utime(dirpath, (epoch, epoch))


def count_entries(staging: str) -> int:
    n = 0
    for _, dirnames, filenames in os.walk(staging):
        n += len(dirnames) + len(filenames)
    return n + 1


# --------------------------------------------------------------------------- VM files

def descriptor(name: str, size: int, layout: str, cid: str, rng: random.Random) -> str:
    sectors = size // 512
    if layout == "vmfs":
        create, extent = "vmfs", f'RW {sectors} VMFS "{name}-flat.vmdk"'
    else:
        create, extent = "monolithicFlat", f'RW {sectors} FLAT "{name}-flat.vmdk" 0'
    cyl = size // (255 * 63 * 512)
    long_cid = rng.randbytes(12).hex() + cid
    ddb_uuid = vmware_uuid(["60", "00", "C2"], rng)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid}\n"
        "parentCID=ffffffff\n"
        f'createType="{create}"\n'
        "\n"
        "# Extent description\n"
        f"{extent}\n"
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cyl}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.longContentID = "{long_cid}"\n'
        'ddb.thinProvisioned = "1"\n'
        f'ddb.uuid = "{ddb_uuid}"\n'
        'ddb.virtualHWVersion = "19"\n'
    )


def vmx_text(name: str, rng: random.Random, source_dirs: list[str], seed: int,
             created: _dt.datetime) -> tuple[str, str]:
    bios = vmware_uuid(["56", "4d"], rng)
    location = vmware_uuid(["56", "4d"], rng)
    vc = vmware_uuid(["52"], rng)
    mac_tail = bios.replace("-", " ").split()[-3:]
    ds_uuid = f"{rng.getrandbits(32):08x}-{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{rng.randbytes(6).hex()}"
    swap = f"/vmfs/volumes/{ds_uuid}/{name}/{name}-{rng.getrandbits(32):08x}.vswp"
    annotation = (f"Sample VM {name} generated for vmrepo tests|0A"
                  f"Contents copied from |22{','.join(source_dirs)}|22 (seed {seed})")
    lines = [
        ('.encoding', 'UTF-8'),
        ('config.version', '8'),
        ('virtualHW.version', '19'),
        ('vmci0.present', 'TRUE'),
        ('floppy0.present', 'FALSE'),
        ('numvcpus', '2'),
        ('memSize', '2048'),
        ('firmware', 'efi'),
        ('bios.bootRetry.delay', '10'),
        ('powerType.suspend', 'soft'),
        ('tools.upgrade.policy', 'manual'),
        ('sched.cpu.units', 'mhz'),
        ('sched.cpu.affinity', 'all'),
        ('sched.cpu.latencySensitivity', 'normal'),
        ('vm.createDate', str(int(created.timestamp() * 1_000_000))),
        ('scsi0.virtualDev', 'pvscsi'),
        ('scsi0.present', 'TRUE'),
        ('scsi0:0.deviceType', 'scsi-hardDisk'),
        ('scsi0:0.fileName', f'{name}.vmdk'),
        ('sched.scsi0:0.shares', 'normal'),
        ('sched.scsi0:0.throughputCap', 'off'),
        ('scsi0:0.present', 'TRUE'),
        ('ide1:0.deviceType', 'cdrom-image'),
        ('ide1:0.fileName', '/vmfs/volumes/ds1/iso/debian.iso'),
        ('ide1:0.startConnected', 'FALSE'),
        ('ide1:0.present', 'TRUE'),
        ('ethernet0.virtualDev', 'vmxnet3'),
        ('ethernet0.networkName', 'VM Network'),
        ('ethernet0.addressType', 'generated'),
        ('ethernet0.wakeOnPcktRcv', 'FALSE'),
        ('ethernet0.uptCompatibility', 'TRUE'),
        ('ethernet0.present', 'TRUE'),
        ('ethernet0.generatedAddress', '00:0c:29:' + ':'.join(mac_tail)),
        ('ethernet0.generatedAddressOffset', '0'),
        ('displayName', name),
        ('guestOS', 'debian12-64'),
        ('toolScripts.afterPowerOn', 'TRUE'),
        ('toolScripts.afterResume', 'TRUE'),
        ('toolScripts.beforeSuspend', 'TRUE'),
        ('toolScripts.beforePowerOff', 'TRUE'),
        ('tools.syncTime', 'FALSE'),
        ('uuid.bios', bios),
        ('uuid.location', location),
        ('vc.uuid', vc),
        ('nvram', f'{name}.nvram'),
        ('pciBridge0.present', 'TRUE'),
        ('svga.present', 'TRUE'),
        ('pciBridge4.present', 'TRUE'),
        ('pciBridge4.virtualDev', 'pcieRootPort'),
        ('pciBridge4.functions', '8'),
        ('sched.swap.derivedName', swap),
        ('annotation', annotation),
        ('scsi0.pciSlotNumber', '160'),
        ('ethernet0.pciSlotNumber', '192'),
        ('monitor.phys_bits_used', '45'),
        ('cleanShutdown', 'TRUE'),
        ('softPowerOff', 'TRUE'),
    ]
    return "".join(f'{k} = "{v}"\n' for k, v in lines), vc


def vmware_log(name: str, rng: random.Random, start: _dt.datetime, n: int) -> str:
    t = start
    out = []

    def emit(level: str, thread: str, msg: str) -> None:
        nonlocal t
        t += _dt.timedelta(microseconds=rng.randint(50, 400000))
        out.append(f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond // 1000:03d}Z {level} {thread} - {msg}")

    emit("In(05)", "vmx", f"Log for VMware ESX pid={rng.randint(2000000, 2999999)} version=8.0.2 "
         "build=build-22380479 option=Release")
    emit("In(05)", "vmx", "The host is x86_64.")
    emit("In(05)", "vmx", "Host codepage=UTF-8 encoding=UTF-8")
    emit("In(05)", "vmx", f"DICT --- USER PREFERENCES")
    emit("In(05)", "vmx", f"DICT --- CONFIGURATION /vmfs/volumes/ds1/{name}/{name}.vmx")
    for k, v in (("displayName", name), ("memSize", "2048"), ("numvcpus", "2"),
                 ("guestOS", "debian12-64"), ("scsi0:0.fileName", f"{name}.vmdk"),
                 ("firmware", "efi")):
        emit("In(05)", "vmx", f'DICT {k:>24} = "{v}"')
    emit("In(05)", "vmx", f"DISK: OPEN scsi0:0 '/vmfs/volumes/ds1/{name}/{name}.vmdk' persistent R[]")
    emit("In(05)", "vmx", f"DISKLIB-VMFS  : \"/vmfs/volumes/ds1/{name}/{name}-flat.vmdk\" : open "
         "successful (10) size = 0, hd = 0. Type 3")
    templates = [
        ("In(05)", "vmx", "Tools: Tools heartbeat timeout."),
        ("In(05)", "vmx", "GuestRpc: Got RPCI vsocket connection {n}, assigned to channel {c}."),
        ("In(05)", "vmx", "GuestRpc: Channel {c} reinitialized."),
        ("In(05)", "vcpu-0", "Guest: toolbox: Version: 12.3.5.46049 (build-{n})"),
        ("In(05)", "vcpu-{c}", "PVSCSI: scsi0: aborted {c} outstanding requests"),
        ("In(05)", "vmx", "VigorTransportProcessClientPayload: opID={hex} seq={n}: Receiving "
         "Bootstrap.MessageReply request."),
        ("In(05)", "vmx", "ToolsSetVersionWork: Tools version status changed."),
        ("In(05)", "vmx", "HBACommon: First write on scsi0:0.fileName='/vmfs/volumes/ds1/{name}/{name}.vmdk'"),
        ("In(05)", "vmx", "DDB: \"longContentID\" = \"{hex32}\" (was \"{hex32b}\")"),
        ("In(05)", "mks", "SWBScreen: Screen 0 Defined: xywh(0, 0, 1280, 800) flags=0x3"),
        ("In(05)", "vcpu-1", "Guest: vmsvc: [vmsvc] Core dump limit set to -1"),
        ("Wa(03)", "vmx", "GuestInfo: HostinfoDetectHostDistro: distro detection failed (code {c})"),
        ("In(05)", "vmx", "Vix: [mainDispatch.c:{n}]: VMAutomation_ReportPowerOpFinished: "
         "statevar=1, newAppState=1873, success=1 additionalError=0"),
        ("In(05)", "svga", "SVGA enabling SVGA"),
        ("In(05)", "vmx", "TOOLS autoupgrade protocol version 2"),
        ("In(05)", "vmx", "Balloon: Guest target {n} pages, current {c} pages"),
    ]
    while len(out) < n:
        lvl, thr, msg = rng.choice(templates)
        c = rng.randint(0, 7)
        emit(lvl, thr.format(c=c), msg.format(n=rng.randint(1, 99999), c=c, name=name,
                                              hex=f"{rng.getrandbits(32):08x}",
                                              hex32=f"{rng.getrandbits(128):032x}",
                                              hex32b=f"{rng.getrandbits(128):032x}"))
    return "\n".join(out) + "\n"


def vmxf_text(name: str, vc_uuid: str) -> str:
    return ('<?xml version="1.0"?>\n'
            '<Foundry>\n'
            '<VM>\n'
            f'<VMId type="string">{vc_uuid}</VMId>\n'
            '<ClientMetaData>\n'
            '<clientMetaDataAttributes/>\n'
            '<HistoryEventList/></ClientMetaData>\n'
            f'<vmxPathName type="string">{name}.vmx</vmxPathName></VM></Foundry>\n')


# --------------------------------------------------------------------------- main

def build(args) -> None:
    name = args.name
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise UsageError(f"invalid --name {name!r} (use letters, digits, '.', '_', '+', '-')")
    size = parse_size(args.size)
    fill = parse_size(args.fill)
    if size < 16 << 20:
        raise UsageError(f"--size {args.size} too small (minimum 16M)")
    if size % 512:
        raise UsageError(f"--size must be a multiple of 512 bytes (got {size})")
    if fill < 0 or fill > size * 0.8:
        raise UsageError(f"--fill {args.fill} must be at most 80% of --size {args.size}")
    if args.seed < 0:
        raise UsageError("--seed must be >= 0")
    source_dirs = [os.path.abspath(s) for s in args.source_dirs.split(",") if s.strip()]
    if not source_dirs:
        raise UsageError("--source-dirs is empty")
    mkfs = find_tool("mkfs.ext4")

    outdir = os.path.abspath(args.outdir)
    created_outdir = False
    if os.path.lexists(outdir):
        if not os.path.isdir(outdir) or os.path.islink(outdir):
            raise UsageError(f"OUTDIR {outdir} exists and is not a directory")
        if os.listdir(outdir):
            raise UsageError(f"OUTDIR {outdir} exists and is not empty")
    parent = os.path.dirname(outdir)
    if not os.path.isdir(parent):
        raise UsageError(f"parent directory of OUTDIR does not exist: {parent}")

    rng = random.Random(args.seed)
    # independent streams so that changing one part does not shift the others
    r_pick, r_gen, r_vm = (random.Random(rng.getrandbits(64)) for _ in range(3))
    base = _dt.datetime(2024, 1, 1, tzinfo=_dt.timezone.utc) + _dt.timedelta(
        days=args.seed % 365, seconds=rng.randint(0, 86399))
    epoch = int(base.timestamp())

    files = walk_sources(source_dirs, exclude=[outdir])
    if not os.path.lexists(outdir):
        os.mkdir(outdir)
        created_outdir = True
    staging = tempfile.mkdtemp(prefix=f".{name}-staging-", dir=parent)
    ok = False
    try:
        generated, gen_paths = generate_files(staging, fill, r_gen, name, base)
        budget = max(0, fill - generated)
        chosen, _ = choose_files(files, budget, r_pick)
        copied, ncopied = copy_into_staging(files, chosen, staging, args.hardlink)
        if copied < budget * 0.9:
            print(f"{PROG}: warning: only {human(copied)} of real files available in "
                  f"{','.join(source_dirs)} (wanted {human(budget)})", file=sys.stderr)
        normalize_times(staging, gen_paths, epoch)

        image = os.path.join(outdir, f"{name}-flat.vmdk")
        with open(image, "wb") as f:
            f.truncate(size)
        fs_uuid, hash_seed = rfc_uuid(r_vm), rfc_uuid(r_vm)
        cmd = [mkfs, "-q", "-F", "-b", str(BLOCK), "-U", fs_uuid,
               "-E", f"root_owner=0:0,hash_seed={hash_seed}"]
        entries = count_entries(staging)
        default_inodes = size // 16384
        if entries + 64 > default_inodes * 0.9:
            cmd += ["-N", str(int((entries + 64) * 1.3))]
        cmd += ["-d", staging, image]
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch + 3600))
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise UsageError(f"mkfs.ext4 failed (exit {res.returncode}): "
                             f"{(res.stderr or res.stdout).strip()}")

        cid = f"{r_vm.getrandbits(32):08x}"
        write_text(os.path.join(outdir, f"{name}.vmdk"),
                   descriptor(name, size, args.layout, cid, r_vm))
        vmx, vc_uuid = vmx_text(name, r_vm, source_dirs, args.seed, base)
        write_text(os.path.join(outdir, f"{name}.vmx"), vmx)
        with open(os.path.join(outdir, f"{name}.nvram"), "wb") as f:
            f.write(b"MRVN" + r_vm.randbytes(8192 - 4))
        write_text(os.path.join(outdir, f"{name}.vmsd"),
                   '.encoding = "UTF-8"\nsnapshot.lastUID = "1"\nsnapshot.numSnapshots = "0"\n')
        write_text(os.path.join(outdir, f"{name}.vmxf"), vmxf_text(name, vc_uuid))
        write_text(os.path.join(outdir, "vmware.log"),
                   vmware_log(name, r_vm, base + _dt.timedelta(hours=1), r_vm.randint(250, 400)))
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            if created_outdir:
                shutil.rmtree(outdir, ignore_errors=True)
            else:
                for entry in os.listdir(outdir):
                    p = os.path.join(outdir, entry)
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        os.unlink(p)

    print(f"{PROG}: created {outdir} ({name}, layout {args.layout}): disk {human(size)} "
          f"({size} bytes), copied {copied} bytes ({human(copied)}) in {ncopied} files "
          f"+ {generated} bytes generated, seed {args.seed}")


def main(argv=None) -> int:
    ap = ArgParser(
        prog="make-sample-vm.py",
        description="Create a realistic ESXi-style VM directory whose flat disk holds an "
                    "ext4 filesystem populated with real files (mkfs.ext4 -d, no mount).",
        epilog="example: make-sample-vm.py /tmp/vm1 --name vm1 --size 4G --fill 1500M --seed 7")
    ap.add_argument("outdir", metavar="OUTDIR", help="directory to create (must not exist or be empty)")
    ap.add_argument("--name", required=True, help="VM name (file name stem), e.g. vm1")
    ap.add_argument("--size", required=True, help="virtual disk size, e.g. 4G (binary units)")
    ap.add_argument("--fill", required=True, help="bytes of files to put in the filesystem, e.g. 1G")
    ap.add_argument("--seed", type=int, default=0, help="seed for everything generated (default 0)")
    ap.add_argument("--source-dirs", default="/usr/share,/usr/lib",
                    help="comma-separated directories to copy real files from "
                         "(default /usr/share,/usr/lib)")
    ap.add_argument("--hardlink", action="store_true",
                    help="hard-link source files into the staging directory instead of "
                         "copying them (about 3x faster for large --fill, but bumps the "
                         "ctime of the source files; falls back to copying across "
                         "filesystems)")
    ap.add_argument("--layout", choices=("vmfs", "monolithicFlat"), default="vmfs",
                    help="descriptor createType: vmfs (default, ESXi) or monolithicFlat")
    args = ap.parse_args(argv)
    try:
        build(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
