"""QLoRA bases: a base quantized with bitsandbytes (4-bit nf4/fp4 with and without double
quantization, 8-bit), served dequantized with a LoRA merged, against transformers'
dequantize() followed by PEFT's merge_and_unload().

The fixtures and references are made by bnb_fixtures.py in a subprocess that has
bitsandbytes on its path ($LORAFS_BNB_ENV, which scripts/test.sh sets; else the folder
scripts/bnb-env.sh caches it in). This process runs without bitsandbytes: the merged
directories and mounts load as plain models. When LORAFS_BNB_ENV is set, a missing
bitsandbytes is a failure; without it the module is skipped, saying why.

What is asserted (docs/SEMANTICS.md, "Quantized bases (bitsandbytes)"):
- weights no adapter touches: bit-identical to dequantize() (the model's dtype), and with
  --dtype f32 bit-identical to bitsandbytes' own f32 dequantization;
- merged weights: lorafs rounds W32 + Δ once (W32 bitsandbytes' f32 dequantization), so it
  is within 1 ulp of the f64 sum everywhere; the reference rounds W32 to the model's dtype
  first, so the two differ by at most ½ulp(lorafs) + ½ulp(reference) + ½ulp(W), and by at
  most 1 ulp where the result is not smaller than W (no cancellation);
- no quantization tensor and no quantization_config in what is served;
- from_pretrained of a mount gives the reference's logits (rtol 2e-2: bfloat16 model).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, load_model, load_safetensors_dir, ulp_distance, ulp_of

REQUIRED = bool(os.environ.get("LORAFS_BNB_ENV"))


def bnb_env() -> Path | None:
    env = os.environ.get("LORAFS_BNB_ENV")
    if env:
        return Path(env)
    try:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "bnb-env.sh")], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


CASES = ["nf4-dq", "nf4", "fp4-dq", "fp4", "int8", "nf4-dq-sharded"]


@pytest.fixture(scope="module")
def fixtures():
    env = bnb_env()
    if env is None or not (env / "bitsandbytes").is_dir():
        if REQUIRED:
            pytest.fail(f"LORAFS_BNB_ENV is set but holds no bitsandbytes: {env}")
        pytest.skip("no bitsandbytes (scripts/bnb-env.sh installs it)")
    root = Path(tempfile.mkdtemp(prefix="lorafs-bnb-"))
    try:
        pythonpath = os.pathsep.join(filter(None, [str(env), os.environ.get("PYTHONPATH")]))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("bnb_fixtures.py")), str(root)],
            env={**os.environ, "PYTHONPATH": pythonpath},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_this_process_has_no_bitsandbytes():
    # What loads the merged directories and mounts below must not need it.
    assert importlib.util.find_spec("bitsandbytes") is None


def adapter_terms(lora: Path) -> dict[str, torch.Tensor]:
    """{base weight: s·B@A in f64} of a PEFT LoRA."""
    cfg = json.loads((lora / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    raw = load_file(lora / "adapter_model.safetensors")
    out = {}
    for key, a in raw.items():
        if ".lora_A." in key:
            b = raw[key.replace(".lora_A.", ".lora_B.")]
            name = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            out[name] = s * (b.double() @ a.double())
    return out


def check_served(got: dict, case_dir: Path, lora: Path):
    ref = load_file(case_dir / "peft.safetensors")
    dequant = load_file(case_dir / "dequant.safetensors")
    w32 = load_file(case_dir / "w32.safetensors")
    terms = adapter_terms(lora)
    assert set(got) == set(ref), set(got) ^ set(ref)
    assert len(w32) > 0 and set(terms) <= set(w32)
    for name in sorted(got):
        L, P = got[name], ref[name]
        assert L.dtype == P.dtype == torch.bfloat16 and L.shape == P.shape, (name, L.dtype, P.dtype)
        if name not in terms:
            assert torch.equal(L.view(torch.int16), dequant[name].view(torch.int16)), name
            continue
        X = w32[name].double() + terms[name]
        # Ours: one rounding of an f32 sum, so within 1 ulp of the f64 sum.
        assert int(ulp_distance(L, X.to(torch.bfloat16)).max()) <= 1, name
        # The reference rounded W first: at most half an ulp of W further.
        W = dequant[name]
        bound = 0.5 * ulp_of(L) + 0.5 * ulp_of(P) + 0.5 * ulp_of(W) + 1e-6 * X.abs()
        assert bool(((L.double() - P.double()).abs() <= bound).all()), name
        no_cancel = X.abs() >= W.double().abs()
        assert int(ulp_distance(L, P)[no_cancel].max()) <= 1, name


def test_the_sharded_base_has_quantized_weights_in_several_shards(fixtures):
    """The premise of the nf4-dq-sharded case: packed weights and their quant state spread
    over several shards (transformers keeps each weight's state in its shard)."""
    index = json.loads((fixtures / "nf4-dq-sharded" / "base" / "model.safetensors.index.json").read_text())
    where = index["weight_map"]
    shards = {where[k] for k in where if k + ".absmax" in where}
    assert len(shards) > 1, shards


@pytest.mark.parametrize("case", CASES)
def test_materialize_matches_dequantize_then_peft(fixtures, lorafs, scratch, case):
    out = scratch / "out"
    lorafs.run("materialize", fixtures / case / "base", out, "--adapter", fixtures / "lora", check=True)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    check_served(load_safetensors_dir(out), fixtures / case, fixtures / "lora")


@pytest.mark.parametrize("case", CASES)
def test_f32_is_bitsandbytes_dequantization_exactly(fixtures, lorafs, scratch, case):
    out = scratch / "out"
    lorafs.run(
        "materialize", fixtures / case / "base", out, "--adapter", fixtures / "lora", "--dtype", "f32", check=True
    )
    got = load_safetensors_dir(out)
    w32 = load_file(fixtures / case / "w32.safetensors")
    terms = adapter_terms(fixtures / "lora")
    for name, w in w32.items():
        if name in terms:
            X = w.double() + terms[name]
            assert float((got[name].double() - X).abs().max()) <= 1e-5 * float(X.abs().max()), name
        else:
            assert torch.equal(got[name].view(torch.int32), w.view(torch.int32)), name


@pytest.mark.parametrize("case", ["nf4-dq", "fp4", "int8", "nf4-dq-sharded"])
def test_mount_loads_without_bitsandbytes(fixtures, lorafs, mounter, case):
    mnt = mounter(fixtures / case / "base", [(fixtures / "lora", 1.0)])
    config = json.loads((mnt / "config.json").read_text())
    assert "quantization_config" not in config
    check_served(load_safetensors_dir(mnt), fixtures / case, fixtures / "lora")
    model = load_model(mnt)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 33, 2, 17, 60, 4]])).logits.float()
    want = load_file(fixtures / case / "logits.safetensors")["logits"]
    torch.testing.assert_close(logits, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    del model


def test_other_quantization_methods_are_refused(fixtures, lorafs, scratch):
    base = scratch / "gptq"
    shutil.copytree(fixtures / "base16", base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    proc = lorafs.run("materialize", base, scratch / "out", "--adapter", fixtures / "lora")
    assert proc.returncode != 0
    assert "gptq" in proc.stderr and "use the 16-bit base model" in proc.stderr, proc.stderr
    assert not (scratch / "out").exists()
