"""O_DIRECT reads and writes into ordinary memory against memory on transparent huge pages.

Why lorafs's O_DIRECT buffers are whole huge pages (src/aligned.rs; docs/DESIGN.md, "Buffers
on huge pages"): in a virtual machine the host serves each physically contiguous piece of a
request on its own, and a buffer of ordinary pages is one 4 KiB piece per page. This script
measures the difference on this machine's disk, with the buffers lorafs uses:

- reads: a scratch file read cold (page cache dropped) with O_DIRECT by THREADS threads,
  READ_MIB each read, into a buffer per thread mapped on its own (as lorafs's staged
  read-ahead buffers are); ordinary pages against pages advised MADV_HUGEPAGE;
- writes: WRITE_MIB MiB written with O_DIRECT in 16 MiB pieces (as `materialize` writes),
  then fsync'ed, from ordinary pages against huge pages.

Each round runs both kinds, alternating which goes first; medians are printed with the
ratio. Needs root (to drop the page cache) and a disk-backed directory (tmpfs refuses
O_DIRECT before Linux 6.6). Deletes its scratch file.

    python3 scripts/bench_buffers.py [--dir /var/tmp] [--rounds 5] [--file-gib 2]
"""

import argparse
import mmap
import os
import statistics
import threading
import time
from pathlib import Path

from coldio import drop_caches

READ_MIB, THREADS, WRITE_MIB, WRITE_PIECE_MIB = 2, 8, 1024, 16


def buffer(size, huge):
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    m.write(b"\x5a" * size)  # touched before timing, as a reused buffer is
    return m


def read_cold(path, huge):
    size, piece = path.stat().st_size, READ_MIB << 20
    bufs = [buffer(piece, huge) for _ in range(THREADS)]

    def worker(i):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for off in range(i * piece, size, THREADS * piece):
                os.preadv(fd, [bufs[i]], off)
        finally:
            os.close(fd)

    drop_caches()
    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return size / (time.perf_counter() - t) / 1e9


def write_direct(path, huge):
    piece = WRITE_PIECE_MIB << 20
    buf = buffer(piece, huge)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        t = time.perf_counter()
        for off in range(0, WRITE_MIB << 20, piece):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        return (WRITE_MIB << 20) / (time.perf_counter() - t) / 1e9
    finally:
        os.close(fd)
        path.unlink()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--file-gib", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the page cache is dropped before each cold read")
    scratch = Path(args.dir) / f"lorafs-bench-buffers-{os.getpid()}"
    results = {(kind, huge): [] for kind in ("read", "write") for huge in (False, True)}
    try:
        with open(scratch, "wb") as f:
            chunk = os.urandom(64 << 20)
            for _ in range(args.file_gib * 16):
                f.write(chunk)
        for r in range(args.rounds):
            for huge in (r % 2 == 0, r % 2 != 0):
                results["read", huge].append(read_cold(scratch, huge))
                results["write", huge].append(write_direct(scratch.with_suffix(".w"), huge))
    finally:
        scratch.unlink(missing_ok=True)
        scratch.with_suffix(".w").unlink(missing_ok=True)
    print(f"O_DIRECT, {THREADS} threads x {READ_MIB} MiB reads of a {args.file_gib} GiB file cold; "
          f"{WRITE_MIB} MiB written in {WRITE_PIECE_MIB} MiB pieces + fsync; median of {args.rounds}")
    print(f"{'':<8}{'ordinary pages':>16}{'huge pages':>14}{'ratio':>8}")
    for kind in ("read", "write"):
        plain = statistics.median(results[kind, False])
        huge = statistics.median(results[kind, True])
        print(f"{kind:<8}{plain:>11.2f} GB/s{huge:>9.2f} GB/s{huge / plain:>7.2f}x")
    for (kind, huge), v in results.items():
        print(f"  {kind} {'huge' if huge else 'ordinary'}: " + " ".join(f"{x:.2f}" for x in v))


if __name__ == "__main__":
    main()
