#!/usr/bin/env python3
"""How much chunk lengths tell an outsider: reads every record header in the packs of a
repository (no key needed; headers are in the clear), and looks for the chunk-length sequences
of a known file in it. KNOWN is a repository the outsider made by ingesting the known file
alone with the same chunker parameters (`vmrepo init K && vmrepo ingest K file.img`).
A run of RUN consecutive chunk lengths of KNOWN found as consecutive records of VICTIM is a hit.

LENGTH says which length the outsider compares: `raw`, the plaintext length in each record
header; or `padme`, what would remain if only the stored length were visible and it were padded
with Padme (the stored length of an encrypted record is the compressed length plus 28, which the
outsider computes for the known file with the same zstd level).

usage: scripts/length-leak.py VICTIM_REPO KNOWN_REPO [RUN=4] [LENGTH=raw|padme]
"""
import math
import os
import struct
import sys

HEADER = 52
CHUNK = 1
SEAL_OVERHEAD = 28


def padme(n):
    """Padme padding: keeps the top log2(log2(n)) + 1 bits of n and rounds up the rest."""
    if n < 2:
        return n
    e = n.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (n + mask) & ~mask


def chunk_lengths(repo, length):
    """Lengths of the chunk records, pack by pack, in file order."""
    out = []
    for root, _, files in os.walk(os.path.join(repo, "data")):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            pos = data.find(b"vrOB")
            seq = []
            while pos >= 0 and pos + HEADER <= len(data) and data[pos:pos + 4] == b"vrOB":
                kind, _codec, cipher, _z, stored, raw = struct.unpack_from("<BBBBII", data, pos + 4)
                if kind == CHUNK:
                    if length == "raw":
                        seq.append(raw)
                    else:
                        seq.append(padme(stored if cipher else stored + SEAL_OVERHEAD))
                pos += HEADER + stored
            out.append(seq)
    return out


if len(sys.argv) < 3:
    sys.exit(__doc__)
run = int(sys.argv[3]) if len(sys.argv) > 3 else 4
length = sys.argv[4] if len(sys.argv) > 4 else "raw"
victim = chunk_lengths(sys.argv[1], length)
known = [x for seq in chunk_lengths(sys.argv[2], length) for x in seq]
windows = {}
for seq in victim:
    for i in range(len(seq) - run + 1):
        windows.setdefault(tuple(seq[i:i + run]), 0)
        windows[tuple(seq[i:i + run])] += 1
probes = [tuple(known[i:i + run]) for i in range(len(known) - run + 1)]
hits = sum(1 for p in probes if p in windows)
print("%s lengths: victim: %d chunk records; known file: %d chunks; runs of %d found: %d of %d (%.1f%%)"
      % (length, sum(map(len, victim)), len(known), run, hits, len(probes), 100.0 * hits / max(1, len(probes))))
