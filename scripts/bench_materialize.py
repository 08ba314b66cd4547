#!/usr/bin/env python3
"""lorafs against what users run today, on the same model, with ratios to baselines of the
same run:

- `cp -r` of the base directory (a plain copy: the floor for writing a merged copy), and the
  same followed by `sync` (a copy on disk, as `materialize`'s output is when it returns);
- PEFT: `from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload()` +
  `save_pretrained()`, in a fresh interpreter (time and peak RSS);
- `lorafs materialize` (time and peak RSS), default kernel and LORAFS_KERNEL=scalar;
- a merged model ready for use: PEFT's load + merge against `lorafs mount` + `from_pretrained`.

The model is made by `examples/synth_model.rs` (default about 1 GB of F16, a rank-16 LoRA on
every linear layer). Run:

    $(bash scripts/venv.sh)/bin/python scripts/bench_materialize.py [--dir /tmp/lorafs-bench]
"""

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LORAFS = Path(os.environ.get("LORAFS_BIN", REPO / "target/release/lorafs"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(args, env=ENV):
    """Run a command; return (seconds, its peak RSS in bytes, stdout). Dirty pages left by
    the previous contender are flushed first, so no one pays for another's writeback."""
    os.sync()
    with tempfile.NamedTemporaryFile(mode="r") as report:
        t = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *map(str, args)],
                             check=True, capture_output=True, env=env)
        elapsed = time.perf_counter() - t
        peak_kib = int(report.read().strip().splitlines()[-1])
    return elapsed, peak_kib * 1024, out.stdout.decode(errors="replace")


def python(code):
    return run([sys.executable, "-c", code])


def peft_merge(base, adapter, out):
    return python(
        "import torch, transformers, peft\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype='auto')\n"
        f"m = peft.PeftModel.from_pretrained(m, {str(adapter)!r}).merge_and_unload()\n"
        + (f"m.save_pretrained({str(out)!r})\n" if out else "with torch.no_grad(): m(torch.arange(16)[None]).logits.sum().item()\n")
    )


def load(path):
    return python(
        "import torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype='auto')\n"
        "with torch.no_grad(): m(torch.arange(16)[None]).logits.sum().item()\n"
    )


def gb(x):
    return f"{x / 2**30:.2f} GiB" if x else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/lorafs-bench")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.dir)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "synth_model", "--bin", "lorafs"],
                   cwd=REPO, check=True)
    if not (work / "base/config.json").exists():
        subprocess.run([REPO / "target/release/examples/synth_model", work, "--layers", str(args.layers)], check=True)
    base, adapter = work / "base", work / "adapter"
    size = sum(f.stat().st_size for f in base.iterdir())
    print(f"model {base}: {size / 1e9:.2f} GB F16, rank-16 LoRA on every linear layer")
    run(["cat", *base.glob("*.safetensors")])  # page cache, for everyone alike

    rows = []
    def out_dir(name):
        p = work / name
        shutil.rmtree(p, ignore_errors=True)
        return p

    # Each contender starts with nothing left to write back (os.sync), so none pays for the
    # previous one's dirty pages. `materialize` returns with its output on disk; the copy
    # and PEFT do not sync, hence the second copy row.
    os.sync()
    t, _, _ = run(["cp", "-r", base, out_dir("copy")])
    rows.append(("cp -r base (plain copy)", t, None))
    shutil.rmtree(work / "copy")
    os.sync()
    t, _, _ = run(["sh", "-c", 'cp -r "$0" "$1" && sync', base, out_dir("copy")])
    rows.append(("cp -r base + sync (copy on disk)", t, None))
    shutil.rmtree(work / "copy")
    os.sync()
    t, rss, _ = peft_merge(base, adapter, out_dir("peft"))
    rows.append(("PEFT merge_and_unload + save_pretrained", t, rss))
    shutil.rmtree(work / "peft")
    os.sync()
    t, rss, _ = run([LORAFS, "materialize", base, out_dir("lorafs"), "--adapter", adapter])
    rows.append(("lorafs materialize (output synced)", t, rss))
    os.sync()
    t, rss, _ = run([LORAFS, "materialize", base, out_dir("lorafs-scalar"), "--adapter", adapter],
                    env={**ENV, "LORAFS_KERNEL": "scalar"})
    rows.append(("lorafs materialize, LORAFS_KERNEL=scalar", t, rss))
    same = all(filecmp.cmp(f, work / "lorafs-scalar" / f.name, shallow=False)
               for f in (work / "lorafs").iterdir())
    shutil.rmtree(work / "lorafs")
    shutil.rmtree(work / "lorafs-scalar")

    copy, peft_t = rows[0][1], rows[2][1]
    print(f"default and scalar kernels wrote identical bytes: {same}")
    print(f"\n{'writing a merged copy':<44}{'seconds':>9}{'vs copy':>9}{'vs PEFT':>9}{'peak RSS':>12}")
    for name, t, rss in rows:
        print(f"{name:<44}{t:>9.2f}{t / copy:>8.2f}x{t / peft_t:>8.2f}x{gb(rss):>12}")

    t_peft, rss_peft, _ = peft_merge(base, adapter, None)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([LORAFS, "mount", base, mnt, "--adapter", adapter], check=True)
    try:
        t_load, rss_load, _ = load(mnt)
        t_mount = time.perf_counter() - t0
    finally:
        subprocess.run([LORAFS, "unmount", mnt], check=True)
    print(f"\n{'a merged model in memory, ready':<44}{'seconds':>9}{'vs PEFT':>9}{'peak RSS':>12}")
    print(f"{'PEFT load + merge_and_unload + forward':<44}{t_peft:>9.2f}{1:>8.2f}x{gb(rss_peft):>12}")
    print(f"{'lorafs mount + from_pretrained + forward':<44}{t_mount:>9.2f}{t_mount / t_peft:>8.2f}x{gb(rss_load):>12}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
