#!/usr/bin/env python3
"""Create tiny test fixtures for lorafs with the real transformers + peft (CPU, offline).

    python scripts/make_fixtures.py OUT_DIR

writes, deterministically (fixed seeds), in about ten seconds and a few MB:

    OUT_DIR/
      manifest.json            what follows, for the tests
      bases/f32 bases/f16 bases/bf16     one tiny Llama (same weights, three dtypes),
                                         model.safetensors + config + tokenizer
      bases/bf16_sharded                 the same in bf16, saved as several shards + index
      adapters/<name>/                   PEFT adapters (adapter_config.json +
                                         adapter_model.safetensors), trained on nothing:
                                         init_lora_weights=False so that B is non-zero
      bad/ia3  bad/pickle_only           inputs lorafs must refuse

Every adapter fits every base (they share the architecture). The tests compute the expected
merges themselves (PEFT's merge_and_unload and an f64 reference), so nothing here depends on
lorafs.

`generate(out_dir)` is importable (the e2e tests call it in-process).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

# The architecture: small, with odd sizes (intermediate 176, vocab 384 > tokenizer's 300) so
# that no shape is square by accident except the attention q/o projections.
ARCH = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)

BASES = {
    # name: (torch dtype, max_shard_size or None)
    "f32": (torch.float32, None),
    "f16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
    # ~ 280 KB of bf16 weights in shards of at most 64 KB: several shards and an index.
    "bf16_sharded": (torch.bfloat16, "64KB"),
}

# The LoRA adapters. `b_scale` shrinks PEFT's random lora_B (init_lora_weights=False gives
# kaiming-uniform B, large) so that deltas are about the size of the weights, as after
# training; it is applied before saving, so the saved factors are what they are.
ADAPTERS = {
    "all_linear": dict(
        config=dict(r=8, lora_alpha=16, target_modules="all-linear"), seed=101, b_scale=0.25
    ),
    "attn": dict(
        config=dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        seed=102,
        b_scale=0.25,
    ),
    "rslora": dict(
        config=dict(
            r=32,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        ),
        seed=103,
        b_scale=0.25,
    ),
    # rank_pattern / alpha_pattern, ranks 4..64, a float lora_alpha, and overlapping
    # patterns. PEFT takes the FIRST key, in the order of the saved adapter_config.json
    # (PEFT writes it with sorted keys, so the keys are listed here sorted, so that training
    # and loading agree), whose regex `(.*\.)?(KEY)$` matches the module name: layer 1's
    # v_proj gets 5.5 and layer 0's 24; "mlp.down_proj" shadows the later, more specific
    # "model.layers.0.mlp.down_proj" (99 is never used).
    "patterns": dict(
        config=dict(
            r=8,
            lora_alpha=12.5,
            target_modules="all-linear",
            rank_pattern={
                "down_proj": 4,
                "layers.1.self_attn.k_proj": 32,
                "model.layers.0.self_attn.q_proj": 64,
                "up_proj": 16,
            },
            alpha_pattern={
                "layers.0.mlp.gate_proj": 3,
                "mlp.down_proj": 7,
                "model.layers.0.mlp.down_proj": 99,
                "model.layers.1.self_attn.v_proj": 5.5,
                "o_proj": 64,
                "v_proj": 24,
            },
        ),
        seed=104,
        b_scale=0.25,
    ),
    # Embedding LoRA (lora_embedding_A/B, delta transposed) and the lm_head Linear, saved
    # without the embedding layers themselves (save_embedding_layers=False): pure LoRA.
    # lora_embedding_A is randn (std 1), so it is shrunk too.
    "embed_head": dict(
        config=dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "gate_proj"]),
        seed=105,
        b_scale=0.25,
        a_scale=0.02,
        save_embedding_layers=False,
    ),
    # The same targets saved the way PEFT does by default: it then also stores the full
    # embed_tokens and lm_head weights (`*.base_layer.weight`, to be loaded in place of the
    # base's). Their values equal the base's here, so the merged result is the same.
    "embed_saved": dict(
        config=dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head"]),
        seed=107,
        b_scale=0.25,
        a_scale=0.02,
    ),
    # Factors stored in bf16 (PEFT upcasts them to f32 before merging).
    "bf16_factors": dict(
        config=dict(r=16, lora_alpha=32, target_modules="all-linear"),
        seed=106,
        b_scale=0.25,
        factor_dtype=torch.bfloat16,
    ),
    # Three "checkpoints" of one run, merged one after another (the seed blog's loop).
    "ckpt1": dict(config=dict(r=8, lora_alpha=16, target_modules="all-linear"), seed=201, b_scale=0.2),
    "ckpt2": dict(config=dict(r=8, lora_alpha=16, target_modules="all-linear"), seed=202, b_scale=0.2),
    "ckpt3": dict(config=dict(r=8, lora_alpha=16, target_modules="all-linear"), seed=203, b_scale=0.2),
}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A merged model is the base model plus the low rank deltas of its adapters.",
    "lorafs serves a base model and LoRA adapters as if they had been merged.",
    "Hello world! Tokenizers are trained on a few sentences here, nothing is downloaded.",
    "Numbers like 0.5 and 1.5 weight each adapter; deltas are summed in f32.",
    "Once upon a time there was a tiny llama that lived in a temporary directory.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer():
    """A byte-level BPE (vocab 300) trained on SENTENCES, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    assert tok.get_vocab_size() <= ARCH["vocab_size"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=ARCH["max_position_embeddings"],
    )


def build_base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**ARCH)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Norm weights are initialised to exactly 1; perturb them so the model is less trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_base(model, tokenizer, out: Path, dtype, max_shard_size):
    m = model.to(dtype)
    m.config.dtype = dtype  # transformers v5 writes "dtype" into config.json
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    m.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    model.to(torch.float32)


def make_lora_adapter(base_f32_dir: Path, out: Path, spec: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_f32_dir, dtype=torch.float32)
    torch.manual_seed(spec["seed"])
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **spec["config"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(spec["b_scale"])
            if "lora_embedding_A" in name:
                p.mul_(spec.get("a_scale", 1.0))
            if "lora_" in name and spec.get("factor_dtype") is not None:
                p.data = p.data.to(spec["factor_dtype"])
    kwargs = {}
    if "save_embedding_layers" in spec:
        kwargs["save_embedding_layers"] = spec["save_embedding_layers"]
    peft_model.save_pretrained(out, **kwargs)
    assert (out / "adapter_model.safetensors").exists()


def make_ia3_adapter(base_f32_dir: Path, out: Path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_f32_dir, dtype=torch.float32)
    torch.manual_seed(301)
    cfg = IA3Config(
        task_type="CAUSAL_LM",
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    )
    get_peft_model(model, cfg).save_pretrained(out)


def make_pickle_adapter(base_f32_dir: Path, out: Path):
    """A LoRA adapter saved the old way: adapter_model.bin (a torch pickle) only."""
    spec = dict(config=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=302, b_scale=0.25)
    make_lora_adapter(base_f32_dir, out, spec)
    from safetensors.torch import load_file

    state = load_file(out / "adapter_model.safetensors")
    torch.save(state, out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()


def generate(out_dir) -> dict:
    """Create every fixture under out_dir (created if needed); return the manifest."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_base()

    bases = {}
    for name, (dtype, shard) in BASES.items():
        path = out / "bases" / name
        save_base(model, tokenizer, path, dtype, shard)
        bases[name] = dict(path=str(path), dtype=str(dtype).removeprefix("torch."), sharded=shard is not None)
    if not list((out / "bases" / "bf16_sharded").glob("model-*-of-*.safetensors")):
        raise RuntimeError("the sharded base was not sharded")
    if len(list((out / "bases" / "bf16_sharded").glob("model-*-of-*.safetensors"))) < 3:
        raise RuntimeError("the sharded base has fewer than 3 shards")

    base_f32 = out / "bases" / "f32"
    adapters = {}
    for name, spec in ADAPTERS.items():
        path = out / "adapters" / name
        make_lora_adapter(base_f32, path, spec)
        adapters[name] = dict(path=str(path), config=spec["config"])

    bad = {}
    make_ia3_adapter(base_f32, out / "bad" / "ia3")
    bad["ia3"] = str(out / "bad" / "ia3")
    make_pickle_adapter(base_f32, out / "bad" / "pickle_only")
    bad["pickle_only"] = str(out / "bad" / "pickle_only")

    manifest = dict(bases=bases, adapters=adapters, bad=bad, sentences=SENTENCES)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = generate(argv[1])
    total = sum(f.stat().st_size for f in Path(argv[1]).rglob("*") if f.is_file())
    print(
        f"{argv[1]}: {len(manifest['bases'])} bases, {len(manifest['adapters'])} adapters, "
        f"{len(manifest['bad'])} bad inputs, {total / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


# --------------------------------------------------------------------------------------
# Adapter features beyond plain LoRA (tests/e2e/test_features.py). Generated separately,
# by `generate_features(out_dir)`, so that the main fixtures stay as they are.

FEATURE_VOCAB = 400  # the resized vocabulary (base: ARCH["vocab_size"] = 384)

GPT2_ARCH = dict(vocab_size=384, n_positions=128, n_embd=48, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)


def _perturb(peft_model, pattern, scale, seed):
    """Add noise to every parameter whose name contains `pattern` (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if pattern in name:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _feature_adapter(base_dir: Path, out: Path, config: dict, seed: int, perturb=(), resize=None, tokenizer=None, **save):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if resize is not None:
        model.resize_token_embeddings(resize)
    torch.manual_seed(seed)
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **config)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.25)
            if "lora_embedding_A" in name:
                p.mul_(0.02)
    for i, (pattern, scale) in enumerate(perturb):
        _perturb(peft_model, pattern, scale, seed + i)
    peft_model.save_pretrained(out, **save)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    assert (out / "adapter_model.safetensors").exists()


def generate_features(out_dir) -> dict:
    """Bases and PEFT adapters for every mergeable feature, and inputs to refuse."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    bases = {}

    def save(model, name, dtype, shard=None):
        path = out / "bases" / name
        save_base(model, tokenizer, path, dtype, shard)
        bases[name] = dict(path=str(path), dtype=str(dtype).removeprefix("torch."))
        return path

    llama = build_base()
    f32 = save(llama, "f32", torch.float32)
    save(llama, "bf16", torch.bfloat16)
    save(llama, "f16_sharded", torch.float16, "64KB")

    torch.manual_seed(1)
    biased = LlamaForCausalLM(LlamaConfig(**{**ARCH, "attention_bias": True, "mlp_bias": True})).eval()
    with torch.no_grad():
        for name, p in biased.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    bias_f32 = save(biased, "bias_f32", torch.float32)
    save(biased, "bias_bf16", torch.bfloat16)

    torch.manual_seed(2)
    tied = LlamaForCausalLM(LlamaConfig(**{**ARCH, "tie_word_embeddings": True})).eval()
    tied_f32 = save(tied, "tied_f32", torch.float32)
    save(tied, "tied_bf16", torch.bfloat16)

    torch.manual_seed(3)
    gpt2 = GPT2LMHeadModel(GPT2Config(**GPT2_ARCH)).eval()
    gpt2_f32 = save(gpt2, "gpt2_f32", torch.float32)
    save(gpt2, "gpt2_f16", torch.float16)

    resized_tok = build_tokenizer()
    resized_tok.add_tokens([f"<extra_{i}>" for i in range(20)])

    A = out / "adapters"
    specs = {
        # modules_to_save (saved as plain lm_head.weight), LoRA on attention.
        "modules_to_save": (f32, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), dict(perturb=[("modules_to_save", 0.05)])),
        # DoRA on every Linear; the magnitudes moved away from their initial norms.
        "dora": (f32, dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True), dict(perturb=[("lora_magnitude_vector", 0.05)])),
        "dora_rslora": (f32, dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"], use_dora=True), dict(perturb=[("lora_magnitude_vector", 0.05)])),
        # lora_B.bias (needs base biases), and trained biases with bias="all".
        "lora_bias": (bias_f32, dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], lora_bias=True), dict(perturb=[("lora_B", 0.0)])),
        "bias_all": (bias_f32, dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all"), dict(perturb=[("bias", 0.05)])),
        # trainable tokens (rows of embed_tokens replaced) with LoRA on attention.
        "tokens": (f32, dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[5, 17, 200, 383]), dict(perturb=[("trainable_tokens_delta", 0.5)])),
        # resized vocabulary: embed_tokens/lm_head saved whole with more rows, + tokenizer.
        "resized": (f32, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), dict(resize=FEATURE_VOCAB, tokenizer=resized_tok, save_embedding_layers=True, perturb=[("embed_tokens", 0.02), ("lm_head", 0.02)])),
        # the same resized, with embed_tokens/lm_head trained whole (modules_to_save): PEFT
        # saves each as `X.weight` plus the wrapper's `X.modules_to_save.weight` and
        # `X.original_module.weight`, and loads only `X.weight`.
        "resized_trained": (f32, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]), dict(resize=FEATURE_VOCAB, tokenizer=resized_tok, perturb=[("modules_to_save", 0.02)])),
        # embedding LoRA on a tied model (lm_head shares embed_tokens' weight).
        "tied_embed": (tied_f32, dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]), dict(save_embedding_layers=False)),
        "tied_tokens": (tied_f32, dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[4, 9, 300]), dict(perturb=[("trainable_tokens_delta", 0.5)])),
        # GPT-2 Conv1D (c_attn (48,144), square attn c_proj, c_fc, mlp c_proj) and embedding LoRA on wte.
        "gpt2_conv1d": (gpt2_f32, dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), {}),
        "gpt2_embed": (gpt2_f32, dict(r=8, lora_alpha=16, target_modules=["wte", "c_attn"], fan_in_fan_out=True), dict(save_embedding_layers=False)),
    }
    adapters = {}
    for i, (name, (base_dir, config, kw)) in enumerate(specs.items()):
        kw = dict(kw)
        perturb = kw.pop("perturb", ())
        _feature_adapter(base_dir, A / name, config, seed=500 + i, perturb=perturb, **kw)
        adapters[name] = dict(path=str(A / name), base=str(base_dir))

    manifest = dict(bases=bases, adapters=adapters, sentences=SENTENCES, vocab=FEATURE_VOCAB)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
