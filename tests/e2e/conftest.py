"""End-to-end tests of lorafs against the real transformers + PEFT.

Run:  $(bash scripts/venv.sh)/bin/python -m pytest tests/e2e -x -q

The lorafs binary comes from $LORAFS_BIN (default <repo>/target/release/lorafs; build it with
`cargo build --release`). Fixtures (tiny Llama bases and PEFT adapters) are generated once
per session by scripts/make_fixtures.py into a temporary directory that is removed at the
end. Mount tests need /dev/fuse and the right to mount (CI runs them as root); they are
never skipped: a mount that fails is a failing test.

What "equal to PEFT" means here, and the bounds, are documented in `E2E.check_merged`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
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

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LORAFS_BIN = Path(os.environ.get("LORAFS_BIN", REPO / "target" / "release" / "lorafs"))

F32_EPS = 2.0**-24  # unit roundoff of f32 (half an ulp of 1.0)

INT_VIEW = {
    torch.float32: (torch.int32, 31),
    torch.float16: (torch.int16, 15),
    torch.bfloat16: (torch.int16, 15),
}


# --------------------------------------------------------------------------------------
# float helpers


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of each value as an int64 that is monotonic in the value (sign-magnitude
    to two's complement, -0 == +0), so that the difference of two is their distance in ulps."""
    int_dtype, sign_bit = INT_VIEW[t.dtype]
    i = t.contiguous().view(int_dtype).to(torch.int64)
    mag = i & ((1 << sign_bit) - 1)
    return torch.where(i < 0, -mag, mag)


def files_of(d: Path) -> list[str]:
    """Every file below `d`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def listing(d) -> list[str]:
    """The sorted names in directory `d`."""
    return sorted(os.listdir(d))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    return (ordered_bits(a) - ordered_bits(b)).abs()


def ulp_of(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype above |t|, as f64 (for a value rounded to nearest, the rounding
    error is at most half of this)."""
    a = t.abs()
    up = torch.nextafter(a, torch.full_like(a, math.inf))
    return up.double() - a.double()


# --------------------------------------------------------------------------------------
# adapters read directly (for the f64 reference)


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def lora_terms(adapter_dir: Path, weight: float):
    """{base tensor name: [(U, V, is_embedding)]} in f64 with Δ = U @ V (U already times
    w·s), read from the raw safetensors factors and the config, with PEFT's own pattern
    matching."""
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    alpha_pattern = cfg.get("alpha_pattern") or {}
    factors: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as st:
        for key in st.keys():
            name = key.removeprefix("base_model.model.")
            for suffix, part, emb in (
                (".lora_A.weight", "A", False),
                (".lora_B.weight", "B", False),
                (".lora_embedding_A", "A", True),
                (".lora_embedding_B", "B", True),
            ):
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    factors.setdefault((module, emb), {})[part] = st.get_tensor(key).double()
                    break
    terms = {}
    for (module, emb), ab in factors.items():
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"])
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if emb:  # Δ = (B @ A)ᵀ = Aᵀ @ Bᵀ, shape (vocab, dim)
            u, v = a.T * (weight * s), b.T
        else:  # Δ = B @ A, shape (out, in)
            u, v = b * (weight * s), a
        terms.setdefault(module + ".weight", []).append((u, v, emb))
    return terms


# --------------------------------------------------------------------------------------
# PEFT's merge


def load_model(path, dtype=None):
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def peft_merge(base: Path, adapters, dtype):
    """PEFT's merged model, as users do it (the seed's loop): load the base in its dtype, then
    for each adapter `PeftModel.from_pretrained` + `merge_and_unload()`, which rounds to the
    base dtype after each adapter.

    A weight w: before merging, every LoRA layer's `scaling[adapter]` (= alpha/r, or
    alpha/√r with rsLoRA, per alpha/rank_pattern) is multiplied by w, in Python floats;
    `get_delta_weight` then returns `(B @ A) * scaling` = w·s·B@A in f32, the product
    lorafs applies. This is what PEFT's `LoraLayer.scale_layer(w)` does, except that
    scale_layer (peft 0.21.2, tuners/lora/layer.py) skips adapters that are not in
    `self.lora_A`, i.e. every LoRA *Embedding* layer (its factors live in
    lora_embedding_A/B), so it silently leaves embeddings unweighted; hence the direct
    update. (`add_weighted_adapter` would build a new adapter by concatenating or SVD-ing
    factors: other semantics. Multiplying lora_B by w beforehand would round w·B to f32
    once more.)

    Returns (merged model, [state after each adapter]) ."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = load_model(base, dtype)
    steps = []
    for i, (adapter, w) in enumerate(adapters):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name=f"a{i}")
        if w != 1.0:
            for m in peft_model.modules():
                if isinstance(m, LoraLayer) and f"a{i}" in m.scaling:
                    m.scaling[f"a{i}"] *= w
        model = peft_model.merge_and_unload()
        steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model.eval(), steps


# --------------------------------------------------------------------------------------
# the lorafs command


class Lorafs:
    def __init__(self, binary: Path):
        self.binary = binary

    def run(self, *args, timeout=120, check=False):
        cmd = [str(self.binary), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited with {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    @staticmethod
    def adapter_args(adapters):
        args = []
        for path, w in adapters:
            args += ["--adapter", f"{path}:{w!r}" if w != 1.0 else str(path)]
        return args

    def materialize(self, base, out, adapters, *extra):
        return self.run("materialize", base, out, *self.adapter_args(adapters), *extra, check=True)

    def mount(self, base, mnt, adapters, *extra, timeout=60):
        return self.run("mount", base, mnt, *self.adapter_args(adapters), *extra, timeout=timeout)

    def unmount(self, mnt):
        """`lorafs unmount`, then `umount -l` if it is still mounted; never raises."""
        msgs = []
        if os.path.ismount(mnt):
            try:
                p = self.run("unmount", mnt, timeout=30)
                if p.returncode != 0:
                    msgs.append(f"lorafs unmount exited {p.returncode}: {p.stderr.strip()}")
            except Exception as e:  # noqa: BLE001
                msgs.append(f"lorafs unmount: {e!r}")
            for _ in range(50):
                if not os.path.ismount(mnt):
                    break
                time.sleep(0.1)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
            msgs.append("fell back to umount -l")
        return msgs


# --------------------------------------------------------------------------------------
# the checks


class E2E:
    """Shared checks, handed to tests by the `e2e` fixture."""

    ulp_distance = staticmethod(ulp_distance)
    ulp_of = staticmethod(ulp_of)
    load_tensors = staticmethod(load_safetensors_dir)

    def __init__(self, manifest, lorafs: Lorafs):
        self.m = manifest
        self.lorafs = lorafs
        self._peft_cache = {}

    def base(self, name) -> Path:
        return Path(self.m["bases"][name]["path"])

    def dtype(self, name) -> torch.dtype:
        return getattr(torch, self.m["bases"][name]["dtype"])

    def adapter(self, name) -> Path:
        return Path(self.m["adapters"][name]["path"])

    def adapters(self, spec):
        """[("name", w) or "name"] → [(Path, w)]."""
        out = []
        for item in spec:
            name, w = (item, 1.0) if isinstance(item, str) else item
            out.append((self.adapter(name), float(w)))
        return out

    def peft(self, base_name, adapters):
        key = (base_name, tuple((str(p), w) for p, w in adapters))
        if key not in self._peft_cache:
            self._peft_cache[key] = peft_merge(self.base(base_name), adapters, self.dtype(base_name))
        return self._peft_cache[key]

    @staticmethod
    def terms(adapters):
        """{base tensor: [(U, V, is_embedding)]} over all adapters, in f64."""
        terms = {}
        for path, w in adapters:
            for name, t in lora_terms(path, w).items():
                terms.setdefault(name, []).extend(t)
        return terms

    @staticmethod
    def f64_merge(raw: torch.Tensor, terms, with_magnitude=False):
        """(X, slack): X = W + Σ U@V in f64, and `slack`, a generous elementwise bound on the
        error of computing W + Σ U@V in f32 (as PEFT or lorafs do, in any order, with or
        without fma, scale applied before or after): 2·(rank+4)·u·mag, where
        mag = |W| + Σ|U|@|V| (also returned if with_magnitude)."""
        W = raw.double()
        X = W.clone()
        mag = W.abs()
        rank = 0
        for u, v, _ in terms:
            X += u @ v
            mag += u.abs() @ v.abs()
            rank += u.shape[1]
        slack = 2 * (rank + 4) * F32_EPS * mag
        return (X, slack, mag) if with_magnitude else (X, slack)

    def tokenize(self, tok):
        return tok(self.m["sentences"][1], return_tensors="pt")

    def check_merged(self, merged_dir: Path, base_name: str, adapters) -> dict:
        """Check a merged directory (materialized or mounted) against PEFT. Returns stats.

        One adapter. PEFT: P = round(W + fl32(fl32(B@A)·s)); lorafs: L = round(W + Σ_k
        fma(s·B, A)) in f32. For f16/bf16 the two f32 values differ by far less than an
        ulp of the output, so after one round-to-nearest each they are equal or adjacent:
        |L - P| ≤ 1 ulp, asserted exactly on the bit patterns. (Strictly, this needs
        |W + Δ| not to be so cancelled that the f32 error, ~r·2^-24·(|W| + |s||B|@|A|),
        reaches an ulp of the result; the fixtures are deterministic and meet it. Where it
        does not hold, two correct f32 implementations can differ by many ulps of a tiny
        result: see test_multi.test_order_does_not_matter.) For f32 output the f32
        products themselves round differently (order of the r-term sums, s applied
        before/after), so the bound is 1 ulp + `slack`, the f32 error bound of both sides,
        2·(rank+4)·2^-24·(|W| + Σ|U|@|V|) elementwise (`f64_merge`); the ulp distance is
        reported in the stats.

        Embeddings. PEFT's Embedding.merge rounds the f32 delta to the base dtype before
        adding it (`weight += delta.to(orig_dtype)`), i.e. P = round(W + round(Δ)), while
        lorafs rounds once; so |L - P| ≤ ½ulp(L) + ½ulp(P) + ½ulp(round(Δ)) + slack, which
        under cancellation is many ulps of the result, with lorafs the closer to X.

        n adapters. PEFT rounds after each: P_i = round(P_{i-1} + Δ_i), so
        |P_n - X| ≤ Σ_i ½ulp(P_i) + f32 error, with X the exact sum; lorafs sums the deltas
        in f32 and rounds once: |L - X| ≤ ½ulp(L) + f32 error. Hence, elementwise,
            |L - P| ≤ ½ulp(L) + ½Σ_i ulp(P_i) (+ the embeddings' ½ulp(round(Δ_i))) + slack
        (asserted), which, where no intermediate P_i lies in a higher binade than the
        result, is at most (n+1)/2 ≤ n ulps of the result (also asserted there, for
        f16/bf16 and non-embedding tensors).

        Always: lorafs must be at least as close as PEFT to the f64 merge X computed here
        from the raw factors: max|L - X| ≤ max|P - X| + max slack, per tensor. Tensors no
        adapter touches must be bit-identical to the base (in PEFT's output too).
        Tokenizer: loads from the merged directory and encodes like the base's. Logits of
        a forward pass in the model dtype: within a dtype-dependent fraction of their scale.
        """
        from transformers import AutoTokenizer

        dtype = self.dtype(base_name)
        n = len(adapters)
        peft_model, steps = self.peft(base_name, adapters)
        peft_state = steps[-1]

        # --- load the merged directory as users do
        model = load_model(merged_dir)
        assert model.dtype == dtype, f"from_pretrained({merged_dir}) gave {model.dtype}, base is {dtype}"
        state = {k: v.detach() for k, v in model.state_dict().items()}
        assert set(state) == set(peft_state), set(state) ^ set(peft_state)

        # --- f64 reference from the raw files
        base_raw = load_safetensors_dir(self.base(base_name))
        terms = self.terms(adapters)
        assert set(terms) <= set(base_raw), set(terms) - set(base_raw)

        stats = {"max_ulp": 0, "tensors_merged": 0, "worst": None}
        for name in sorted(state):
            L, P = state[name], peft_state[name]
            assert L.dtype == dtype and P.dtype == dtype, (name, L.dtype, P.dtype)
            assert L.shape == P.shape, (name, L.shape, P.shape)
            assert torch.isfinite(L).all(), f"{name}: non-finite values in the lorafs output"
            raw = base_raw[name]
            if name not in terms:
                assert torch.equal(ordered_bits(L), ordered_bits(raw)), f"{name}: untouched tensor changed"
                assert torch.equal(ordered_bits(P), ordered_bits(raw)), f"{name}: PEFT changed it?"
                continue
            stats["tensors_merged"] += 1
            W = raw.double()
            X, slack = self.f64_merge(raw, terms[name])
            # PEFT's Embedding.merge (peft/tuners/lora/layer.py, class Embedding) does
            # `weight += get_delta_weight().to(orig_dtype)`: it rounds the f32 delta to the
            # base dtype BEFORE adding (a second rounding; Linear adds the f32 delta). So for
            # an embedding PEFT's error has an extra ½ulp(round(Δ)) per adapter, which under
            # cancellation (|W + Δ| << |Δ|) is several ulps of the result.
            peft_extra = torch.zeros_like(W)
            for u, v, emb in terms[name]:
                if emb and dtype != torch.float32:
                    peft_extra += 0.5 * ulp_of((u @ v).to(dtype))
            embedding = any(emb for _, _, emb in terms[name])
            diff = (L.double() - P.double()).abs()
            ulps = ulp_distance(L, P)
            worst = int(ulps.max())
            if worst > stats["max_ulp"]:
                i = int(ulps.argmax())
                stats["max_ulp"] = worst
                stats["worst"] = (name, i, float(L.flatten()[i]), float(P.flatten()[i]), float(X.flatten()[i]))

            def where(mask):
                i = int(mask.flatten().nonzero()[0])
                return (
                    f"{name}[{tuple(int(x) for x in torch.unravel_index(torch.tensor(i), L.shape))}]: "
                    f"lorafs {float(L.flatten()[i])!r} peft {float(P.flatten()[i])!r} "
                    f"f64 {float(X.flatten()[i])!r} base {float(W.flatten()[i])!r} "
                    f"ulps apart {int(ulps.flatten()[i])} ({int((mask).sum())} of {mask.numel()} values)"
                )

            if n == 1 and embedding and dtype != torch.float32:
                # PEFT: round(W + round(Δ)); lorafs: round(W + Δ).
                bound = 0.5 * ulp_of(L) + 0.5 * ulp_of(P) + peft_extra + slack
                bad = diff > bound
                assert not bad.any(), f"lorafs and PEFT further apart than PEFT's double rounding allows: {where(bad)}"
            elif n == 1:
                if dtype == torch.float32:
                    bad = diff > ulp_of(L) + slack
                else:
                    bad = ulps > 1
                assert not bad.any(), f"lorafs and PEFT more than 1 ulp apart: {where(bad)}"
            else:
                bound = 0.5 * ulp_of(L) + 0.5 * sum(ulp_of(s[name]) for s in steps) + peft_extra + slack
                bad = diff > bound
                assert not bad.any(), f"lorafs and PEFT further apart than n={n} roundings allow: {where(bad)}"
                same_binade = torch.stack([ulp_of(s[name]) <= ulp_of(L) for s in steps]).all(0)
                # (in f32 the f32 sums' own errors, `slack`, exceed an ulp: bound above only)
                bad = same_binade & (ulps > n) & (peft_extra == 0) & (dtype != torch.float32)
                assert not bad.any(), f"more than n={n} ulps apart: {where(bad)}"

            err_l = float((L.double() - X).abs().max())
            err_p = float((P.double() - X).abs().max())
            assert err_l <= err_p + float(slack.max()), (
                f"{name}: lorafs is further from the f64 merge than PEFT: "
                f"max|lorafs-f64| = {err_l:.3e}, max|peft-f64| = {err_p:.3e}"
            )
        assert stats["tensors_merged"] == len(terms)

        # --- tokenizer and a forward pass
        tok = AutoTokenizer.from_pretrained(str(merged_dir))
        base_tok = AutoTokenizer.from_pretrained(str(self.base(base_name)))
        for s in self.m["sentences"]:
            assert tok(s)["input_ids"] == base_tok(s)["input_ids"]
        batch = self.tokenize(tok)
        with torch.no_grad():
            got = model(**batch).logits.float()
            want = peft_model(**batch).logits.float()
        scale = float(want.abs().max())
        # Weights at most a few ulps apart; the forward pass in the model dtype amplifies
        # that by a modest factor. Tolerance relative to the logit scale, per dtype.
        rtol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        max_diff = float((got - want).abs().max())
        assert max_diff <= rtol * scale, f"logits differ by {max_diff:.3e} (scale {scale:.3e})"
        assert torch.equal(got.argmax(-1), want.argmax(-1)) or dtype != torch.float32
        stats["logit_diff"] = max_diff
        stats["logit_scale"] = scale
        return stats


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def lorafs_bin() -> Path:
    if not (LORAFS_BIN.is_file() and os.access(LORAFS_BIN, os.X_OK)):
        pytest.fail(f"lorafs binary not found at {LORAFS_BIN}: run `cargo build --release` or set LORAFS_BIN")
    return LORAFS_BIN


@pytest.fixture(scope="session")
def lorafs(lorafs_bin) -> Lorafs:
    return Lorafs(lorafs_bin)


@contextlib.contextmanager
def generated(function: str, prefix: str):
    """Run `function` of scripts/make_fixtures.py into a temporary directory, removed after."""
    spec = importlib.util.spec_from_file_location("make_fixtures", REPO / "scripts" / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tempfile.mkdtemp(prefix=prefix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = getattr(mod, function)(root)
        yield result
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def fixtures_manifest():
    with generated("generate", "lorafs-e2e-fixtures-") as manifest:
        yield manifest


@pytest.fixture(scope="session")
def e2e(fixtures_manifest, lorafs) -> E2E:
    torch.manual_seed(0)
    return E2E(fixtures_manifest, lorafs)


@pytest.fixture
def scratch():
    """A scratch directory, removed after the test (materialized models are written here)."""
    d = Path(tempfile.mkdtemp(prefix="lorafs-e2e-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mounter(lorafs):
    """mount(base, adapters, *extra) → mountpoint; every mount is unmounted in the finalizer
    (`lorafs unmount`, falling back to `umount -l`)."""
    mounts = []
    roots = []

    def mount(base, adapters, *extra):
        root = Path(tempfile.mkdtemp(prefix="lorafs-e2e-mnt-"))
        roots.append(root)
        mnt = root / "mnt"
        mnt.mkdir()
        mounts.append(mnt)
        proc = lorafs.mount(base, mnt, adapters, *extra)
        if proc.returncode != 0:
            pytest.fail(
                f"lorafs mount failed ({proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        if not os.path.ismount(mnt):
            pytest.fail(f"lorafs mount returned 0 but {mnt} is not a mount point\nstderr:\n{proc.stderr}")
        return mnt

    yield mount
    gc.collect()  # drop models whose tensors are mmapped from the mount (else: busy)
    problems = []
    for mnt in reversed(mounts):
        problems += [f"{mnt}: {m}" for m in lorafs.unmount(mnt)]
    for root in roots:
        mnt = root / "mnt"
        if not os.path.ismount(mnt):
            shutil.rmtree(root, ignore_errors=True)
    if problems:
        # A failed test keeps its frames (and so maybe mapped files) alive: `lorafs
        # unmount` then rightly reports "busy". Not a failure of its own; shown as a warning.
        warnings.warn("unmount problems:\n  " + "\n  ".join(problems))
