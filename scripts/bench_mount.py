#!/usr/bin/env python3
"""Mount benchmarks (issue: `lorafs mount`), every figure a ratio to a baseline of the same run.

1. Cold read of a merged shard: `dd bs=1M` through a fresh mount (empty cache, `--warm
   never`) against `dd` of the base shard from the page cache, for several mount read-ahead
   sizes; then the default mount (background warm-up) read 2 s after mounting.
2. `from_pretrained` + one forward pass through a fresh mount (default options) against the
   same on a materialized copy (both with their files in the page cache, as a second load would be).
3. The mount's peak resident memory against its cache budget plus adapter factors.

The model is made by `examples/synth_model.rs` (a Llama with random weights, default about
1 GB of F16, and a rank-16 LoRA on every linear layer). Run as root (mount, read-ahead):

    $(bash scripts/venv.sh)/bin/python scripts/bench_mount.py [--dir /tmp/lorafs-bench]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scratch import claim_scratch, remove_scratch

REPO = Path(__file__).resolve().parent.parent
LORAFS = Path(os.environ.get("LORAFS_BIN", REPO / "target/release/lorafs"))


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def timed(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dd(path):
    sh("dd", f"if={path}", "of=/dev/null", "bs=1M", stderr=subprocess.DEVNULL)


class Mount:
    def __init__(self, base, adapter, mnt, *extra):
        self.mnt = Path(mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        sh(LORAFS, "mount", base, mnt, "--adapter", adapter, *extra)

    def stats(self):
        text = (self.mnt / ".lorafs-stats").read_text()
        return dict(line.split(" ", 1) for line in text.splitlines())

    def peak_rss(self):
        pid = self.stats()["pid"]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        sh(LORAFS, "unmount", self.mnt)


def load_and_forward(path):
    """from_pretrained + one forward pass, in a fresh interpreter (nothing cached in-process)."""
    code = (
        "import time, torch, transformers\n"
        "t = time.perf_counter()\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype='auto')\n"
        "with torch.no_grad(): m(torch.arange(16).unsqueeze(0)).logits.sum().item()\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/lorafs-bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the generated model")
    ap.add_argument("--no-warm", action="store_true",
                    help="load through mounts without background warm-up (--warm never)")
    args = ap.parse_args()

    work = Path(args.dir).absolute()
    claim_scratch(work)
    sh("cargo", "build", "--release", "--quiet", "--example", "synth_model", "--bin", "lorafs", cwd=REPO)
    if not (work / "base/config.json").exists():
        sh(REPO / "target/release/examples/synth_model", work, "--layers", args.layers)
    base, adapter = work / "base", work / "adapter"
    shard = next(p.name for p in sorted(base.glob("*.safetensors")))
    size = (base / shard).stat().st_size
    print(f"model: {base} ({size / 1e9:.2f} GB shard {shard}), rank-16 LoRA on every linear layer")

    dd(base / shard)  # into the page cache
    t_base = timed(lambda: dd(base / shard), args.runs)
    print(f"\n1. dd of the base shard from page cache: {t_base:.3f} s ({size / t_base / 1e9:.2f} GB/s)")
    print("   fresh mount, empty cache, dd of the merged shard:")
    for ra in [0, 1024, 4096, 8192]:
        times = []
        for _ in range(args.runs):
            with Mount(base, adapter, work / "mnt", "--read-ahead-kb", ra, "--warm", "never"):
                times.append(timed(lambda: dd(work / "mnt" / shard), 1))
        t = statistics.median(times)
        label = "kernel default 128 KiB" if ra == 0 else f"read-ahead {ra} KiB"
        print(f"   {label:>24}: {t:.3f} s ({size / t / 1e9:.2f} GB/s)  ratio to base {t / t_base:.2f}x")

    # The FUSE ceiling: the same read through a mount whose adapter changes one small tensor,
    # so nearly every byte is passed through.
    one = work / "adapter-one-tensor"
    if not one.exists():
        from safetensors.numpy import load_file, save_file
        one.mkdir()
        factors = load_file(adapter / "adapter_model.safetensors")
        save_file({k: v for k, v in factors.items() if ".layers.0.self_attn.q_proj." in k},
                  one / "adapter_model.safetensors")
        shutil.copy(adapter / "adapter_config.json", one)
    times = []
    for _ in range(args.runs):
        with Mount(base, one, work / "mnt", "--warm", "never"):
            times.append(timed(lambda: dd(work / "mnt" / shard), 1))
    t = statistics.median(times)
    print(f"   {'pass-through ceiling':>24}: {t:.3f} s ({size / t / 1e9:.2f} GB/s)  ratio to base {t / t_base:.2f}x"
          "  (read-ahead 4096 KiB, one 2048x2048 tensor merged)")

    # The default mount merges the model into the page cache in the background (--warm):
    # a reader that starts a little later finds it there.
    times = []
    for _ in range(args.runs):
        with Mount(base, adapter, work / "mnt"):
            time.sleep(2)
            times.append(timed(lambda: dd(work / "mnt" / shard), 1))
    t = statistics.median(times)
    print(f"   {'default (--warm), 2 s later':>24}: {t:.3f} s ({size / t / 1e9:.2f} GB/s)  ratio to base {t / t_base:.2f}x")

    out = work / "materialized"
    remove_scratch(out, work)
    sh(LORAFS, "materialize", base, out, "--adapter", adapter, stdout=subprocess.DEVNULL)
    for f in out.glob("*.safetensors"):
        dd(f)
    t_mat = statistics.median(load_and_forward(out) for _ in range(args.runs))
    mounted = []
    rss = budget = factors = 0
    for _ in range(args.runs):
        extra = ["--warm", "never"] if args.no_warm else []
        with Mount(base, adapter, work / "mnt", *extra) as m:
            mounted.append(load_and_forward(work / "mnt"))
            rss, s = m.peak_rss(), m.stats()
            budget, factors = int(s["cache_budget"]), int(s["factor_bytes"])
    t_mnt = statistics.median(mounted)
    print(f"\n2. from_pretrained + forward: materialized copy {t_mat:.2f} s, fresh mount {t_mnt:.2f} s,"
          f" ratio {t_mnt / t_mat:.2f}x")
    print(f"\n3. mount peak RSS {rss / 2**20:.0f} MiB; cache budget {budget / 2**20:.0f} MiB"
          f" + factors {factors / 2**20:.0f} MiB = {(budget + factors) / 2**20:.0f} MiB;"
          f" model {sum(f.stat().st_size for f in base.glob('*.safetensors')) / 2**20:.0f} MiB")
    remove_scratch(out, work)
    if not args.keep:
        remove_scratch(work, work)


if __name__ == "__main__":
    main()
