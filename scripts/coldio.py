"""Cold-cache helpers shared by the benchmark scripts (run as root)."""

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path


def drop_caches():
    """Write back dirty pages, then drop the page cache (and dentries and inodes)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def populate(path):
    """Seconds to map `path` as llama.cpp does: shared, every page faulted in."""
    return populate_cost(path)[0]


def populate_cost(path):
    """Seconds to map `path` as llama.cpp does (shared, every page faulted in), and the
    seconds of system time this process spent doing it (the kernel filling and mapping the
    page cache in the faulting process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t, sys0 = time.perf_counter(), os.times().system
        mapping = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        elapsed, system = time.perf_counter() - t, os.times().system - sys0
        mapping.close()
        return elapsed, system
    finally:
        os.close(fd)


LLAMA_LOAD = """
import sys, time
from llama_cpp import Llama
t = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
llm.eval(llm.tokenize(b"hello world, the llama merge"))
print(time.perf_counter() - t)
"""


def llama_load(path, env):
    """Seconds for llama_cpp.Llama to load `path` and evaluate a short prompt, in a new
    process (its Python and the import of llama_cpp not counted); `env` holds the llama.cpp
    stack of scripts/gguf-env.sh (GgufStack.env() of tests/e2e/gguf_models.py), and this
    Python must be the main virtualenv's."""
    out = subprocess.run([sys.executable, "-c", LLAMA_LOAD, str(path)], check=True, capture_output=True,
                         text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def server_pid(mountpoint):
    """The process id of the lorafs server of `mountpoint`."""
    stats = Path(mountpoint, ".lorafs-stats").read_text().split()
    return stats[stats.index("pid") + 1]


def server_cpu(mountpoint):
    """CPU seconds (user + system) the lorafs server of `mountpoint` has used so far."""
    pid = server_pid(mountpoint)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
