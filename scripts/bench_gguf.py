#!/usr/bin/env python3
"""The GGUF view (issue 13) against what users run today, with ratios to baselines of the
same run:

1. A merged GGUF on disk (F16):
   - PEFT `merge_and_unload` + `save_pretrained` (and the tokenizer), then llama.cpp's
     `convert_hf_to_gguf.py --outtype f16` on that directory: the pipeline users run;
   - `convert_hf_to_gguf.py` run on a `lorafs mount` (mount included);
   - `lorafs materialize BASE OUT.gguf --adapter ... --gguf F16` (target: >= 20x faster
     than the PEFT pipeline), and the same with `--gguf Q8_0` (quantized as it is written;
     the pipeline row stays the F16 one).
   The three files are checked to be the same model (lorafs's and the mount-converted file
   against the PEFT pipeline's: same tensors, types and shapes; lorafs's against the
   mount-converted one: identical but for the keys named by the directory).
2. `llama_cpp.Llama` loading (and evaluating a few tokens) from a fresh mount's
   model-F16.gguf against the converter's file on disk (target <= 1.3x), with the page
   cache dropped before each load (as scripts/bench_large.sh does; needs root), and again
   with the files in the page cache (the base's, for the mount). Printed beside: the base
   read cold with `cat` in the same rounds (what any mount must read from disk first) and
   the spread of the cold disk loads (this machine's disk varies from run to run).
3. The I/O of that load alone: the file mapped as llama.cpp maps it (`MAP_SHARED |
   MAP_POPULATE`, which faults in every page) from a fresh mount and from disk, page cache
   dropped before each, in alternating order; and the same from a fresh mount with the base
   in the page cache. A load is this plus llama.cpp's own work, the same for both files.

The model is made by `examples/synth_model.rs` (default about 1 GB of F16, a rank-16 LoRA on
every linear layer, as scripts/bench_materialize.py), plus a small SentencePiece tokenizer
(trained here: the converter needs one; the vocabulary is padded to the model's). The
llama.cpp stack comes from scripts/gguf-env.sh (built on first use). Run as root:

    $(bash scripts/venv.sh)/bin/python scripts/bench_gguf.py [--dir /tmp/lorafs-bench-gguf] [--runs 3]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LORAFS = Path(os.environ.get("LORAFS_BIN", REPO / "target/release/lorafs"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import gguf_compare as gc  # noqa: E402  (the GGUF comparison)
import gguf_models as gm  # noqa: E402  (the llama.cpp stack, the tokenizer)
from coldio import drop_caches, llama_load, populate  # noqa: E402  (beside this script)
from scratch import claim_scratch, remove_scratch  # noqa: E402


def fresh(work, name):
    """work/name, removed first if a previous step or run left it (inside the claimed
    scratch directory only)."""
    p = work / name
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    return p


def timed(args, env=None):
    """Seconds of one command, after flushing the previous one's dirty pages."""
    os.sync()
    t = time.perf_counter()
    proc = subprocess.run([str(a) for a in args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return elapsed


class Mount:
    def __init__(self, base, adapter, mnt, *extra):
        self.mnt = Path(mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(LORAFS), "mount", str(base), str(self.mnt), "--adapter", str(adapter), *extra], check=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run([str(LORAFS), "unmount", str(self.mnt)], check=True)


def add_tokenizer(base, work, stack):
    """A SentencePiece tokenizer.model (and transformers' files) in the synthetic base."""
    if (base / "tokenizer.model").exists():
        return
    stack.import_paths()
    spm = gm.train_spm(work / "spm")
    gm.spm_tokenizer(spm).save_pretrained(base)
    shutil.copy(spm, base / "tokenizer.model")


PEFT_SAVE = """
import shutil, sys, torch, transformers, peft
base, adapter, out = sys.argv[1:]
m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype='auto')
m = peft.PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(base).save_pretrained(out)
shutil.copy(f"{base}/tokenizer.model", out)  # transformers 5 does not write it; the converter needs it
"""

def cold_cat(path):
    drop_caches()
    return timed(["cat", path])


def same_model(got, want, exact):
    """How lorafs's file compares with a converter's. exact: identical but for the keys
    named by the directory. Otherwise (PEFT rounds differently): the same metadata and
    tensor list, and how many tensors are byte-identical."""
    problems, excepted = gc.gguf_differences(got, want)
    if exact:
        if problems:
            return f"DIFFERENT: {problems[0]}"
        return "identical but for " + (", ".join(sorted(excepted)) or "nothing")
    layout = [p for p in problems if not p.startswith("tensor ") or "data differ" not in p]
    if layout:
        return f"DIFFERENT: {layout[0]}"
    n = len(gc.parse_gguf(want).tensors)
    return f"same metadata and tensors; {n - len(problems)} of {n} tensors byte-identical (PEFT rounds differently)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/lorafs-bench-gguf")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="loads per contender (median)")
    ap.add_argument("--keep", action="store_true", help="keep the model and the outputs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark mounts and drops the page cache")

    work = Path(args.dir).absolute()
    claim_scratch(work)
    stack = gm.build_stack()
    env = stack.env()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "synth_model", "--bin", "lorafs"],
                   cwd=REPO, check=True)
    if not (work / "base/config.json").exists():
        subprocess.run([REPO / "target/release/examples/synth_model", work, "--layers", str(args.layers)], check=True)
    base, adapter = work / "base", work / "adapter"
    add_tokenizer(base, work, stack)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"model {base}: {size / 1e9:.2f} GB F16, rank-16 LoRA on every linear layer; llama.cpp stack {stack.root}")
    subprocess.run(["cat", *base.glob("*.safetensors")], check=True, stdout=subprocess.DEVNULL)  # page cache, for all

    # --- 1. a merged GGUF on disk
    peft_dir, peft_gguf = fresh(work, "peft"), fresh(work, "peft.gguf")
    t_peft_merge = timed([sys.executable, "-c", PEFT_SAVE, base, adapter, peft_dir], env)
    t_peft_convert = timed([sys.executable, stack.converter, peft_dir, "--outtype", "f16", "--outfile", peft_gguf], env)
    shutil.rmtree(peft_dir)
    # The pipeline returns with its file in the page cache; `materialize` returns with its
    # file on disk (fsynced). What writing the pipeline's file back then costs, for reference.
    t0 = time.perf_counter()
    os.sync()
    t_peft_sync = time.perf_counter() - t0

    mnt, mnt_gguf = work / "mnt", fresh(work, "from-mount.gguf")
    t0 = time.perf_counter()
    with Mount(base, adapter, mnt):
        timed([sys.executable, stack.converter, mnt, "--outtype", "f16", "--outfile", mnt_gguf], env)
    t_mount_convert = time.perf_counter() - t0

    lorafs_gguf = fresh(work, "lorafs.gguf")
    t_lorafs = timed([LORAFS, "materialize", base, lorafs_gguf, "--adapter", adapter, "--gguf", "F16"])
    q8_gguf = fresh(work, "lorafs-q8_0.gguf")
    t_q8 = timed([LORAFS, "materialize", base, q8_gguf, "--adapter", adapter, "--gguf", "Q8_0"])
    q8_gguf.unlink()

    t_pipeline = t_peft_merge + t_peft_convert
    print(f"\n{'a merged F16 GGUF on disk':<58}{'seconds':>9}{'vs PEFT':>9}{'speed-up':>10}")
    rows = [
        ("PEFT merge_and_unload + save_pretrained", t_peft_merge),
        ("  then convert_hf_to_gguf.py --outtype f16", t_peft_convert),
        ("PEFT + convert_hf_to_gguf.py (the pipeline)", t_pipeline),
        ("  the pipeline + sync (its file on disk)", t_pipeline + t_peft_sync),
        ("lorafs mount + convert_hf_to_gguf.py on the mount", t_mount_convert),
        ("lorafs materialize --gguf F16 (file on disk)", t_lorafs),
        ("lorafs materialize --gguf Q8_0 (file on disk)", t_q8),
    ]
    for name, t in rows:
        print(f"{name:<58}{t:>9.2f}{t / t_pipeline:>8.2f}x{t_pipeline / t:>9.1f}x")
    print(f"target: lorafs materialize --gguf >= 20x faster than the pipeline: {t_pipeline / t_lorafs:.1f}x"
          f" (both files on disk: {(t_pipeline + t_peft_sync) / t_lorafs:.1f}x)")
    print(f"lorafs's file vs the converter's from the mount: {same_model(lorafs_gguf, mnt_gguf, exact=True)}")
    print(f"lorafs's file vs the PEFT pipeline's: {same_model(lorafs_gguf, peft_gguf, exact=False)}")

    # --- 2. llama.cpp loading the GGUF
    results, base_reads = {}, []
    for cold in (True, False):
        disk, mounted = [], []
        for _ in range(args.runs):
            if cold:
                # What any mount must read first: the base's safetensors from disk.
                drop_caches()
                base_reads.append(timed(["cat", *base.glob("*.safetensors")]))
                drop_caches()
            else:
                # Both files into the page cache: the base too, which the cold rounds' mounts
                # read around the page cache (`--direct-io auto` on a base out of it).
                subprocess.run(["cat", *base.glob("*.safetensors")], check=True, stdout=subprocess.DEVNULL)
                llama_load(mnt_gguf, env)
            disk.append(llama_load(mnt_gguf, env))
            if cold:
                drop_caches()
            t0 = time.perf_counter()
            with Mount(base, adapter, mnt, "--gguf", "F16"):
                t_mounted = time.perf_counter() - t0
                load = llama_load(mnt / "model-F16.gguf", env)
            mounted.append((t_mounted + load, load))
        results[cold] = (statistics.median(disk), statistics.median(m for m, _ in mounted),
                         statistics.median(lo for _, lo in mounted), disk)
    print(f"\n{'llama_cpp.Llama load + eval of a short prompt, median of ' + str(args.runs):<58}{'seconds':>9}{'vs disk':>9}")
    for cold, label in ((True, "page cache dropped before each"), (False, "files in the page cache")):
        disk, mount_total, mount_load, _ = results[cold]
        print(f"{label}:")
        print(f"{'  the converter file on disk':<58}{disk:>9.2f}{1:>8.2f}x")
        print(f"{'  fresh lorafs mount --gguf F16: mount + load':<58}{mount_total:>9.2f}{mount_total / disk:>8.2f}x")
        print(f"{'  of which the load':<58}{mount_load:>9.2f}{mount_load / disk:>8.2f}x")
    print(f"target: fresh mount <= 1.3x the file on disk (page cache dropped): {results[True][1] / results[True][0]:.2f}x")
    floor = statistics.median(base_reads)
    print(f"the base read cold (cat, same rounds): {floor:.2f} s; the converter's file cold (cat, once): "
          f"{cold_cat(mnt_gguf):.2f} s; spread of the cold disk loads: "
          f"{min(results[True][3]):.2f}-{max(results[True][3]):.2f} s")

    # --- 3. the mapping alone
    maps = {"disk": [], "mount": [], "mount, base cached": []}
    for i in range(args.runs):
        for who in ("disk", "mount") if i % 2 == 0 else ("mount", "disk"):
            drop_caches()
            if who == "disk":
                maps[who].append(populate(mnt_gguf))
                continue
            t0 = time.perf_counter()
            with Mount(base, adapter, mnt, "--gguf", "F16"):
                maps[who].append(time.perf_counter() - t0 + populate(mnt / "model-F16.gguf"))
        subprocess.run(["cat", *base.glob("*.safetensors")], check=True, stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        with Mount(base, adapter, mnt, "--gguf", "F16"):
            maps["mount, base cached"].append(time.perf_counter() - t0 + populate(mnt / "model-F16.gguf"))
    print(f"\n{'MAP_SHARED|MAP_POPULATE of the file, median of ' + str(args.runs):<58}{'seconds':>9}{'vs disk':>9}")
    disk = statistics.median(maps["disk"])
    for who, label in (("disk", "the converter's file, page cache dropped"),
                       ("mount", "fresh mount + map, page cache dropped"),
                       ("mount, base cached", "fresh mount + map, the base in the page cache")):
        t = statistics.median(maps[who])
        print(f"{'  ' + label:<58}{t:>9.2f}{t / disk:>8.2f}x")

    if not args.keep:
        for p in ("peft.gguf", "from-mount.gguf", "lorafs.gguf"):
            fresh(work, p)
        remove_scratch(work, work)


if __name__ == "__main__":
    main()
