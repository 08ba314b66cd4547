"""Every mergeable PEFT adapter feature, end to end, against PEFT's own merge_and_unload():
modules_to_save / trained biases / saved embedding layers (replaced tensors), a resized
vocabulary, lora_bias, trainable tokens, DoRA, tied embeddings, GPT-2 Conv1D and embedding
LoRA; and a clear refusal, with nothing written or mounted, for what cannot be merged.

Fixtures: scripts/make_fixtures.py `generate_features` (adapters made by PEFT itself)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from conftest import files_of, generated, listing, load_model, ulp_distance, ulp_of

# name: (base, adapter, resize the base's vocabulary for PEFT, max ulps apart in f16/bf16)
CASES = {
    "modules_to_save-f32": ("f32", "modules_to_save", False, 1),
    "modules_to_save-bf16": ("bf16", "modules_to_save", False, 1),
    "dora-f32": ("f32", "dora", False, 1),
    "dora-bf16": ("bf16", "dora", False, 1),
    "dora_rslora-f16_sharded": ("f16_sharded", "dora_rslora", False, 1),
    "lora_bias-f32": ("bias_f32", "lora_bias", False, 1),
    "lora_bias-bf16": ("bias_bf16", "lora_bias", False, 1),
    "bias_all-bf16": ("bias_bf16", "bias_all", False, 1),
    "tokens-f32": ("f32", "tokens", False, 1),
    "tokens-f16_sharded": ("f16_sharded", "tokens", False, 1),
    "resized-f32": ("f32", "resized", True, 1),
    "resized-f16_sharded": ("f16_sharded", "resized", True, 1),
    "resized_trained-bf16": ("bf16", "resized_trained", True, 1),
    "tied_embed-f32": ("tied_f32", "tied_embed", False, 1),
    "tied_tokens-bf16": ("tied_bf16", "tied_tokens", False, 1),
    "gpt2_conv1d-f32": ("gpt2_f32", "gpt2_conv1d", False, 1),
    "gpt2_conv1d-f16": ("gpt2_f16", "gpt2_conv1d", False, 1),
    "gpt2_embed-f32": ("gpt2_f32", "gpt2_embed", False, 1),
}


@pytest.fixture(scope="session")
def feat():
    with generated("generate_features", "lorafs-e2e-features-") as manifest:
        yield manifest


_peft_cache = {}


def peft_reference(feat, base, adapter, resize):
    """PEFT as a user does it: the base in its dtype (its vocabulary resized first when the
    adapter was trained with more tokens), PeftModel.from_pretrained, merge_and_unload."""
    key = (base, adapter)
    if key not in _peft_cache:
        from peft import PeftModel

        dtype = getattr(torch, feat["bases"][base]["dtype"])
        model = load_model(feat["bases"][base]["path"], dtype)
        if resize:
            model.resize_token_embeddings(feat["vocab"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, feat["adapters"][adapter]["path"])
            merged = peft_model.merge_and_unload().eval()
        _peft_cache.clear()  # keep one model in memory
        _peft_cache[key] = merged
    return _peft_cache[key]


def check_against_peft(merged_dir: Path, ref, dtype, max_ulp: int, base_dir: Path):
    """Every tensor of the merged model as loaded by transformers equals PEFT's within one
    rounding of the dtype (f32: within f32 noise), untouched tensors bit-identical, and the
    logits of a forward pass agree."""
    from transformers import AutoTokenizer

    model = load_model(merged_dir)
    assert model.dtype == dtype
    state = {k: v.detach() for k, v in model.state_dict().items()}
    want = {k: v.detach() for k, v in ref.state_dict().items()}
    assert set(state) == set(want), set(state) ^ set(want)
    base_state = load_model(base_dir).state_dict()
    changed = 0
    for name in sorted(state):
        L, P = state[name], want[name]
        assert L.dtype == P.dtype == dtype, name
        assert L.shape == P.shape, (name, L.shape, P.shape)
        if name in base_state and base_state[name].shape == P.shape and torch.equal(base_state[name], P):
            assert torch.equal(L, P), f"{name}: untouched tensor changed"
            continue
        changed += 1
        if dtype == torch.float32:
            bad = (L.double() - P.double()).abs() > 2 * ulp_of(P) + 1e-6 * (P.double().abs() + 1e-3)
        else:
            bad = ulp_distance(L, P) > max_ulp
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} of {bad.numel()} values differ from PEFT; first at "
            f"{int(bad.flatten().nonzero()[0])}: lorafs {float(L.flatten()[bad.flatten()][0])} "
            f"peft {float(P.flatten()[bad.flatten()][0])}"
        )
    assert changed > 0
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    batch = tok("A merged model is the base model plus its adapters.", return_tensors="pt")
    with torch.no_grad():
        got = model(**batch).logits.float()
        exp = ref(**batch).logits.float()
    scale = float(exp.abs().max())
    rtol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert float((got - exp).abs().max()) <= rtol * scale
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_materialize_and_mount(feat, lorafs, scratch, mounter, case):
    base, adapter, resize, max_ulp = CASES[case]
    base_dir = Path(feat["bases"][base]["path"])
    adapter_dir = Path(feat["adapters"][adapter]["path"])
    dtype = getattr(torch, feat["bases"][base]["dtype"])
    ref = peft_reference(feat, base, adapter, resize)

    out = scratch / "merged"
    lorafs.materialize(base_dir, out, [(adapter_dir, 1.0)])
    check_against_peft(out, ref, dtype, max_ulp, base_dir)

    mnt = mounter(base_dir, [(adapter_dir, 1.0)])
    assert files_of(mnt) == files_of(out)
    for rel in files_of(out):
        assert (mnt / rel).stat().st_size == (out / rel).stat().st_size, rel
        assert (mnt / rel).read_bytes() == (out / rel).read_bytes(), rel
    model = check_against_peft(mnt, ref, dtype, max_ulp, base_dir)
    del model

    if resize:
        config = json.loads((out / "config.json").read_text())
        assert config["vocab_size"] == feat["vocab"]
        # the adapter's tokenizer (with the added tokens) replaces the base's
        assert (out / "tokenizer.json").read_bytes() == (adapter_dir / "tokenizer.json").read_bytes()
        index = out / "model.safetensors.index.json"
        assert index.exists() == base.endswith("_sharded"), base
        if index.exists():
            from safetensors import safe_open

            itemsize = {"F16": 2, "BF16": 2, "F32": 4}
            total = 0
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                with safe_open(str(out / shard), "pt") as f:
                    for k in f.keys():
                        t = f.get_slice(k)
                        total += math.prod(t.get_shape()) * itemsize[t.get_dtype()]
            assert json.loads(index.read_text())["metadata"]["total_size"] == total


def test_inspect_lists_features(feat, lorafs):
    for adapter, words in {
        "dora": ["DoRA"],
        "dora_rslora": ["DoRA", "rsLoRA yes"],
        "lora_bias": ["lora_bias"],
        "tokens": ["trainable tokens", "model.embed_tokens.weight"],
        "resized": ["resized vocab", "384 -> 400", "lm_head.weight", "tokenizer"],
        "modules_to_save": ["replaces", "lm_head.weight"],
        "gpt2_conv1d": ["Conv1D"],
        "gpt2_embed": ["embedding LoRA"],
        "tied_embed": ["tied", "embedding LoRA"],
    }.items():
        base = feat["adapters"][adapter]["base"]
        p = lorafs.run("inspect", base, "--adapter", feat["adapters"][adapter]["path"], check=True)
        for w in words:
            assert w in p.stdout, f"{adapter}: {w!r} not in\n{p.stdout}"


# --------------------------------------------------------------------------------------
# refusals


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn):
    from safetensors.torch import load_file, save_file

    state = load_file(d / "adapter_model.safetensors")
    fn(state)
    save_file(state, d / "adapter_model.safetensors", metadata={"format": "pt"})


def _conv(state):
    state["base_model.model.model.layers.0.conv.lora_A.weight"] = torch.zeros(4, 8, 3, 3)
    state["base_model.model.model.layers.0.conv.lora_B.weight"] = torch.zeros(8, 4, 1, 1)


def _no_magnitude(state):
    for k in [k for k in state if "lora_magnitude_vector" in k]:
        del state[k]


REFUSALS = {
    # name: (adapter to start from, config changes, tensor edit, words of the message)
    "ia3": ("modules_to_save", dict(peft_type="IA3"), None, ["peft_type is IA3", "LoRA"]),
    "alora": ("modules_to_save", dict(alora_invocation_tokens=[5, 6]), None, ["aLoRA"]),
    "arrow": ("modules_to_save", dict(arrow_config={"top_k": 2}), None, ["Arrow"]),
    "qalora": ("modules_to_save", dict(use_qalora=True), None, ["QALoRA"]),
    "kasa": ("modules_to_save", dict(kasa_config={"k": 1}), None, ["KaSA"]),
    "layer_replication": ("modules_to_save", dict(layer_replication=[[0, 2]]), None, ["layer_replication"]),
    "pissa": ("modules_to_save", dict(init_lora_weights="pissa_niter_4"), None, ["pissa", "modified base"]),
    "olora": ("modules_to_save", dict(init_lora_weights="olora"), None, ["olora", "modified base"]),
    "corda": ("modules_to_save", dict(init_lora_weights="corda"), None, ["corda", "modified base"]),
    "lora_ga": ("modules_to_save", dict(init_lora_weights="lora_ga"), None, ["lora_ga", "modified base"]),
    "conv": ("modules_to_save", {}, _conv, ["convolution", "groups > 1"]),
    "dora_without_magnitude": ("dora", {}, _no_magnitude, ["DoRA", "lora_magnitude_vector"]),
}


@pytest.fixture(scope="session")
def refusal_inputs(feat):
    root = Path(tempfile.mkdtemp(prefix="lorafs-e2e-refuse-"))
    made = {}
    for name, (src, changes, edit, _) in REFUSALS.items():
        d = root / name
        shutil.copytree(feat["adapters"][src]["path"], d)
        if changes:
            _edit_config(d, **changes)
        if edit:
            _edit_tensors(d, edit)
        made[name] = d
    # a quantized base: q_proj stored as int8
    from safetensors.torch import load_file, save_file

    qbase = root / "quantized_base"
    shutil.copytree(feat["bases"]["f32"]["path"], qbase)
    state = load_file(qbase / "model.safetensors")
    for k in state:
        if k.endswith("q_proj.weight"):
            state[k] = (state[k] * 100).to(torch.int8)
    save_file(state, qbase / "model.safetensors", metadata={"format": "pt"})
    made["quantized"] = qbase
    yield made
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(REFUSALS) + ["quantized"])
def test_refused(feat, lorafs, scratch, refusal_inputs, name):
    if name == "quantized":
        base, adapter, words = refusal_inputs[name], Path(feat["adapters"]["dora"]["path"]), ["I8", "quantized"]
    else:
        base = Path(feat["bases"][feat_base(feat, REFUSALS[name][0])]["path"])
        adapter, words = refusal_inputs[name], REFUSALS[name][3]
    out = scratch / "merged"
    before = listing(scratch)
    p = lorafs.run("materialize", base, out, "--adapter", adapter)
    assert p.returncode != 0
    assert p.stderr.startswith("lorafs: error"), p.stderr
    for w in words:
        assert w in p.stderr, f"{w!r} not in {p.stderr!r}"
    assert "panicked" not in p.stderr
    assert not out.exists() and listing(scratch) == before

    mnt = scratch / "mnt"
    mnt.mkdir()
    try:
        p = lorafs.mount(base, mnt, [(adapter, 1.0)])
        assert p.returncode != 0
        for w in words:
            assert w in p.stderr, f"{w!r} not in {p.stderr!r}"
        assert not os.path.ismount(mnt)
        assert listing(mnt) == []
    finally:
        lorafs.unmount(mnt)


def feat_base(feat, adapter):
    path = feat["adapters"][adapter]["base"]
    return next(name for name, b in feat["bases"].items() if b["path"] == path)
