#!/usr/bin/env python3
"""Where a mapping's time goes along a file: maps FILE shared (as llama.cpp maps a model,
without MAP_POPULATE), touches its pages in order as MAP_POPULATE would, and prints the
milliseconds each STEP MiB took, then the total. Reads only; for example a fresh mount's GGUF
cold against the same with the base in the page cache (docs/DESIGN.md, "Buffers prepared at
the start"):

    sync; echo 3 > /proc/sys/vm/drop_caches
    lorafs mount D/base D/mnt --adapter D/adapter --gguf F16
    python3 scripts/map_pages.py D/mnt/model-F16.gguf; umount D/mnt
"""
import argparse
import mmap
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--step", type=int, default=32, help="MiB per printed step")
    args = ap.parse_args()
    fd = os.open(args.file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            step, steps = args.step << 20, []
            start = last = time.perf_counter()
            for offset in range(0, size, mmap.PAGESIZE):
                m[offset]
                if (offset + mmap.PAGESIZE) % step == 0 or offset + mmap.PAGESIZE >= size:
                    now = time.perf_counter()
                    steps.append(f"{(offset + mmap.PAGESIZE) >> 20:>6} MiB {1000 * (now - last):6.1f} ms")
                    last = now
    finally:
        os.close(fd)
    print("\n".join(steps))
    print(f"total {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
