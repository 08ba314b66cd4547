"""The benchmarks' scratch directories: a benchmark writes only into a directory it made
(marked with MARKER), and removes only what is inside one."""

import shutil
import sys

MARKER = ".lorafs-bench"


def claim_scratch(work):
    """Make `work` the benchmark's scratch directory, or refuse: a directory that exists and
    is not one a benchmark made (it holds MARKER) is never written to or removed."""
    require_scratch(work, missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("scratch directory of a lorafs benchmark; removed when done\n")


def require_scratch(work, missing_ok=False):
    """Refuse (exit) unless `work` is a scratch directory a benchmark made (or, with
    `missing_ok`, does not exist yet)."""
    if missing_ok and not work.exists():
        return
    if not (work / MARKER).is_file():
        sys.exit(f"{work} exists and was not made by a lorafs benchmark: name a new --dir"
                 if work.exists() else f"{work} does not exist: make it with a lorafs benchmark's --keep --dir")


def remove_scratch(path, work):
    """Remove `path` (inside the claimed scratch directory `work`, or `work` itself)."""
    if (work / MARKER).is_file() and (path == work or work in path.parents):
        shutil.rmtree(path, ignore_errors=True)
