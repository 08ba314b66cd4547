"""Mounts of named views (`lorafs mount BASE MNT --view NAME=SPEC ...`) and `--dtype`, with
the real transformers + PEFT.

1. The blog-post workflow: a training run left checkpoints run/checkpoint-100, -200, -300
   (one LoRA config, different weights); one mount serves each as a merged model, plus
   weighted mixes; each view loads with `from_pretrained` as PEFT's merge of its spec.
2. `--dtype`: a merge stored in another dtype is PEFT's f32 merge `.to(dtype)` within one
   rounding (1 ulp, compared on the bit patterns), config.json says the dtype, and
   `from_pretrained(dtype="auto")` loads it in that dtype.
3. A view's files are `lorafs materialize` of its spec, byte for byte.

The bounds are derived in conftest.E2E.check_merged."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from conftest import files_of, listing, load_model, peft_merge

# The checkpoints of the run: the fixtures ckpt1..3 (scripts/make_fixtures.py: r=8,
# alpha=16, all-linear, init_lora_weights=False, seeds 201..203), as a Trainer lays them out.
STEPS = {100: "ckpt1", 200: "ckpt2", 300: "ckpt3"}

RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # as check_merged


@pytest.fixture(scope="module")
def run(e2e):
    """OUT/run/checkpoint-{100,200,300}: the PEFT adapter files plus the files a transformers
    Trainer writes next to them (state, pickled optimizer and RNG state), which lorafs must
    ignore (it never unpickles)."""
    root = Path(tempfile.mkdtemp(prefix="lorafs-e2e-run-"))
    try:
        for step, name in STEPS.items():
            d = root / "run" / f"checkpoint-{step}"
            shutil.copytree(e2e.adapter(name), d)
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 300}))
            for pickled in ["optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"]:
                torch.save({"step": step}, d / pickled)
            (d / "README.md").write_text(f"# checkpoint {step}\n")
        yield root / "run"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ckpt(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step}"


def view_args(views: dict) -> list[str]:
    """{name: [(adapter dir, weight)]} → `--view NAME=SPEC` arguments."""
    args = []
    for name, adapters in views.items():
        spec = ",".join(f"{p}:{w!r}" if w != 1.0 else str(p) for p, w in adapters)
        args += ["--view", f"{name}={spec}"]
    return args


def hashes(d: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `d`."""
    return {rel: hashlib.sha256((d / rel).read_bytes()).hexdigest() for rel in files_of(d)}


def assert_bits_within(L: torch.Tensor, P: torch.Tensor, name: str, max_ulp: int, e2e):
    """`L` and `P` (same dtype) at most `max_ulp` apart, on their bit patterns."""
    assert L.dtype == P.dtype and L.shape == P.shape, (name, L.dtype, P.dtype, L.shape, P.shape)
    ulps = e2e.ulp_distance(L, P)
    if int(ulps.max()) > max_ulp:
        i = int(ulps.argmax())
        pytest.fail(
            f"{name}: {int((ulps > max_ulp).sum())} of {ulps.numel()} values more than "
            f"{max_ulp} ulp apart; worst [{i}]: lorafs {float(L.flatten()[i])!r} "
            f"PEFT {float(P.flatten()[i])!r} ({int(ulps.max())} ulps)"
        )


def assert_logits_close(model, ref, tok, sentence: str):
    batch = tok(sentence, return_tensors="pt")
    with torch.no_grad():
        got = model(**batch).logits.float()
        want = ref(**batch).logits.float()
    scale = float(want.abs().max())
    diff = float((got - want).abs().max())
    assert diff <= RTOL[model.dtype] * scale, f"logits differ by {diff:.3e} (scale {scale:.3e})"


# --------------------------------------------------------------------------------------
# 1. the blog-post workflow: every checkpoint of a run, and mixes, in one mount

BLOG_BASE = "bf16_sharded"  # a bf16 model in shards with an index, as on the Hub


def blog_views(run: Path) -> dict:
    return {
        "ckpt100": [(ckpt(run, 100), 1.0)],
        "ckpt200": [(ckpt(run, 200), 1.0)],
        "ckpt300": [(ckpt(run, 300), 1.0)],
        "mix": [(ckpt(run, 100), 0.5), (ckpt(run, 300), 0.5)],
    }


def test_checkpoints_as_views_load_as_peft_merges(e2e, run, mounter):
    """Each view loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(MNT/name) and
    is PEFT's merge of its spec (PeftModel.from_pretrained + merge_and_unload per adapter,
    weights applied to the LoRA scaling: conftest.peft_merge): tensors within the bounds of
    check_merged, untouched tensors bit-identical, tokenizer and logits agree."""
    views = blog_views(run)
    mnt = mounter(e2e.base(BLOG_BASE), [], *view_args(views))
    assert listing(mnt) == sorted(views)
    for name, adapters in views.items():
        stats = e2e.check_merged(mnt / name, BLOG_BASE, adapters)
        print(f"view {name}: {stats}")
    # the checkpoints really are different models
    a = e2e.load_tensors(mnt / "ckpt100")
    b = e2e.load_tensors(mnt / "ckpt300")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[name], b[name])


def peft_cat_mix(base: Path, adapters, dtype):
    """PEFT's own way to mix adapters into one: load each, `add_weighted_adapter(...,
    combination_type="cat")` (A_i scaled by w_i·s_i and stacked, B_i stacked, scaling 1),
    merge that one adapter, `.to(dtype)`.

    On the base loaded in float32: on a bf16 base, PEFT (0.21.2) creates the combined
    adapter in bf16, rounding w·s·A to bf16, a loss lorafs does not have (it keeps the
    factors in f32). In f32, w·s = 0.5·2 or 1.5·2 and -0.5·2 are exact, so the combined
    adapter is the checkpoints' factors exactly and the merge rounds once, like lorafs."""
    from peft import PeftModel

    model = load_model(base, torch.float32)
    names = [f"c{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
        for n, (path, _) in zip(names[1:], adapters[1:]):
            peft_model.load_adapter(str(path), adapter_name=n)
        peft_model.add_weighted_adapter(names, [w for _, w in adapters], "mix", combination_type="cat")
    return peft_model.merge_and_unload(adapter_names=["mix"]).to(dtype).eval()


def test_mix_views_match_peft_add_weighted_adapter_cat(e2e, run, mounter):
    """The mixes, one an average and one task arithmetic (a negative weight), against PEFT's
    add_weighted_adapter(combination_type="cat"): one rounding each, so every merged tensor
    within 1 ulp of bf16; untouched tensors bit-identical; logits agree."""
    from transformers import AutoTokenizer

    views = {
        "mix": [(ckpt(run, 100), 0.5), (ckpt(run, 300), 0.5)],
        "arith/300-minus-100": [(ckpt(run, 300), 1.5), (ckpt(run, 100), -0.5)],
    }
    mnt = mounter(e2e.base(BLOG_BASE), [], *view_args(views))
    dtype = e2e.dtype(BLOG_BASE)
    base_raw = e2e.load_tensors(e2e.base(BLOG_BASE))
    for name, adapters in views.items():
        ref = peft_cat_mix(e2e.base(BLOG_BASE), adapters, dtype)
        model = load_model(mnt / name)
        assert model.dtype == dtype
        got = model.state_dict()
        want = ref.state_dict()
        assert set(got) == set(want)
        terms = e2e.terms(adapters)
        for t in sorted(got):
            if t in terms:
                assert_bits_within(got[t], want[t], f"{name}: {t}", 1, e2e)
            else:
                assert_bits_within(got[t], base_raw[t], f"{name}: {t} (untouched)", 0, e2e)
        tok = AutoTokenizer.from_pretrained(str(mnt / name))
        assert_logits_close(model, ref, tok, e2e.m["sentences"][1])
        del model


# --------------------------------------------------------------------------------------
# 2. --dtype against PEFT's f32 merge

TORCH = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


class DoubleRounding(AssertionError):
    """A merge into a narrower dtype that is round(round(W) + Δ), the base rounded to the
    target dtype before the delta is added, instead of round(W + Δ)."""


# name: (base, target dtype, adapters, how: "materialize" or "mount")
DTYPE_CASES = {
    "f32-to-bf16": ("f32", "bf16", ["all_linear", ("embed_head", 2.0)], "materialize"),
    "f32-to-f16": ("f32", "f16", [("ckpt1", 0.5), ("ckpt3", 0.5)], "materialize"),
    "bf16-to-f32": ("bf16", "f32", ["all_linear"], "materialize"),
    "f16-to-bf16": ("f16", "bf16", ["rslora", "patterns"], "materialize"),
    "bf16_sharded-to-f16-mount": ("bf16_sharded", "f16", [("ckpt2", 1.5), "attn"], "mount"),
}


def check_one_rounding(name, L, W, P32, dtype, e2e, slack):
    """L (lorafs, in `dtype`) within 1 ulp of P32 (PEFT's f32 merge) rounded to `dtype`, or,
    where W and Δ nearly cancel, within 1 ulp + `slack` (the f32 error bound of both sides'
    delta, which then exceeds an ulp of the small result). If not, but within 1 ulp of
    round(round(W) + Δ), Δ = P32 - W, raise DoubleRounding."""
    P = P32.to(dtype)
    ulps = e2e.ulp_distance(L, P)
    beyond = (L.double() - P32.double()).abs() > e2e.ulp_of(L) + slack
    ulps = torch.where(beyond, ulps, torch.clamp(ulps, max=1))
    if int(ulps.max()) <= 1:
        return int(ulps.max())
    i = int(ulps.argmax())
    msg = (
        f"{name}: {int((ulps > 1).sum())} of {ulps.numel()} values more than 1 ulp from PEFT's "
        f"f32 merge; worst [{i}]: lorafs {float(L.flatten()[i])!r} PEFT "
        f"{float(P.flatten()[i])!r} ({int(ulps.max())} ulps), base {float(W.flatten()[i])!r}"
    )
    twice = (W.to(dtype).float() + (P32.float() - W.float())).to(dtype)
    if int(e2e.ulp_distance(L, twice).max()) <= 1:
        raise DoubleRounding(msg + "; L = round(round(W) + Δ) everywhere (±1 ulp)")
    raise AssertionError(msg)


@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_dtype_matches_peft_f32_merge(e2e, scratch, mounter, case):
    """Every floating tensor is stored in the target dtype. Merged tensors: PEFT's f32 value
    and lorafs' f32 value both rounded once to f16/bf16, so equal or adjacent (≤ 1 ulp on
    the bit patterns); into f32, within 1 ulp + the f32 error bound of either side (as
    check_merged). Untouched tensors: the base's converted, bit for bit (round to nearest
    even, as torch's `.to`). config.json: `dtype` names the target, nothing else changes.
    from_pretrained(dtype="auto") loads it in the target dtype; logits agree; inspect
    --tensors lists the merged tensors in the target dtype."""
    from transformers import AutoTokenizer

    base_name, target, spec, how = DTYPE_CASES[case]
    base, dtype, adapters = e2e.base(base_name), TORCH[target], e2e.adapters(spec)
    if how == "mount":
        out = mounter(base, adapters, "--dtype", target)
    else:
        out = scratch / "merged"
        e2e.lorafs.materialize(base, out, adapters, "--dtype", target)

    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch."), config
    assert {k: v for k, v in config.items() if k != "dtype"} == {
        k: v for k, v in base_config.items() if k != "dtype"
    }

    stored = e2e.load_tensors(out)
    base_raw = e2e.load_tensors(base)
    assert stored.keys() == base_raw.keys()
    assert {t.dtype for t in stored.values()} == {dtype}

    model = load_model(out, "auto")
    assert model.dtype == dtype, f"from_pretrained(dtype='auto') gave {model.dtype}"
    # PEFT's merge in f32 (the base widened exactly), then .to(dtype)
    ref, _ = peft_merge(base, adapters, torch.float32)
    want32 = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ref = ref.to(dtype)
    got = {k: v.detach() for k, v in model.state_dict().items()}
    assert set(got) == set(want32) == set(stored)
    terms = e2e.terms(adapters)
    for name in got:
        assert torch.equal(got[name].view(-1), stored[name].view(-1)), f"{name}: loaded != stored"
        if name not in terms:
            assert_bits_within(got[name], base_raw[name].to(dtype), f"{name} (untouched)", 0, e2e)

    tok = AutoTokenizer.from_pretrained(str(out))
    assert_logits_close(model, ref, tok, e2e.m["sentences"][2])
    del model

    inspect = e2e.lorafs.run(
        "inspect", base, *e2e.lorafs.adapter_args(adapters), "--dtype", target, "--tensors", check=True
    )
    merged_lines = [line for line in inspect.stdout.splitlines() if " <- " in line]
    assert len(merged_lines) == len(terms), inspect.stdout
    assert all(f" {target.upper()} [" in line for line in merged_lines), inspect.stdout

    # last: a double rounding (W rounded before Δ is added) shows here
    worst = 0
    for name in sorted(terms):
        L, W, P32 = got[name], base_raw[name], want32[name]
        if dtype == torch.float32:
            _, slack = e2e.f64_merge(W, terms[name])
            bad = (L.double() - P32.double()).abs() > e2e.ulp_of(L) + slack
            assert not bad.any(), f"{name}: {int(bad.sum())} values beyond 1 ulp + f32 error"
            worst = max(worst, int(e2e.ulp_distance(L, P32).max()))
        else:
            _, slack = e2e.f64_merge(W, terms[name])
            worst = max(worst, check_one_rounding(name, L, W, P32, dtype, e2e, slack))
    print(f"{case}: max {worst} ulps from PEFT's f32 merge .to({target})")


def test_dtype_updates_legacy_torch_dtype(e2e, scratch):
    """A base whose config.json says `torch_dtype` (as transformers 4 wrote it, still on
    most Hub models) and not `dtype`: the merged config says the new dtype under both keys,
    so that either transformers generation reads it, and loads in it."""
    base = scratch / "legacy-base"
    shutil.copytree(e2e.base("f32"), base)
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    (base / "config.json").write_text(json.dumps(config, indent=2))

    out = scratch / "merged"
    e2e.lorafs.materialize(base, out, e2e.adapters(["attn"]), "--dtype", "bf16")
    merged = json.loads((out / "config.json").read_text())
    assert merged["torch_dtype"] == "bfloat16" and merged["dtype"] == "bfloat16", merged
    rest = {k: v for k, v in merged.items() if k not in ("dtype", "torch_dtype")}
    assert rest == {k: v for k, v in config.items() if k != "torch_dtype"}
    assert load_model(out, "auto").dtype == torch.bfloat16


# --------------------------------------------------------------------------------------
# 3. a view is materialize of its spec, byte for byte


@pytest.mark.parametrize("dtype", [None, "f32"])
def test_views_are_materialize_byte_for_byte(e2e, run, scratch, mounter, dtype):
    """Views with nested names, weights (negative too) and adapters of different configs
    (rsLoRA, embedding LoRA): each view's files hash like `lorafs materialize` of the same
    spec (and the same --dtype). Into f32 the shards double in size: headers, offsets and
    the index's total_size move."""
    extra = [] if dtype is None else ["--dtype", dtype]
    views = {
        "run1/checkpoint-100": [(ckpt(run, 100), 1.0)],
        "run1/checkpoint-300": [(ckpt(run, 300), 1.0)],
        "mix": [(ckpt(run, 100), 0.5), (ckpt(run, 300), 0.5)],
        "a/b/c/arith": [(ckpt(run, 300), 2.0), (ckpt(run, 200), -1.0)],
        "features": e2e.adapters([("rslora", 0.75), ("embed_head", 2.0)]),
    }
    base = e2e.base("bf16_sharded")
    mnt = mounter(base, [], *view_args(views), *extra)
    assert listing(mnt) == ["a", "features", "mix", "run1"]
    assert listing(mnt / "run1") == ["checkpoint-100", "checkpoint-300"]
    for name, adapters in views.items():
        out = scratch / name.replace("/", "-")
        e2e.lorafs.materialize(base, out, adapters, *extra)
        assert files_of(mnt / name) == files_of(out) == files_of(base), name
        assert hashes(mnt / name) == hashes(out), name
    if dtype is not None:
        index = json.loads((mnt / "mix" / "model.safetensors.index.json").read_text())
        base_index = json.loads((base / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]
        assert index["metadata"]["total_size"] == 2 * base_index["metadata"]["total_size"]
