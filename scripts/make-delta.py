#!/usr/bin/env python3
"""Turn a raw disk image into an ESXi snapshot chain for benchmarks: an empty `vmfs` base
(thin, all holes) and one delta holding every non-zero grain of the image, as vmfsSparse (COWD,
1-sector grains, as ESXi writes them) or seSparse (4 KiB grains). Reading the delta's chain gives
back the image. Layouts follow docs/vmware-formats.md sections 3.1 and 3.2.

Usage: make-delta.py RAW OUTDIR --format cowd|sesparse
Writes OUTDIR/base.vmdk, OUTDIR/base-flat.vmdk, OUTDIR/delta.vmdk and its data file.
"""
import argparse, os, struct, sys

def descriptor(create_type, cid, parent_cid, extent, parent=None):
    t = ("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=%08x\nparentCID=%08x\n"
         "createType=\"%s\"\n" % (cid, parent_cid, create_type))
    if parent:
        t += "parentFileNameHint=\"%s\"\n" % parent
    return t + "\n# Extent description\n" + extent + "\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n"

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw"); ap.add_argument("out"); ap.add_argument("--format", required=True, choices=["cowd", "sesparse"])
    a = ap.parse_args()
    size = os.path.getsize(a.raw)
    if size % 4096:
        sys.exit("make-delta.py: the image size must be a multiple of 4096")
    sectors = size // 512
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "base-flat.vmdk"), "wb") as f:
        f.truncate(size)
    with open(os.path.join(a.out, "base.vmdk"), "w") as f:
        f.write(descriptor("vmfs", 0xaa, 0xffffffff, "RW %d VMFS \"base-flat.vmdk\"" % sectors))
    src = open(a.raw, "rb")
    if a.format == "cowd":
        data_name = "delta-delta.vmdk"
        n_gd = (sectors + 4095) // 4096
        gd_sectors = (n_gd * 4 + 511) // 512
        gt_start = 4 + gd_sectors
        nxt = gt_start + n_gd * 32
        gts = [0] * (n_gd * 4096)
        with open(os.path.join(a.out, data_name), "wb") as out:
            out.seek(nxt * 512)
            for block in range(0, size, 1 << 20):
                buf = src.read(1 << 20)
                for i in range(0, len(buf), 512):
                    s = buf[i:i + 512]
                    if s.count(0) != 512:
                        gts[(block + i) // 512] = nxt
                        out.write(s)
                        nxt += 1
            out.seek(4 * 512)
            out.write(struct.pack("<%dI" % n_gd, *[gt_start + 32 * i for i in range(n_gd)]))
            out.seek(gt_start * 512)
            out.write(struct.pack("<%dI" % len(gts), *gts))
            hdr = b"COWD" + struct.pack("<IIIIIII", 1, 3, sectors, 1, 4, n_gd, nxt)
            out.seek(0); out.write(hdr.ljust(2048, b"\0"))
            out.truncate(nxt * 512)
        extent = "RW %d VMFSSPARSE \"%s\"" % (sectors, data_name)
        create_type = "vmfsSparse"
    else:
        data_name = "delta-sesparse.vmdk"
        n_gt = (sectors + 32767) // 32768
        gd_off = 16
        gd_sectors = max(1, (n_gt * 8 + 511) // 512)
        gt_off = gd_off + gd_sectors
        grains_off = gt_off + n_gt * 64 + 2
        gts = [0] * (n_gt * 4096)
        slot = 0
        with open(os.path.join(a.out, data_name), "wb") as out:
            out.seek(grains_off * 512)
            for block in range(0, size, 1 << 20):
                buf = src.read(1 << 20)
                for i in range(0, len(buf), 4096):
                    g = buf[i:i + 4096]
                    if g.count(0) != 4096:
                        gts[(block + i) // 4096] = 0x3000000000000000 | ((slot & 0xFFF) << 48) | (slot >> 12)
                        out.write(g)
                        slot += 1
            out.seek(gd_off * 512)
            out.write(struct.pack("<%dQ" % n_gt, *[0x1000000000000000 | i for i in range(n_gt)]))
            out.seek(gt_off * 512)
            out.write(struct.pack("<%dQ" % len(gts), *gts))
            hdr = struct.pack("<26Q", 0xCAFEBABE, 0x0000000200000001, sectors, 8, 64, 0, 0, 0, 0, 0,
                              1, 1, 2, 2, 4, 12, gd_off, gd_sectors, gt_off, n_gt * 64,
                              gt_off + n_gt * 64, 1, gt_off + n_gt * 64 + 1, 1, grains_off, slot * 8)
            out.seek(0); out.write(hdr.ljust(512, b"\0"))
            out.write(struct.pack("<4Q", 0xCAFECAFE, n_gt, 0, 0).ljust(512, b"\0"))
            out.truncate((grains_off + slot * 8) * 512)
        extent = "RW %d SESPARSE \"%s\"" % (sectors, data_name)
        create_type = "seSparse"
    with open(os.path.join(a.out, "delta.vmdk"), "w") as f:
        f.write(descriptor(create_type, 0xbb, 0xaa, extent, parent="base.vmdk"))

main()
