#!/usr/bin/env python3
"""What the disk and the CPUs do while a command runs: a timeline of one block device's read
throughput and requests in flight (/proc/diskstats) and of the CPUs' busy and iowait shares
(/proc/stat), in buckets of --step seconds. It shows whether a load keeps the disk busy (many
large reads in flight) or leaves it idle while the CPUs wait, which a total time cannot.

    sudo python3 scripts/io_timeline.py --drop-caches [--device vda] -- COMMAND ARGS...

For example, the cold GGUF load of scripts/bench_gguf.py's model (`--keep --dir D`): the
file mapped as llama.cpp maps it (MAP_SHARED|MAP_POPULATE), from disk and then from a fresh
mount (`mount` returns once the mount serves):

    MAP='import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)'
    sudo python3 scripts/io_timeline.py --drop-caches -- python3 -c "$MAP" D/from-mount.gguf
    sudo python3 scripts/io_timeline.py --drop-caches -- sh -c "lorafs mount D/base D/mnt \
        --adapter D/adapter --gguf F16 && python3 -c '$MAP' D/mnt/model-F16.gguf; lorafs unmount D/mnt"

Sampling runs in a process of its own every 10 ms (a thread could be held up by the command's
own Python while it maps).
"""

import argparse
import os
import subprocess
import sys
import time

from coldio import drop_caches

SAMPLER = r"""
import sys, time
device, out = sys.argv[1], open(sys.argv[2], "w")
while True:
    t = time.time()
    for line in open("/proc/diskstats"):
        f = line.split()
        if f[2] == device:
            read, inflight = int(f[5]) * 512, int(f[11])
    cpu = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    out.write(f"{t} {read} {inflight} {sum(cpu)} {cpu[3] + cpu[4]} {cpu[4]}\n")
    out.flush()
    time.sleep(0.01)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="vda", help="block device name as in /proc/diskstats")
    ap.add_argument("--step", type=float, default=0.04, help="seconds per line")
    ap.add_argument("--drop-caches", action="store_true", help="sync and drop the page cache first (root)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("no command given")
    if args.drop_caches:
        drop_caches()
    log = f"/tmp/io-timeline-{os.getpid()}.txt"
    sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, args.device, log])
    try:
        time.sleep(0.1)
        start = time.time()
        status = subprocess.run(command).returncode
        end = time.time()
        time.sleep(0.03)
    finally:
        sampler.kill()
        sampler.wait()
    with open(log) as f:
        samples = [[float(x) for x in line.split()] for line in f if len(line.split()) == 6]
    os.unlink(log)
    report(samples, start, end, args.step)
    print(f"command: exit status {status}, {end - start:.3f} s")


def report(samples, start, end, step):
    window = [s for s in samples if start - 0.02 <= s[0] <= end + 0.02]
    if len(window) < 2:
        sys.exit("too few samples")
    print(f"{'t (s)':>6} {'disk MB/s':>10} {'in flight':>10} {'CPU busy':>9} {'iowait':>7}")
    i = 0
    while i < len(window) - 1:
        j = i
        while j < len(window) - 1 and window[j][0] - window[i][0] < step:
            j += 1
        a, b = window[i], window[j]
        ticks = max(b[3] - a[3], 1)
        busy = 1 - (b[4] - a[4]) / ticks
        print(f"{a[0] - start:6.2f} {(b[1] - a[1]) / 1e6 / (b[0] - a[0]):10.0f} {int(b[2]):10d}"
              f" {busy:8.0%} {(b[5] - a[5]) / ticks:7.0%}")
        i = j
    a, b = window[0], window[-1]
    ticks = max(b[3] - a[3], 1)
    print(f"read {(b[1] - a[1]) / 1e9:.2f} GB, {(b[1] - a[1]) / 1e6 / (b[0] - a[0]):.0f} MB/s on average;"
          f" CPUs busy {1 - (b[4] - a[4]) / ticks:.0%}, iowait {(b[5] - a[5]) / ticks:.0%}")


if __name__ == "__main__":
    main()
