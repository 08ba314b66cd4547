#!/usr/bin/env python3
"""lorafs demo: mount a tiny base model + LoRA adapter as the merged model, use it with
transformers, and check it against PEFT's merge_and_unload.

Run through scripts/demo.sh (it builds lorafs and the Python environment first), or:
    python scripts/demo.py [--lorafs target/release/lorafs] [--keep]

Everything is generated locally (random weights, a tokenizer trained on a few sentences);
nothing is downloaded. Exits non-zero if the mounted model does not agree with PEFT.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_k] = _v
warnings.filterwarnings("ignore")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Agreement bounds (bf16 base, one adapter): PEFT adds the f32 delta to the weight and rounds
# once, as lorafs does, so every parameter is equal or 1 ulp apart; the logits of a forward
# pass in bf16 then agree to a small fraction of their scale.
MAX_PARAM_ULPS = 1
MAX_LOGIT_REL = 2e-2


def step(msg):
    print(f"==> {msg}", flush=True)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    int_dtype, sign_bit = {
        torch.float32: (torch.int32, 31),
        torch.float16: (torch.int16, 15),
        torch.bfloat16: (torch.int16, 15),
    }[a.dtype]

    def ordered(t):
        i = t.contiguous().view(int_dtype).to(torch.int64)
        mag = i & ((1 << sign_bit) - 1)
        return torch.where(i < 0, -mag, mag)

    return int((ordered(a) - ordered(b)).abs().max())


def load_fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", HERE / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def unmount(lorafs: Path, mnt: Path):
    if not os.path.ismount(mnt):
        return
    p = subprocess.run([str(lorafs), "unmount", str(mnt)], capture_output=True, text=True, timeout=60)
    for _ in range(50):
        if not os.path.ismount(mnt):
            return
        time.sleep(0.1)
    print(f"lorafs unmount failed ({p.returncode}): {p.stderr.strip()}; using umount -l", file=sys.stderr)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


TEXT = "Once upon a time there was a tiny llama that lived in a temporary directory."
PROMPT = "Once upon a time"


def train_adapter(fx, base: Path, out: Path, tokenizer, steps: int = 80):
    """A real (if tiny) LoRA fine-tune: all linear layers, r=16, on one sentence, so the
    merged model says something the base does not. A second or so on a laptop CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(7)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.save_pretrained(str(out))
    return float(loss)


def generate(model, tok, max_new_tokens=28):
    batch = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, batch["input_ids"].shape[1] :]


def compare(mnt: Path, base: Path, adapter: Path) -> dict:
    """Load the mount with transformers, generate, and compare with PEFT. Returns plain
    values only, so that no tensor mapped from the mount outlives this call (the mount
    can then be unmounted)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mnt))
    base_model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    model = AutoModelForCausalLM.from_pretrained(str(mnt)).eval()
    r = dict(dtype=str(model.dtype))
    r["base_text"] = tok.decode(generate(base_model, tok))
    gen = generate(model, tok)
    r["merged_text"] = tok.decode(gen)

    ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=model.dtype)
    ref = PeftModel.from_pretrained(ref, str(adapter)).merge_and_unload().eval()
    ours, theirs = model.state_dict(), ref.state_dict()
    if ours.keys() != theirs.keys():
        raise SystemExit(f"parameter names differ: {sorted(set(ours) ^ set(theirs))}")
    r["tensors"] = len(ours)
    r["max_ulp"], r["worst"] = max(((ulp_distance(ours[k], theirs[k]), k) for k in ours), default=(0, ""))
    batch = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        a = model(**batch).logits.float()
        b = ref(**batch).logits.float()
    r["logit_diff"] = float((a - b).abs().max())
    r["logit_scale"] = float(b.abs().max())
    r["same_generation"] = torch.equal(gen, generate(ref, tok))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--lorafs", type=Path, default=Path(os.environ.get("LORAFS_BIN", REPO / "target/release/lorafs")))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    lorafs = args.lorafs.resolve()
    if not os.access(lorafs, os.X_OK):
        print(f"lorafs binary not found at {lorafs} (cargo build --release)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    fx = load_fixture_module()
    tmp = Path(tempfile.mkdtemp(prefix="lorafs-demo-"))
    mnt = tmp / "merged"
    try:
        step(f"a tiny Llama (random weights, bf16) and a LoRA adapter trained on one sentence, in {tmp}")
        base, adapter = tmp / "base", tmp / "adapter"
        tokenizer = fx.build_tokenizer()
        fx.save_base(fx.build_base(), tokenizer, base, torch.bfloat16, None)
        t0 = time.time()
        loss = train_adapter(fx, base, adapter, tokenizer)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        print(f"    trained in {time.time() - t0:.1f} s (loss {loss:.2f}); {size / 1e6:.1f} MB on disk")

        step(f"lorafs mount base {mnt} --adapter adapter")
        mnt.mkdir()
        t0 = time.time()
        p = subprocess.run(
            [str(lorafs), "mount", str(base), str(mnt), "--adapter", str(adapter)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if p.returncode != 0 or not os.path.ismount(mnt):
            print(f"lorafs mount failed ({p.returncode}):\n{p.stdout}{p.stderr}", file=sys.stderr)
            if not Path("/dev/fuse").exists():
                print("hint: /dev/fuse is missing (modprobe fuse; in a container, --device /dev/fuse)", file=sys.stderr)
            return 1
        print(f"    mounted in {time.time() - t0:.2f} s: {', '.join(sorted(x.name for x in mnt.iterdir()))}")

        step("transformers: from_pretrained(mount), greedy generation; PEFT merge_and_unload for reference")
        r = compare(mnt, base, adapter)
        gc.collect()
        print(f"    prompt {PROMPT!r}")
        print(f"    base model    -> {r['base_text']!r}")
        print(f"    lorafs mount  -> {r['merged_text']!r}")
        print(f"    PEFT merge gives the same tokens: {r['same_generation']}")
        print(
            f"    parameters: {r['tensors']} tensors ({r['dtype']}), max difference {r['max_ulp']} ulp"
            + (f" (in {r['worst']})" if r["max_ulp"] else "")
        )
        print(f"    logits: max |lorafs - PEFT| = {r['logit_diff']:.3g} (logit scale {r['logit_scale']:.3g})")

        ok = r["max_ulp"] <= MAX_PARAM_ULPS and r["logit_diff"] <= MAX_LOGIT_REL * r["logit_scale"]
        if ok:
            step(f"OK: the mount agrees with PEFT's merge (<= {MAX_PARAM_ULPS} ulp per parameter)")
        else:
            step(
                f"FAIL: expected <= {MAX_PARAM_ULPS} ulp per parameter and logits within "
                f"{MAX_LOGIT_REL:g} x their scale"
            )
        return 0 if ok else 1
    finally:
        step("unmount and clean up")
        gc.collect()
        unmount(lorafs, mnt)
        if args.keep:
            print(f"    kept {tmp}")
        elif not os.path.ismount(mnt):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
