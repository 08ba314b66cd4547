"""Cold-cache helpers shared by the benchmark scripts (run as root)."""

import mmap
import os
import time
from pathlib import Path


def drop_caches():
    """Write back dirty pages, then drop the page cache (and dentries and inodes)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def populate(path):
    """Seconds to map `path` as llama.cpp does: shared, every page faulted in."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        mapping = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        elapsed = time.perf_counter() - t
        mapping.close()
        return elapsed
    finally:
        os.close(fd)
