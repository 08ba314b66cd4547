"""`--combine TYPE`: PEFT's add_weighted_adapter(combination_type=TYPE) + merge_and_unload as
the reference, tensor by tensor, through `materialize` and a mount.

Bounds: for a bf16/f16 base, the deterministic methods (cat, linear, ties, magnitude_prune) are
within 1 ulp of PEFT. For an f32 base, the f32 products round differently (the order of the
rank sums, the scale applied to B or to B@A), so the bound is 1 ulp + the f32 error bound of
both sides, 2·(k+4)·2^-24·(|W| + |B|@|A|·s) elementwise, |B|, |A| the combined factors (as in
conftest.E2E.check_merged). svd: the relative Frobenius error of the delta (merged - base)
is at most SVD_RTOL (docs/SEMANTICS.md, "Combining adapters"). DARE cannot match torch's
generator: it is tested by its statistics and by reproducibility."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import F32_EPS, generated, load_model, load_safetensors_dir, ulp_distance, ulp_of

SVD_RTOL = 1e-4

SAME_RANK = [("ckpt1", 0.7), ("ckpt2", -0.4), ("ckpt3", 1.3)]
# Different ranks (4, 32 with rsLoRA, 8 with embedding LoRA), overlapping modules.
MIXED_RANK = [("attn", 0.8), ("rslora", -0.5), ("embed_head", 1.2)]


def peft_combined(base_dir, dtype, adapters, combination_type, **kw):
    """PEFT's combined adapter merged: (state dict, {tensor: |B|@|A|·|s| of the combined
    adapter, in the tensor's layout})."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = load_model(base_dir, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name="a0")
        for i, (path, _) in enumerate(adapters[1:], 1):
            pm.load_adapter(str(path), adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(adapters))]
        pm.add_weighted_adapter(names, [w for _, w in adapters], "mix", combination_type=combination_type, **kw)
        pm.set_adapter("mix")
    magnitude = {}
    for name, m in pm.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        tensor = name.removeprefix("base_model.model.") + ".weight"
        if "mix" in m.lora_A:
            a, b = m.lora_A["mix"].weight, m.lora_B["mix"].weight
            prod = (b.abs() @ a.abs()) * abs(m.scaling["mix"])
            magnitude[tensor] = prod.T if m.fan_in_fan_out else prod
        elif "mix" in m.lora_embedding_A:
            a, b = m.lora_embedding_A["mix"], m.lora_embedding_B["mix"]
            magnitude[tensor] = ((b.abs() @ a.abs()) * abs(m.scaling["mix"])).T
    merged = pm.merge_and_unload()
    state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return state, {k: v.detach().double() for k, v in magnitude.items()}


def check_exact(got: dict, want: dict, magnitude: dict, base: dict):
    """Every tensor as close to PEFT's as one rounding each allows.

    lorafs: L = round(W + Δ) in f32, rounded once. PEFT: P = round(W + Δ) too, except where
    it rounds the f32 delta to the base dtype before adding it (embeddings, and cat in a
    16-bit model, whose combined factors are of the model's dtype: get_delta_weight then
    returns the delta in that dtype): P = round(W + round(Δ)). So |L - P| ≤ ½ulp(L) +
    ½ulp(P) + ½ulp(round(|Δ|)) + slack, slack = 2·(k+4)·2^-24·(|W| + |B|@|A|·s), the f32
    error of both sides; and where the delta does not cancel the weight (ulp(round(|Δ|)) ≤
    ulp(P)), 16-bit results are at most 1 ulp apart."""
    worst = 0
    for name, t in got.items():
        ref = want[name]
        assert t.dtype == ref.dtype and t.shape == ref.shape, name
        ulps = ulp_distance(t, ref)
        if name not in magnitude:
            assert int(ulps.max()) == 0, f"{name}: untouched by PEFT, changed by lorafs"
            continue
        k = 64
        mag = magnitude[name]
        slack = 2 * (k + 4) * F32_EPS * (base[name].double().abs() + mag)
        delta_ulp = ulp_of(mag.to(t.dtype)).double()
        diff = (t.double() - ref.double()).abs()
        bound = 0.5 * ulp_of(t).double() + 0.5 * ulp_of(ref).double() + 0.5 * delta_ulp + slack
        bad = diff > bound
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            pytest.fail(f"{name}[{i}]: lorafs {float(t.flatten()[i])!r} PEFT {float(ref.flatten()[i])!r}")
        if t.dtype != torch.float32:
            plain = delta_ulp <= ulp_of(ref).double()
            assert int(ulps[plain].max()) <= 1, f"{name}: more than 1 ulp apart without cancellation"
            worst = max(worst, int(ulps[plain].max()))
    return worst


def combine_args(method, **kw):
    args = ["--combine", method]
    for key, value in kw.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


PEFT_KW = {"density": "density", "majority_sign": "majority_sign_method", "svd_rank": "svd_rank"}

DETERMINISTIC = [
    ("cat", SAME_RANK, {}),
    ("cat", MIXED_RANK, {}),
    ("linear", SAME_RANK, {}),
    ("ties", SAME_RANK, {"density": 0.5}),
    ("ties", SAME_RANK, {"density": 0.3, "majority_sign": "frequency"}),
    ("magnitude_prune", SAME_RANK, {"density": 0.6}),
    ("ties", [("ckpt1", 1.0), ("ckpt2", -1.0)], {"density": 1.0}),
]


@pytest.mark.parametrize("base", ["f32", "bf16"])
@pytest.mark.parametrize("case", range(len(DETERMINISTIC)))
def test_deterministic_methods_match_peft(e2e, scratch, base, case):
    method, spec, kw = DETERMINISTIC[case]
    adapters = e2e.adapters(spec)
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base(base), out, adapters, *combine_args(method, **kw))
    got = load_safetensors_dir(out)
    peft_kw = {PEFT_KW[k]: v for k, v in kw.items()}
    want, magnitude = peft_combined(e2e.base(base), e2e.dtype(base), adapters, method, **peft_kw)
    base_tensors = load_safetensors_dir(e2e.base(base))
    worst = check_exact(got, want, magnitude, base_tensors)
    print(f"{method} {kw} on {base}: worst {worst} ulp")


def test_rslora_first_scales_the_combination(e2e, scratch):
    """PEFT copies use_rslora from the first adapter: the combination merges with
    new_rank/√new_rank instead of 1."""
    adapters = e2e.adapters([("rslora", 0.5), ("attn", 1.0)])
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base("bf16"), out, adapters, "--combine", "cat")
    want, magnitude = peft_combined(e2e.base("bf16"), e2e.dtype("bf16"), adapters, "cat")
    check_exact(load_safetensors_dir(out), want, magnitude, load_safetensors_dir(e2e.base("bf16")))


@pytest.mark.parametrize("spec,rank", [(SAME_RANK, None), (MIXED_RANK, None), (MIXED_RANK, 6)])
def test_svd_matches_peft_within_tolerance(e2e, scratch, spec, rank):
    adapters = e2e.adapters(spec)
    out = scratch / "merged"
    extra = ["--svd-rank", str(rank)] if rank else []
    e2e.lorafs.materialize(e2e.base("f32"), out, adapters, "--combine", "svd", *extra)
    got = load_safetensors_dir(out)
    want, _ = peft_combined(e2e.base("f32"), torch.float32, adapters, "svd", svd_rank=rank)
    worst = svd_error(got, want, load_safetensors_dir(e2e.base("f32")))
    assert worst <= SVD_RTOL, f"relative error {worst:.3e}"
    print(f"svd rank {rank}: worst relative Frobenius error {worst:.3e}")


def test_cat_is_the_weighted_sum(e2e, scratch):
    """cat is what --adapter A:w1 --adapter B:w2 merges, up to rounding: within 1 ulp in an
    f32 model (in a 16-bit model cat rounds its factors to the model's dtype, as PEFT does)."""
    adapters = e2e.adapters(MIXED_RANK)
    a, b = scratch / "cat", scratch / "sum"
    e2e.lorafs.materialize(e2e.base("f32"), a, adapters, "--combine", "cat")
    e2e.lorafs.materialize(e2e.base("f32"), b, adapters)
    got, want = load_safetensors_dir(a), load_safetensors_dir(b)
    assert got.keys() == want.keys()
    base = load_safetensors_dir(e2e.base("f32"))
    terms = e2e.terms(adapters)
    for name in got:
        if name not in terms:
            assert torch.equal(got[name], want[name]), name
            continue
        # 1 ulp, or the f32 error bound of both sums where the delta cancels the weight.
        _, slack = e2e.f64_merge(base[name], terms[name])
        diff = (got[name].double() - want[name].double()).abs()
        assert bool((diff <= ulp_of(want[name]).double() + slack).all()), name


def test_dare_statistics_and_reproducibility(e2e, scratch):
    """dare_linear on one adapter would be linear (PEFT): two adapters, one at weight 0, so
    the merged delta is the kept values of the other's factors rescaled by 1/density; the
    fraction of A's values kept is the density, and the same seed gives the same bytes."""
    density = 0.3
    adapters = e2e.adapters([("ckpt1", 1.0), ("ckpt2", 1.0)])
    runs = {}
    for name, seed in [("s1", 1), ("s1b", 1), ("s2", 2)]:
        out = scratch / name
        e2e.lorafs.materialize(
            e2e.base("f32"), out, adapters, *combine_args("dare_linear", density=density, seed=seed)
        )
        runs[name] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert runs["s1"] == runs["s1b"], "the same seed gave different bytes"
    assert runs["s1"] != runs["s2"], "different seeds gave the same bytes"
    # Statistics, from a DARE-linear mix of an adapter with a zero-weight copy of itself is
    # not observable through a dense merge; check the kept fraction on a rank-1 probe instead:
    # the delta of each merged tensor with density 1 vs the DARE one differs, and the mean of
    # many seeds' deltas approaches the linear delta (E[mask/density] = 1).
    lin = scratch / "lin"
    e2e.lorafs.materialize(e2e.base("f32"), lin, adapters, "--combine", "linear")
    base = load_safetensors_dir(e2e.base("f32"))
    linear = load_safetensors_dir(lin)
    seeds = 16
    total = None
    for seed in range(seeds):
        out = scratch / f"seed{seed}"
        e2e.lorafs.materialize(
            e2e.base("f32"), out, adapters, *combine_args("dare_linear", density=0.8, seed=seed)
        )
        got = load_safetensors_dir(out)
        deltas = {k: got[k].double() - base[k].double() for k in linear if k in base}
        total = deltas if total is None else {k: total[k] + deltas[k] for k in total}
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
    for name, t in total.items():
        want = linear[name].double() - base[name].double()
        if float(want.norm()) == 0.0:
            continue
        mean = t / seeds
        # Each element of B@A is a sum over r=8 products of independently masked values:
        # the mean over 16 seeds is within a few standard errors of the expectation.
        rel = float((mean - want).norm() / want.norm())
        assert rel < 0.6, f"{name}: mean of DARE deltas is {rel:.2f} off the linear delta"


def test_mount_serves_the_combination(e2e, scratch, mounter):
    adapters = e2e.adapters(SAME_RANK)
    extra = combine_args("ties", density=0.5)
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base("bf16"), out, adapters, *extra)
    mnt = mounter(e2e.base("bf16"), adapters, *extra)
    for p in sorted(out.glob("*.safetensors")):
        assert (mnt / p.name).read_bytes() == p.read_bytes(), p.name


def test_views_apply_the_global_combine(e2e, scratch, mounter):
    """--view NAME=SPEC with --combine: each view combined as materialize combines its spec."""
    adapters = e2e.adapters(SAME_RANK)
    extra = combine_args("dare_ties", density=0.7, seed=5)
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base("bf16"), out, adapters, *extra)
    spec = ",".join(f"{path}:{w!r}" for path, w in adapters)
    mnt = mounter(e2e.base("bf16"), [], "--view", f"mix={spec}", *extra)
    for p in sorted(out.glob("*.safetensors")):
        assert (mnt / "mix" / p.name).read_bytes() == p.read_bytes(), p.name


def svd_error(got: dict, want: dict, base: dict) -> float:
    """The worst relative Frobenius error of the deltas (merged - base), tensor by tensor."""
    worst = 0.0
    for name, t in got.items():
        d_got, d_want = t.double() - base[name].double(), want[name].double() - base[name].double()
        norm = float(d_want.norm())
        if norm == 0.0:
            assert float(d_got.norm()) == 0.0, name
            continue
        worst = max(worst, float((d_got - d_want).norm()) / norm)
    return worst


def test_views_file_views_match_peft(e2e, scratch, mounter):
    """Each view of a `--views` file, with its own method, read through the mount, against
    PEFT's add_weighted_adapter + merge_and_unload of the same adapters and weights."""
    views = {
        "ties": (SAME_RANK, "ties", {"density": 0.5}),
        "prune": (SAME_RANK, "magnitude_prune", {"density": 0.6}),
        "cat": (MIXED_RANK, "cat", {}),
        "svd": (MIXED_RANK, "svd", {"svd_rank": 6}),
    }
    lines = []
    for name, (spec, method, kw) in views.items():
        entries = ", ".join(f'{{ path = "{p}", weight = {w!r} }}' for p, w in e2e.adapters(spec))
        lines += [f"[views.{name}]", f"adapters = [{entries}]", f'combine = "{method}"']
        lines += [f"{k} = {v!r}" for k, v in kw.items()] + [""]
    views_file = scratch / "views.toml"
    views_file.write_text("\n".join(lines))
    mnt = mounter(e2e.base("f32"), [], "--views", str(views_file))
    base = load_safetensors_dir(e2e.base("f32"))
    for name, (spec, method, kw) in views.items():
        got = load_safetensors_dir(mnt / name)
        peft_kw = {PEFT_KW[k]: v for k, v in kw.items()}
        want, magnitude = peft_combined(e2e.base("f32"), torch.float32, e2e.adapters(spec), method, **peft_kw)
        if method == "svd":
            err = svd_error(got, want, base)
            assert err <= SVD_RTOL, f"view {name}: relative error {err:.3e}"
        else:
            check_exact(got, want, magnitude, base)


def test_inspect_shows_the_combination(e2e):
    """`inspect` (text and JSON) names the method, its parameters, the new rank and scale."""
    adapters = e2e.adapters(SAME_RANK)
    args = ["inspect", e2e.base("bf16"), *e2e.lorafs.adapter_args(adapters)]
    args += combine_args("dare_ties", density=0.7, majority_sign="frequency", seed=9)
    text = e2e.lorafs.run(*args, check=True).stdout
    assert "combine   dare_ties" in text, text
    info = json.loads(e2e.lorafs.run(*args, "--json", check=True).stdout)
    combine = info["combine"] if "combine" in info else info["views"][0]["combine"]
    rank = json.loads((e2e.adapter("ckpt1") / "adapter_config.json").read_text())["r"]
    assert combine == {
        "method": "dare_ties",
        "density": 0.7,
        "majority_sign": "frequency",
        "rank": rank,
        "scaling": 1.0,
        "seed": 9,
    }, combine
    assert f"rank {rank}," in text, text
    plain = json.loads(e2e.lorafs.run("inspect", e2e.base("bf16"), *e2e.lorafs.adapter_args(adapters), "--json", check=True).stdout)
    assert (plain.get("combine") if "combine" in plain else plain["views"][0]["combine"]) is None


@pytest.fixture(scope="module")
def feat():
    """The fixtures of test_features.py: GPT-2 bases with a Conv1D and an embedding LoRA."""
    with generated("generate_features", "lorafs-e2e-features-") as manifest:
        yield manifest


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_conv1d_and_embedding_loras_combine_as_peft(e2e, feat, scratch, method):
    """GPT-2: Conv1D (fan_in_fan_out, stored transposed) and an embedding LoRA. linear needs
    one rank: the Conv1D adapter twice with different weights."""
    if method == "linear":
        spec = [("gpt2_conv1d", 0.6), ("gpt2_conv1d", -1.1)]
    else:
        spec = [("gpt2_conv1d", 0.6), ("gpt2_embed", -1.1)]
    adapters = [(Path(feat["adapters"][name]["path"]), w) for name, w in spec]
    base_dir = Path(feat["bases"]["gpt2_f32"]["path"])
    out = scratch / "merged"
    e2e.lorafs.materialize(base_dir, out, adapters, "--combine", method)
    got = load_safetensors_dir(out)
    base = load_safetensors_dir(base_dir)
    want, magnitude = peft_combined(base_dir, torch.float32, adapters, method)
    if method == "svd":
        err = svd_error(got, want, base)
        assert err <= SVD_RTOL, f"relative error {err:.3e}"
    else:
        check_exact(got, want, magnitude, base)


@pytest.mark.parametrize(
    "spec,args,needle",
    [
        (SAME_RANK[:1] + [("attn", 1.0)], ["--combine", "ties", "--density", "0.5"], "one rank"),
        (SAME_RANK, ["--combine", "ties_svd", "--density", "0.5"], "ties_svd"),
        (SAME_RANK, ["--combine", "ties"], "needs --density"),
        (SAME_RANK, ["--combine", "linear", "--density", "0.5"], "does not apply"),
        ([("ckpt1", 1.0), ("embed_saved", 1.0)], ["--combine", "cat"], "modules_to_save"),
    ],
)
def test_refusals_name_the_problem(e2e, scratch, spec, args, needle):
    adapters = e2e.adapters(spec)
    proc = e2e.lorafs.run(
        "materialize", e2e.base("bf16"), scratch / "out", *e2e.lorafs.adapter_args(adapters), *args
    )
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert not (scratch / "out").exists()
