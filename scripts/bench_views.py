#!/usr/bin/env python3
"""Views benchmarks (issue: one mount, many merged models), each figure against a baseline of the same run.

A catalog of 8 checkpoints of one training run, laid out as a trainer writes them
(DIR/run1/checkpoint-1000 ... checkpoint-8000: adapter_config.json, adapter_model.safetensors,
and the files a checkpoint also holds: README.md, trainer_state.json, training_args.bin, and
small dummies for optimizer.pt, scheduler.pt, rng_state.pth), mounted with
`lorafs mount BASE MNT --catalog DIR`:

1. Time until mounted: `lorafs mount` returns and MNT/run1/checkpoint-8000/config.json reads,
   against mounting one checkpoint with `--adapter` (until MNT/config.json reads).
2. The server's peak RSS (VmHWM) after all 8 views were loaded in turn, against its cache
   budget plus the factors of the views read (the mount's factor_bytes counter, and the
   adapters' sizes as f32).
3. `from_pretrained` + one forward pass of each view in turn through the mount, against the
   same on a `lorafs materialize` copy of checkpoint-8000 with its files in the page cache
   (each load as bench_mount.py does it: a fresh interpreter, dtype as stored). All
   checkpoints have the same shapes and dtypes, so that one copy is the baseline of every
   view. The copy is loaded before the first view and after each, and each view's ratio is
   to the two loads around it: these shared 2-core machines drift within a run.
4. A new checkpoint copied into the catalog with `shutil.copytree` (one file after another,
   as a trainer writes them): the time from the start of the copy until the view's weight
   file opens and its first MiB reads, against the copy itself.

The model is made by `examples/synth_model.rs` (a Llama with random weights, about 1 GB of
F16, and rank-16 LoRAs with different random factors for the checkpoints). 2-4 minutes;
it writes 1 GB of model and a 1 GB copy under --dir and deletes them unless --keep. As root:

    $(bash scripts/venv.sh)/bin/python scripts/bench_views.py [--dir /tmp/lorafs-bench-views]
"""

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LORAFS = Path(os.environ.get("LORAFS_BIN", REPO / "target/release/lorafs"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mount import load_and_forward  # noqa: E402  (shared with bench_mount)
from scratch import claim_scratch, remove_scratch  # noqa: E402
CHECKPOINTS = 8
STEPS = [1000 * (k + 1) for k in range(CHECKPOINTS)]
MIB = 2**20


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def dd(path):
    sh("dd", f"if={path}", "of=/dev/null", "bs=1M", stderr=subprocess.DEVNULL)


class Mount:
    """`lorafs mount BASE MNT *args`, timed until `ready` (a path under MNT) reads."""

    def __init__(self, base, mnt, ready, *args):
        self.mnt = Path(mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sh(LORAFS, "mount", base, mnt, *args)
        try:
            wait_readable(self.mnt / ready, timeout=30)
        except Exception:
            self.__exit__()
            raise
        self.ready = time.perf_counter() - t

    def stats(self):
        text = (self.mnt / ".lorafs-stats").read_text()
        return dict(line.split(" ", 1) for line in text.splitlines())

    def peak_rss(self):
        pid = self.stats()["pid"]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmHWM in /proc/{pid}/status")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        sh(LORAFS, "unmount", self.mnt)


def read_head(path, size):
    """The first `size` bytes of `path`, or None while it cannot be opened or is shorter."""
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except OSError:
        return None
    return head if len(head) == size else None


def wait_readable(path, timeout, size=1):
    """Seconds until the first `size` bytes of `path` read, polling every 5 ms."""
    t = time.perf_counter()
    while read_head(path, size) is None:
        if time.perf_counter() - t > timeout:
            raise TimeoutError(f"{path} not readable after {timeout} s")
        time.sleep(0.005)
    return time.perf_counter() - t


def f32_factor_bytes(adapter_dir):
    """Bytes of an adapter's tensors when held as f32, from its safetensors header."""
    with open(adapter_dir / "adapter_model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name != "__metadata__":
            numel = 1
            for d in t["shape"]:
                numel *= d
            total += 4 * numel
    return total


def make_checkpoint(adapter, dest, step):
    """Move a generated adapter to `dest` and add what a Trainer checkpoint also holds.
    optimizer.pt and the rest are small random dummies: nothing reads them."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(adapter, dest)
    (dest / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model card\n")
    state = {"global_step": step, "epoch": step / 1000, "log_history": [
        {"step": s, "loss": 2.0 / (1 + s / 1000)} for s in range(100, step + 1, 100)]}
    (dest / "trainer_state.json").write_text(json.dumps(state, indent=2))
    for name, size in [("optimizer.pt", MIB), ("scheduler.pt", 1064), ("rng_state.pth", 14244),
                       ("training_args.bin", 5368)]:
        (dest / name).write_bytes(os.urandom(size))


def prepare(work, layers):
    """work/base, the catalog work/catalog/run1/checkpoint-*, and work/pending/checkpoint-9000
    (copied into the catalog by figure 4)."""
    catalog, pending = work / "catalog", work / "pending" / "checkpoint-9000"
    if (pending / "adapter_model.safetensors").exists():
        return work / "base", catalog, pending
    for old in ["base", "adapter", "catalog", "pending"] + [f"adapter-{k}" for k in range(2, CHECKPOINTS + 2)]:
        remove_scratch(work / old, work)
    sh(REPO / "target/release/examples/synth_model", work, "--layers", layers,
       "--adapters", CHECKPOINTS + 1, stderr=subprocess.DEVNULL)
    adapters = [work / "adapter"] + [work / f"adapter-{k}" for k in range(2, CHECKPOINTS + 2)]
    for adapter, step in zip(adapters, STEPS):
        make_checkpoint(adapter, catalog / "run1" / f"checkpoint-{step}", step)
    make_checkpoint(adapters[-1], pending, 9000)
    # A trainer's output directory holds more than checkpoints: the catalog must skip these.
    (catalog / "run1" / "runs").mkdir()
    (catalog / "run1" / "runs" / "events.out.tfevents.1.host").write_bytes(os.urandom(4096))
    return work / "base", catalog, pending


def time_to_mount(base, catalog, mnt, runs):
    """Figure 1: (catalog mount, single-adapter mount), median seconds until readable."""
    last = f"run1/checkpoint-{STEPS[-1]}"
    t_cat, t_one = [], []
    for _ in range(runs):
        with Mount(base, mnt, f"{last}/config.json", "--catalog", catalog) as m:
            t_cat.append(m.ready)
        with Mount(base, mnt, "config.json", "--adapter", catalog / last) as m:
            t_one.append(m.ready)
    return statistics.median(t_cat), statistics.median(t_one)


def new_checkpoint_visible(pending, dest, weights):
    """Figure 4: (seconds from the start of the copy until dest's view reads its first MiB
    of `weights`, seconds of the copy)."""
    seen = {}

    def poll():
        try:
            wait_readable(weights, timeout=60, size=MIB)
            seen["t"] = time.perf_counter()
        except TimeoutError:
            pass  # reported below

    poller = threading.Thread(target=poll)
    start = time.perf_counter()
    poller.start()
    shutil.copytree(pending, dest)
    copied = time.perf_counter() - start
    poller.join()
    if "t" not in seen:
        raise TimeoutError(f"{weights} not readable 60 s after copying {dest}")
    return seen["t"] - start, copied


def page_cache():
    """Bytes in the system's page cache (each view read stays there: its own merged pages)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Cached in /proc/meminfo")


def fresh_memory():
    """(seconds to fill 1 GiB of newly allocated memory, seconds to fill it again). On a VM
    whose host takes back freed memory (a balloon, free page reporting) the first is much
    slower, and every view read fills 1 GiB more of page cache than a load of the copy."""
    import numpy as np
    t = time.perf_counter()
    a = np.ones(2**30, dtype=np.uint8)
    first = time.perf_counter() - t
    t = time.perf_counter()
    a.fill(2)
    return first, time.perf_counter() - t


def load_views(m, copy):
    """Figure 3: from_pretrained + forward of each view of mount `m` in turn, each between
    two loads of the materialized `copy`, so that a machine that slows down or speeds up
    during the run moves both sides of each ratio. Returns (view seconds, each view's ratio
    to the mean of the copy loads around it, copy seconds)."""
    copies, views, ratios = [load_and_forward(copy)], [], []
    for step in STEPS:
        t = load_and_forward(m.mnt / "run1" / f"checkpoint-{step}")
        copies.append(load_and_forward(copy))
        views.append(t)
        ratios.append(t / statistics.mean(copies[-2:]))
        s = m.stats()
        print(f"   view run1/checkpoint-{step}: {t:.2f} s; copy before and after {copies[-2]:.2f} s,"
              f" {copies[-1]:.2f} s; ratio {ratios[-1]:.2f}x. Mount factor_bytes"
              f" {int(s['factor_bytes']) / MIB:.0f} MiB, cache_bytes {int(s['cache_bytes']) / MIB:.0f} MiB;"
              f" page cache {page_cache() / 2**30:.1f} GiB")
    return views, ratios, copies


def new_checkpoints(m, catalog, pending, shard, runs):
    """Figure 4, median over `runs` copies of `pending` into the catalog of mount `m`:
    (seconds until the view reads, seconds of the copy). The copies are removed."""
    t_new, t_copy = [], []
    for k in range(runs):
        dest = catalog / "run1" / f"checkpoint-{9000 + 1000 * k}"
        try:
            seen, copied = new_checkpoint_visible(pending, dest, m.mnt / dest.relative_to(catalog) / shard)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        t_new.append(seen)
        t_copy.append(copied)
    return statistics.median(t_new), statistics.median(t_copy)


def make_copy(base, checkpoint, out):
    """Figure 3's baseline: a materialized copy of `checkpoint` at `out`, its files in the
    page cache (as bench_mount.py)."""
    shutil.rmtree(out, ignore_errors=True)
    sh(LORAFS, "materialize", base, out, "--adapter", checkpoint, stdout=subprocess.DEVNULL)
    for f in out.glob("*.safetensors"):
        dd(f)


def table(rows):
    """rows: (measure, value, baseline, baseline's name, ratio, unit, digits, target, met)."""
    print("\n| measure | lorafs | baseline | ratio | target | met |\n|---|---:|---:|---:|---|---|")
    for measure, value, baseline, name, ratio, unit, digits, target, met in rows:
        print(f"| {measure} | {value:.{digits}f} {unit} | {baseline:.{digits}f} {unit} ({name}) |"
              f" {ratio:.2f}x | {target} | {met} |")


def measure(work, args):
    """Every figure, printed as measured; returns the summary table's rows."""
    base, catalog, pending = prepare(work, args.layers)
    shard = next(p.name for p in sorted(base.glob("*.safetensors")))
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    checkpoints = [catalog / "run1" / f"checkpoint-{s}" for s in STEPS]
    last = f"run1/checkpoint-{STEPS[-1]}"
    print(f"model: {base} ({model_bytes / 1e9:.2f} GB), catalog {catalog}: {CHECKPOINTS} checkpoints"
          f" run1/checkpoint-{STEPS[0]}..{STEPS[-1]} (rank-16 LoRA on every linear layer,"
          f" {checkpoints[0].joinpath('adapter_model.safetensors').stat().st_size / MIB:.1f} MiB each)")
    dd(base / shard)  # into the page cache, for every contender

    t_cat, t_one = time_to_mount(base, catalog, work / "mnt", args.runs)
    print(f"\n1. until {last}/config.json reads: --catalog mount {t_cat:.3f} s;"
          f" baseline, --adapter mount of one checkpoint {t_one:.3f} s; ratio {t_cat / t_one:.2f}x"
          f" (median of {args.runs})")

    copy = work / "materialized"
    make_copy(base, checkpoints[-1], copy)
    print(f"\n3. from_pretrained + forward of each view once, in turn, through one --catalog mount,"
          f" against a materialized copy of {last} in the page cache (the baseline of every view:"
          f" all have the same shapes), loaded before the first view and after each:")
    first, again = fresh_memory()
    print(f"   this machine: 1 GiB of new memory filled in {first:.2f} s, filled again in {again:.2f} s")
    with Mount(base, work / "mnt", f"{last}/config.json", "--catalog", catalog) as m:
        t_views, ratios, t_copies = load_views(m, copy)
        shutil.rmtree(copy)
        rss, s = m.peak_rss(), m.stats()
        budget, factors = int(s["cache_budget"]), int(s["factor_bytes"])
        adapters_f32 = sum(f32_factor_bytes(c) for c in checkpoints)
        print(f"\n2. server peak RSS after {CHECKPOINTS} views: {rss / MIB:.0f} MiB; cache budget"
              f" {budget / MIB:.0f} MiB + factor_bytes {factors / MIB:.0f} MiB = {(budget + factors) / MIB:.0f} MiB"
              f" (the {CHECKPOINTS} adapters as f32: {adapters_f32 / MIB:.0f} MiB); model {model_bytes / MIB:.0f} MiB")
        t_new, t_copy = new_checkpoints(m, catalog, pending, shard, args.runs)
        print(f"\n4. new checkpoint, from the start of its copy until {shard}'s first MiB reads:"
              f" {t_new:.3f} s; baseline, the copytree itself {t_copy:.3f} s; ratio {t_new / t_copy:.2f}x"
              f" (median of {args.runs})")

    yes = lambda ok: "yes" if ok else "no"
    over = (rss - budget - factors) / MIB
    t_mat, worst = statistics.median(t_copies), max(range(CHECKPOINTS), key=lambda k: ratios[k])
    return [
        ("1. `mount --catalog` (8 views) until config.json reads", t_cat, t_one,
         "`--adapter`, one checkpoint", t_cat / t_one, "s", 3, "<= 1 s", yes(t_cat <= 1)),
        ("2. server peak RSS after loading the 8 views", rss / MIB, (budget + factors) / MIB,
         "cache budget + factors", rss / (budget + factors), "MiB", 0, "budget + factors",
         "yes" if over <= 0 else f"no, {over:+.0f} MiB"),
        ("3. from_pretrained + forward, median of 8 views", statistics.median(t_views), t_mat,
         "materialized copy, median", statistics.median(ratios), "s", 2, "<= 1.3x",
         yes(statistics.median(ratios) <= 1.3)),
        (f"3. the same, slowest view (checkpoint-{STEPS[worst]})", t_views[worst],
         statistics.mean(t_copies[worst:worst + 2]), "copy loads around it", ratios[worst], "s", 2,
         "<= 1.3x", yes(ratios[worst] <= 1.3)),
        ("4. new checkpoint until its first MiB reads", t_new, t_copy,
         "`copytree` of it", t_new / t_copy, "s", 3, "<= 2 s", yes(t_new <= 2)),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/lorafs-bench-views")
    ap.add_argument("--runs", type=int, default=3, help="repeats of figures 1 and 4 (medians)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the generated model and catalog")
    args = ap.parse_args()

    work = Path(args.dir).absolute()
    claim_scratch(work)
    sh("cargo", "build", "--release", "--quiet", "--example", "synth_model", "--bin", "lorafs", cwd=REPO)
    try:
        table(measure(work, args))
    finally:
        remove_scratch(work / "materialized", work)
        if not args.keep:
            remove_scratch(work, work)


if __name__ == "__main__":
    main()
