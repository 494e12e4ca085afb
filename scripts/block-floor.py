#!/usr/bin/env python3
"""The stored-bytes floor of exact 4 KiB-block deduplication, night by night: the 4 KiB blocks
of DISK (aligned, not all zero) that no earlier night had, compressed together with `zstd -3`.
That is what a backup that found every repeated block and nothing else would store tonight.
STATE keeps the 8-byte BLAKE2b digests of every block seen so far (created on the first night).
Prints the floor in bytes, then the number of new blocks.

usage: scripts/block-floor.py STATE DISK
"""
import hashlib
import os
import subprocess
import sys
import threading

BLOCK = 4096
ZERO = bytes(BLOCK)

if len(sys.argv) != 3:
    sys.exit(__doc__)
state, disk = sys.argv[1], sys.argv[2]
seen = set()
if os.path.exists(state):
    with open(state, "rb") as f:
        data = f.read()
    seen = {data[i:i + 8] for i in range(0, len(data), 8)}
fresh = []
new_blocks = 0
zstd = subprocess.Popen(["zstd", "-3", "-q", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
with open(disk, "rb") as f:
    out = []
    reader = threading.Thread(target=lambda: out.append(len(zstd.stdout.read())))
    reader.start()
    while True:
        buf = f.read(BLOCK * 256)
        if not buf:
            break
        for i in range(0, len(buf), BLOCK):
            b = buf[i:i + BLOCK]
            if b == ZERO[:len(b)]:
                continue
            d = hashlib.blake2b(b, digest_size=8).digest()
            if d in seen:
                continue
            seen.add(d)
            fresh.append(d)
            new_blocks += 1
            zstd.stdin.write(b)
    zstd.stdin.close()
    reader.join()
    zstd.wait()
with open(state, "ab") as f:
    f.write(b"".join(fresh))
print(out[0], new_blocks)
