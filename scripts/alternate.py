#!/usr/bin/env python3
"""Run two shell commands in turn, N times each, and print the median and fastest wall time of
each and the ratio of the medians. Alternating keeps a noisy, shared machine's drift out of
the ratio.

usage: scripts/alternate.py 'COMMAND A' 'COMMAND B' [N=15]
"""
import statistics
import subprocess
import sys
import time

if len(sys.argv) < 3:
    sys.exit(__doc__)
cmds = {"A": sys.argv[1], "B": sys.argv[2]}
n = int(sys.argv[3]) if len(sys.argv) > 3 else 15
times = {k: [] for k in cmds}
for _ in range(n):
    for k, c in cmds.items():
        t = time.perf_counter()
        subprocess.run(c, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times[k].append(time.perf_counter() - t)
for k, c in cmds.items():
    print("%s: median %.3f s, fastest %.3f s: %s" % (k, statistics.median(times[k]), min(times[k]), c))
print("A/B, ratio of medians: %.2f" % (statistics.median(times["A"]) / statistics.median(times["B"])))
