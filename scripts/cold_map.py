"""A cold llama.cpp-style mapping of a mount's GGUF under several mount options, rotated.

Each round drops the page cache, then for each contender maps a file the way llama.cpp maps
a model (`MAP_SHARED | MAP_POPULATE`: every page faulted in) and times it: `disk` maps a GGUF
that `lorafs materialize --gguf F16` wrote to disk (the converter's bytes: the e2e tests
check that), and each `NAME=ARGS` contender mounts the base with `lorafs mount ... --gguf
F16 ARGS` and maps the mount's `model-F16.gguf`, the mount's start included. The order of
the contenders rotates from round to round (this machine's cold reads vary with what ran
just before). Prints medians and ratios to `disk`, and the CPU behind them: the system time of
the mapping process (the kernel allocating, filling and mapping the page cache in the
faulting process) and each mount's server CPU time (user + system) over its start and the
mapping. With `--warm` the base is read into the page cache before each contender instead
(cold only for the disk file).

The model is the one `scripts/bench_gguf.py --keep` leaves in its --dir (base/, adapter/);
a --dir no benchmark made is refused. Its own files (the disk file, the mount point, perf's
samples) go into a new directory inside, removed when done: nothing it did not make is
written or removed.
Run as root; for example, the page cache against O_DIRECT base reads:

    $(bash scripts/venv.sh)/bin/python scripts/bench_gguf.py --keep --runs 1
    python3 scripts/cold_map.py --dir /tmp/lorafs-bench-gguf --runs 10 \\
        auto= "page-cache=--direct-io never" "direct=--direct-io always"

`--llama` times what `scripts/bench_gguf.py` times instead of the bare mapping:
`llama_cpp.Llama` loading the file and evaluating a short prompt (its process started and
llama_cpp imported first, untimed); run it with the main virtualenv's Python (`$(bash
scripts/venv.sh)/bin/python`), which finds the llama.cpp stack of scripts/gguf-env.sh. The
system time column is then empty.
`--gap SECONDS` waits that long between the mount's return and the mapping, as a loader
starting up would (llama.cpp's Python import, its backends): work a mount does in the
background as it starts (docs/DESIGN.md, "Buffers prepared at the start") shows only then.
`--lorafs BINARY` picks the binary (default target/release/lorafs); a contender may name its
own with `NAME=@BINARY ARGS` (to compare two builds). `--profile` adds, after the rounds, one
more mapping of each contender under `perf record` of its server (Debian's linux-perf) and
prints the symbols that took the most of the server's CPU (docs/DESIGN.md, "Where a cold
mapping's CPU goes").
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coldio import drop_caches, llama_load, populate_cost, server_cpu, server_pid
from scratch import require_scratch

REPO = Path(__file__).resolve().parents[1]


def parse_contender(spec, default_binary):
    name, _, rest = spec.partition("=")
    words = rest.split()
    binary = default_binary
    if words and words[0].startswith("@"):
        binary = Path(words.pop(0)[1:]).resolve()
    return name, binary, words


def profile(mount, mountpoint, data):
    """One more mapping of a fresh mount (`mount()` mounts it) with `perf record` on its
    server, its samples written to `data` (removed once reported: `perf record` would rename
    an existing one); returns the report's lines for the symbols over 1.5 % of the server's
    samples."""
    mount()
    try:
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "4999", "-g", "-p", server_pid(mountpoint),
                                 "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # perf attached
        populate_cost(mountpoint / "model-F16.gguf")
        perf.send_signal(signal.SIGINT)
        perf.wait()
    finally:
        subprocess.run(["umount", mountpoint], check=True)
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "-g", "none",
                             "--percent-limit", "1.5", "--stdio"], capture_output=True, text=True, check=True)
    data.unlink()
    return [line for line in report.stdout.splitlines() if line.strip() and not line.startswith("#")]


def llama_timer():
    """A function timing llama.cpp's load of a path (wall seconds, and None for the system
    time it does not measure), with the llama.cpp stack of scripts/gguf-env.sh."""
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    import gguf_models as gm  # the main virtualenv's (torch, transformers)

    env = gm.build_stack().env()
    return lambda path: (llama_load(path, env), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lorafs-bench-gguf"))
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--lorafs", type=Path, default=REPO / "target/release/lorafs")
    ap.add_argument("--warm", action="store_true", help="the base in the page cache for the mounts")
    ap.add_argument("--llama", action="store_true", help="time llama.cpp's load, not the bare mapping")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds between a mount's return and its mapping")
    ap.add_argument("--profile", action="store_true", help="then one mapping per contender under perf record")
    ap.add_argument("contenders", nargs="+", metavar="NAME=ARGS")
    args = ap.parse_args()
    require_scratch(args.dir)
    if os.geteuid() != 0:
        raise SystemExit("run as root: the page cache is dropped before each mapping")
    base, adapter = args.dir / "base", args.dir / "adapter"
    if not (base / "config.json").is_file() or not adapter.is_dir():
        raise SystemExit(f"no model in {args.dir}: run scripts/bench_gguf.py --keep --dir {args.dir} first")
    contenders = [parse_contender(s, args.lorafs) for s in args.contenders]
    measure = llama_timer() if args.llama else populate_cost
    # Its own files in a directory of its own, new: nothing there but what it made, which is
    # all it removes (by name; the mount point only once unmounted and empty).
    own = Path(tempfile.mkdtemp(prefix="cold-map-", dir=args.dir))
    disk, mnt, perf_data = own / "disk.gguf", own / "mnt", own / "perf.data"
    mnt.mkdir()
    try:
        subprocess.run([args.lorafs, "materialize", base, disk, "--adapter", adapter, "--gguf", "F16"],
                       check=True, capture_output=True)
        names = ["disk", *(c[0] for c in contenders)]
        by_name = {c[0]: c for c in contenders}

        def mount(name):
            _, binary, extra = by_name[name]
            subprocess.run([binary, "mount", base, mnt, "--adapter", adapter, "--gguf", "F16", *extra], check=True)

        times = {n: [] for n in names}
        mapper_sys = {n: [] for n in names}
        server = {n: [] for n in names}
        for r in range(args.runs):
            for name in names[r % len(names):] + names[:r % len(names)]:
                drop_caches()
                if name == "disk":
                    wall, system = measure(disk)
                    times[name].append(wall)
                    mapper_sys[name].append(system)
                    continue
                if args.warm:
                    subprocess.run(["cat", *base.glob("*.safetensors")], stdout=subprocess.DEVNULL, check=True)
                t0 = time.perf_counter()
                mount(name)
                try:
                    mounted = time.perf_counter() - t0
                    time.sleep(args.gap)
                    wall, system = measure(mnt / "model-F16.gguf")
                    times[name].append(mounted + wall)
                    mapper_sys[name].append(system)
                    server[name].append(server_cpu(mnt))
                finally:
                    subprocess.run(["umount", mnt], check=True)
        profiles = {}
        for name in names[1:] if args.profile else []:
            drop_caches()
            if args.warm:
                subprocess.run(["cat", *base.glob("*.safetensors")], stdout=subprocess.DEVNULL, check=True)
            profiles[name] = profile(lambda: mount(name), mnt, perf_data)
    finally:
        disk.unlink(missing_ok=True)
        perf_data.unlink(missing_ok=True)
        mnt.rmdir()
        own.rmdir()
    base_line = statistics.median(times["disk"])
    state = "the base in the page cache" if args.warm else "page cache dropped"
    what = "llama_cpp.Llama load + eval" if args.llama else "MAP_SHARED|MAP_POPULATE"
    gap = f", {args.gap:g} s after each mount" if args.gap else ""
    print(f"{what} of model-F16.gguf ({state}{gap}), median of {args.runs}, rotated order")
    print(f"  {'':<20}{'wall':>9}{'vs disk':>9}{'mapper sys':>12}{'lorafs CPU':>12}   walls")
    for name in names:
        m = statistics.median(times[name])
        spread = " ".join(f"{t:.2f}" for t in sorted(times[name]))
        cpu = f"{statistics.median(server[name]):>10.2f} s" if server[name] else f"{'':>12}"
        system = [t for t in mapper_sys[name] if t is not None]
        system = f"{statistics.median(system):>10.2f} s" if system else f"{'':>12}"
        print(f"  {name:<20}{m:>7.3f} s{m / base_line:>8.2f}x{system}"
              f"{cpu}   [{spread}]")

    for name, lines in profiles.items():
        print(f"\n{name}: the server's CPU in one more mapping, by symbol (perf record -g -p, over 1.5 %)")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
