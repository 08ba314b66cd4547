#!/usr/bin/env python3
"""How the page cache holds a file: how many of its pages belong to large folios (compound
pages) and how many are single 4 KiB pages. Maps the file (`MAP_SHARED|MAP_POPULATE`: every
page faulted in, as llama.cpp maps a model), then reads each page's frame from
/proc/self/pagemap and its flags from /proc/kpageflags (root only).

    sudo python3 scripts/folios.py FILE [BYTES]

BYTES (default the whole file) limits the mapping to the file's first bytes. For example a
base on ext4 against the same model's merged file on a fresh lorafs mount
(docs/DESIGN.md, "The cold GGUF load").
"""
import collections
import ctypes
import os
import struct
import sys

KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 1 << 15, 1 << 16
PROT_READ, MAP_SHARED, MAP_POPULATE = 1, 0x01, 0x8000


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    path = sys.argv[1]
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    if len(sys.argv) > 2:
        size = min(size, int(sys.argv[2]))
    addr = libc.mmap(None, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise SystemExit(f"mmap failed: {os.strerror(ctypes.get_errno())}")
    pages = size // 4096
    with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as flags:
        pagemap.seek(addr // 4096 * 8)
        counts = collections.Counter()
        for entry in struct.unpack(f"{pages}Q", pagemap.read(pages * 8)):
            if not entry >> 63:
                counts["not present"] += 1
                continue
            flags.seek((entry & ((1 << 55) - 1)) * 8)
            f = struct.unpack("Q", flags.read(8))[0]
            counts["in large folios" if f & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL) else "4 KiB pages"] += 1
    share = counts["in large folios"] / max(pages, 1)
    print(f"{path}: {pages} pages, {dict(counts)}; {share:.1%} in large folios")


if __name__ == "__main__":
    main()
