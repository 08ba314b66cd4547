"""Several adapters, with weights: lorafs sums w·s·B@A in f32 and rounds once; PEFT (the seed's
loop of PeftModel.from_pretrained + merge_and_unload) rounds after each adapter. The bounds
are derived in conftest.E2E.check_merged."""

import pytest

BASES = ["f32", "f16", "bf16", "bf16_sharded"]

CASES = {
    # the seed's three checkpoints, merged in order
    "ckpts": ["ckpt1", "ckpt2", "ckpt3"],
    # weighted, including a negative weight (task-arithmetic style subtraction)
    "weighted": [("ckpt1", 0.5), ("ckpt2", 1.5), ("ckpt3", -0.25)],
    # different configs over overlapping modules: plain, rsLoRA, patterns, embedding LoRA
    "mixed": ["attn", ("rslora", 0.75), "patterns", ("embed_head", 2.0)],
    "two": [("all_linear", 0.5), ("bf16_factors", 1.5)],
}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_several_adapters(e2e, scratch, base, case):
    adapters = e2e.adapters(CASES[case])
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base(base), out, adapters)
    stats = e2e.check_merged(out, base, adapters)
    print(f"{base}/{case}: {stats}")


@pytest.mark.parametrize("base", ["f16", "bf16"])
def test_order_does_not_matter(e2e, scratch, base):
    """Summing in f32 then rounding once: the adapters' order changes only the f32 sum's
    rounding errors, so the two orders are within ½ulp(a) + ½ulp(b) + 2·(f32 error bound)
    of each other. Where the sum cancels (|W + Δ| << |W| + Σ|Δ|) the f32 error is many ulps
    of the tiny result; where it does not (|X| ≥ 2^-6·mag, so the f32 error is below a
    quarter ulp of f16), that means equal or 1 ulp apart. (PEFT's loop is order-dependent
    by up to n roundings.)"""
    fwd = e2e.adapters(CASES["weighted"])
    rev = list(reversed(fwd))
    e2e.lorafs.materialize(e2e.base(base), scratch / "fwd", fwd)
    e2e.lorafs.materialize(e2e.base(base), scratch / "rev", rev)
    a = e2e.load_tensors(scratch / "fwd")
    b = e2e.load_tensors(scratch / "rev")
    assert a.keys() == b.keys()
    base_raw = e2e.load_tensors(e2e.base(base))
    terms = e2e.terms(fwd)
    for name in a:
        ulps = e2e.ulp_distance(a[name], b[name])
        if name not in terms:
            assert int(ulps.max()) == 0, name
            continue
        X, slack, mag = e2e.f64_merge(base_raw[name], terms[name], with_magnitude=True)
        diff = (a[name].double() - b[name].double()).abs()
        bound = 0.5 * e2e.ulp_of(a[name]) + 0.5 * e2e.ulp_of(b[name]) + 2 * slack
        assert not (diff > bound).any(), name
        big = X.abs() >= 2**-6 * mag
        assert big.float().mean() > 0.5
        assert int(ulps[big].max()) <= 1, name


def test_weight_zero_is_identity(e2e, scratch):
    """An adapter with weight 0 contributes nothing: the output equals the base bit for bit
    (w·s·B@A = 0 exactly, and W + 0 rounds to W)."""
    e2e.lorafs.materialize(e2e.base("bf16"), scratch / "out", e2e.adapters([("all_linear", 0.0)]))
    base = e2e.load_tensors(e2e.base("bf16"))
    out = e2e.load_tensors(scratch / "out")
    assert base.keys() == out.keys()
    for name in base:
        assert int(e2e.ulp_distance(base[name], out[name]).max()) == 0, name
