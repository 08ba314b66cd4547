"""The llama.cpp side of the GGUF tests (tests/e2e/test_gguf.py): the pinned converter stack,
tiny models with real tokenizers, and a GGUF comparison that names what differs.

- `locate_stack()` finds the stack of scripts/gguf-env.sh: `site/` (llama-cpp-python,
  sentencepiece) and `llama.cpp/` (convert_hf_to_gguf.py, gguf-py, models/ggml-vocab-*.gguf).
- `generate_cases(root, stack)` writes tiny random bases (Llama, Mistral, Qwen2, Qwen3, and
  Phi3 as an architecture lorafs does not convert), PEFT LoRA adapters for them, and three
  kinds of tokenizer: a SentencePiece `tokenizer.model` trained here, and byte-level BPE
  `tokenizer.json`s rebuilt from llama.cpp's `ggml-vocab-llama-bpe.gguf` and
  `ggml-vocab-qwen2.gguf` (real vocabularies, so the converter's pre-tokenizer hash knows
  them), plus a freshly trained BPE whose hash nobody knows.
(The comparison of GGUF files is in gguf_compare.py.)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

TYPES = ("F32", "F16", "BF16", "Q8_0")  # lorafs --gguf TYPE; the converter's --outtype is the lower case


# --------------------------------------------------------------------------------------
# the llama.cpp stack (scripts/gguf-env.sh)


def _stack_dir() -> Path:
    """Where scripts/gguf-env.sh keeps the stack (its cache key is the script's to compute:
    the requirements and the build options), asked without building anything."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "gguf-env.sh"), "--dir"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@dataclasses.dataclass
class GgufStack:
    root: Path

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def llama_cpp(self) -> Path:
        return self.root / "llama.cpp"

    @property
    def converter(self) -> Path:
        return self.llama_cpp / "convert_hf_to_gguf.py"

    def problems(self) -> list[str]:
        need = [
            self.root / ".complete",
            self.converter,
            self.llama_cpp / "gguf-py" / "gguf" / "__init__.py",
            self.llama_cpp / "models" / "ggml-vocab-llama-bpe.gguf",
            self.llama_cpp / "models" / "ggml-vocab-qwen2.gguf",
            self.site / "llama_cpp" / "__init__.py",
            self.site / "sentencepiece" / "__init__.py",
        ]
        return [f"missing {p}" for p in need if not p.exists()]

    def env(self) -> dict[str, str]:
        """The environment of a converter or llama_cpp subprocess: the main virtualenv's
        Python with the stack's site and gguf-py on the path, offline."""
        path = [str(self.site), str(self.llama_cpp / "gguf-py")]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    def import_paths(self):
        """Make sentencepiece and gguf-py importable in this process (appended: the main
        virtualenv's packages keep precedence)."""
        for p in (str(self.llama_cpp / "gguf-py"), str(self.site)):
            if p not in sys.path:
                sys.path.append(p)

    def convert(self, model_dir: Path, outtype: str, outfile: Path, timeout=900) -> subprocess.CompletedProcess:
        """convert_hf_to_gguf.py MODEL_DIR --outtype OUTTYPE --outfile OUTFILE (not checked)."""
        cmd = [sys.executable, str(self.converter), str(model_dir), "--outtype", outtype.lower(), "--outfile", str(outfile)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=timeout)

    def generate(self, gguf: Path, prompt: str, n_tokens: int = 12, timeout=300) -> dict:
        """Greedy generation with llama_cpp.Llama in a subprocess (so that its mapping of a
        mounted file is gone when it returns): {"prompt": ids, "tokens": ids, "logits": first
        step's logits}."""
        proc = subprocess.run(
            [sys.executable, "-c", _GENERATE, str(gguf), prompt, str(n_tokens)],
            capture_output=True, text=True, env=self.env(), timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"llama_cpp on {gguf} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


# Greedy decoding, fixed seed, one thread count, a small context: the same file gives the
# same tokens. Llama.generate does not stop at EOS (the caller does): n tokens always.
_GENERATE = r"""
import json, sys
from llama_cpp import Llama
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=2, seed=1234, verbose=False, logits_all=True)
ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
out, logits = [], None
for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
    if logits is None:
        logits = [float(x) for x in llm.scores[llm.n_tokens - 1]]
    out.append(int(tok))
    if len(out) >= n:
        break
print(json.dumps({"prompt": ids, "tokens": out, "logits": logits}))
"""


def build_stack() -> GgufStack:
    """The stack of scripts/gguf-env.sh, built first if it is not yet (minutes, once): what
    the benchmarks use, where the tests only look for it (`locate_stack`)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "gguf-env.sh")], capture_output=True, text=True, check=True)
    return GgufStack(Path(out.stdout.strip()))


def locate_stack() -> tuple[GgufStack | None, str]:
    """(stack, "") or (None, why not). $LORAFS_GGUF_ENV names it (scripts/test.sh sets it);
    otherwise the folder gguf-env.sh would print, if it has been built."""
    given = os.environ.get("LORAFS_GGUF_ENV")
    root = Path(given) if given else _stack_dir()
    stack = GgufStack(root)
    problems = stack.problems()
    if problems:
        how = "$LORAFS_GGUF_ENV" if given else "the cache folder of scripts/gguf-env.sh"
        return None, (
            f"the llama.cpp stack at {root} ({how}) is incomplete: {problems[0]}; "
            "build it with `bash scripts/gguf-env.sh` and set LORAFS_GGUF_ENV to the folder it prints"
        )
    return stack, ""


# --------------------------------------------------------------------------------------
# tokenizers

WORDS = (
    "llama merge adapter tensor weight the a of model lorafs mount file quantize block row column token "
    "vocabulary hello world small random layer attention head key value query rotary norm embedding "
    "Äpfel нещо на Български 数据 模型 🦙 café naïve résumé"
).split()

CHAT_TEMPLATE_SPM = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def corpus(n=3000, seed=0) -> list[str]:
    rng = random.Random(seed)
    ends = [".", "!", "?", ",", " 123", " 4.5", " 2026", "\n"]
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(ends) for _ in range(n)]


def train_spm(out: Path, vocab_size=400) -> Path:
    """A Llama-style SentencePiece BPE (byte fallback, <unk> <s> </s> at 0 1 2), trained
    offline on generated text. Returns the tokenizer.model path."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return out / "tokenizer.model"


def spm_tokenizer(model_file: Path):
    """transformers' LlamaTokenizer over that SentencePiece model. (transformers 5 converts a
    tokenizer.model with protobuf, which the stack does not carry: the vocabulary and merges
    are read with sentencepiece and given to LlamaTokenizer directly, as its
    SentencePieceExtractor would.)"""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE_SPM
    for s in corpus(50, seed=1):
        want = sp.encode(s)
        got = tok(s, add_special_tokens=False)["input_ids"]
        if got != want:
            raise RuntimeError(f"LlamaTokenizer and sentencepiece disagree on {s!r}: {got} vs {want}")
    return tok


# The pre-tokenizers of Llama 3 and Qwen2 (their tokenizer.json files): a regex split, then
# byte-level without its own regex.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

CHAT_TEMPLATE_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATE_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def read_vocab_gguf(path: Path):
    """(tokens, token types, merges) of one of llama.cpp's models/ggml-vocab-*.gguf."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    return tokens, types, merges


def bpe_tokenizer(kind: str, stack: GgufStack):
    """A transformers fast tokenizer rebuilt from llama.cpp's vocabulary file for `kind`
    ("llama-bpe": Llama 3; "qwen2"): the byte-level BPE vocabulary and merges, the control
    tokens as special added tokens, the model's pre-tokenizer, normalizer and
    post-processor. Checked against the file's own test vectors (models/*.inp/.out)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, types, merges = read_vocab_gguf(stack.llama_cpp / "models" / f"ggml-vocab-{kind}.gguf")
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    control = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    assert list(normal.values()) == list(range(len(normal))), "control tokens expected after the normal ones"
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    split = LLAMA3_SPLIT if kind == "llama-bpe" else QWEN2_SPLIT
    tok = Tokenizer(models.BPE(vocab=normal, merges=pairs, ignore_merges=(kind == "llama-bpe"), byte_fallback=False))
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=kind == "llama-bpe", use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in control])
    assert all(tok.token_to_id(t) == i for i, t in control)
    if kind == "llama-bpe":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, normal.get(bos, 128000))]),
            ]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", model_max_length=131072,
            clean_up_tokenization_spaces=True,
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
            clean_up_tokenization_spaces=False,
        )
    fast.chat_template = CHAT_TEMPLATE_LLAMA3 if kind == "llama-bpe" else CHAT_TEMPLATE_CHATML
    _check_test_vectors(fast, stack.llama_cpp / "models" / f"ggml-vocab-{kind}.gguf")
    return fast


def _check_test_vectors(tok, vocab_file: Path):
    """llama.cpp's .inp/.out pairs (texts separated by __ggml_vocab_test__, expected ids
    without special tokens, a line each) must tokenize the same with the rebuilt tokenizer."""
    inp = Path(str(vocab_file) + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = Path(str(vocab_file) + ".out").read_text(encoding="utf-8").split("\n")
    for text, ids in zip(inp, out):
        want = [int(x) for x in ids.split()]
        got = tok(text, add_special_tokens=False)["input_ids"]
        if got != want:
            raise RuntimeError(f"rebuilt {vocab_file.name} tokenizer: {text!r} -> {got}, llama.cpp's test expects {want}")


def fresh_bpe_tokenizer():
    """A byte-level BPE trained here: its pre-tokenizer hash is in no table."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0], pad_token=specials[1])


def known_pre_tokenizer(tokenizer, stack: GgufStack) -> str | None:
    """The name the pinned converter's table gives this tokenizer's pre-tokenizer hash
    (sha256 of str(tokenizer.encode(chktxt))), or None. Read from conversion/base.py."""
    src = (stack.llama_cpp / "conversion" / "base.py").read_text(encoding="utf-8")
    chktxt = eval(re.search(r"\n\s*chktxt = ('.*')\n", src).group(1))  # a Python string literal there
    chkhsh = hashlib.sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()
    # A hash listed twice (MPT's and OLMo's) gets the later name: the table is a run of
    # `if`s, each overwriting `res`.
    names = re.findall(rf'chkhsh == "{chkhsh}":\n(?:\s*#.*\n)*\s*res = "([^"]+)"', src)
    return names[-1] if names else None


# --------------------------------------------------------------------------------------
# models and adapters

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class Case:
    """A base, its adapters [(dir, weight)], and what the converter must say about it."""

    name: str
    arch: str  # the transformers class, = config.json's architectures[0]
    tokenizer: str  # "spm", "spm-json" (without tokenizer.model), "llama-bpe", "qwen2", "fresh-bpe"
    dtype: str
    tied: bool
    base: Path
    adapters: list[tuple[Path, float]]
    tokenizer_pre: str | None  # tokenizer.ggml.pre the converter writes (None: refused)


# name: (transformers class, tokenizer, dtype, tied embeddings, extra config, adapters:
# [(lora config overrides, weight)]). Hidden 64, 2 layers, 4 query heads over 2 KV heads
# (GQA: the converter permutes k_proj with n_head_kv). Intermediate 176 is not a multiple
# of 32: ffn_down's rows cannot be Q8_0 blocks and the converter falls back to F16.
CASE_SPECS = {
    "llama_spm": ("LlamaForCausalLM", "spm", "float32", False, dict(intermediate_size=176), [({}, 1.0)]),
    # the SentencePiece tokenizer as transformers 5 saves it, tokenizer.json only (the
    # converter's LlamaHfVocab path), its settings without unk_token (TOKENIZER_SETTINGS):
    # transformers loads it as LlamaTokenizer, which names <unk> anyway
    "llama_spm_json": ("LlamaForCausalLM", "spm-json", "bfloat16", False, dict(intermediate_size=128), [({}, 1.0)]),
    "llama_bpe": ("LlamaForCausalLM", "llama-bpe", "bfloat16", False, dict(intermediate_size=128), [({}, 1.0)]),
    "mistral_spm": (
        "MistralForCausalLM", "spm", "float16", False,
        # vocab beyond the tokenizer's: the converter pads with [PAD] tokens
        dict(intermediate_size=128, vocab_size=448, sliding_window=None), [({}, 1.0)],
    ),
    "qwen2_bpe": (
        "Qwen2ForCausalLM", "qwen2", "bfloat16", True, dict(intermediate_size=176, vocab_size=151936),
        [({}, 1.0), (dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), 0.5)],
    ),
    "qwen3_bpe": ("Qwen3ForCausalLM", "qwen2", "bfloat16", False, dict(intermediate_size=128, head_dim=32), [({}, 1.0)]),
    # refused by lorafs's GGUF view; the converter handles it (fused qkv and gate_up)
    "phi3_spm": (
        "Phi3ForCausalLM", "spm", "bfloat16", False, dict(intermediate_size=128, pad_token_id=None),
        [(dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]), 1.0)],
    ),
    # a BPE pre-tokenizer no table knows: refused by the converter and by lorafs
    "llama_fresh_bpe": ("LlamaForCausalLM", "fresh-bpe", "bfloat16", False, dict(intermediate_size=128), [({}, 1.0)]),
    # Llama 3.x-style: tied embeddings, llama3 RoPE scaling (the converter adds a rope_freqs
    # tensor of its own) and a large theta
    "llama3_tied_bpe": (
        "LlamaForCausalLM", "llama-bpe", "bfloat16", True,
        dict(intermediate_size=128, rope_theta=500000.0, max_position_embeddings=131072,
             rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)),
        [({}, 1.0)],
    ),
    # YaRN RoPE scaling, an F16 base, a DoRA adapter
    "qwen2_yarn_bpe": (
        "Qwen2ForCausalLM", "qwen2", "float16", False,
        dict(intermediate_size=128, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64)),
        [(dict(use_dora=True), 1.0)],
    ),
    # special tokens that tokenizer_config.json names but tokenizer.json lacks
    # (NAMED_SPECIAL_TOKENS): transformers appends them when it loads the tokenizer, and the
    # converter writes them as control tokens in the room config.json's vocab_size leaves
    "llama_named_bpe": ("LlamaForCausalLM", "llama-bpe", "bfloat16", False, dict(intermediate_size=128, vocab_size=128300), [({}, 1.0)]),
    # a tokenizer saved before transformers 4.34 (LEGACY_SPECIAL_TOKENS_MAP): no
    # added_tokens_decoder in tokenizer_config.json, and a special_tokens_map.json that
    # transformers reads over it
    "llama_legacy_bpe": ("LlamaForCausalLM", "llama-bpe", "bfloat16", False, dict(intermediate_size=128, vocab_size=128300), [({}, 1.0)]),
    # transformers loads a qwen2 model's tokenizer.json as Qwen2Tokenizer, whatever its
    # tokenizer_class, which builds its own pipeline around the file's vocabulary and names
    # <|endoftext|> its unk and pad token where the settings do not (TOKENIZER_SETTINGS):
    # under Llama 3's vocabulary that token needs an id config.json's vocab_size lacks, and
    # with add_prefix_space the pre-tokenizer hash is unknown. The converter fails on both;
    # lorafs refuses both.
    "qwen2_llama3_bpe": ("Qwen2ForCausalLM", "llama-bpe", "bfloat16", False, dict(intermediate_size=128), [({}, 1.0)]),
    "qwen2_prefix_bpe": ("Qwen2ForCausalLM", "qwen2", "bfloat16", False, dict(intermediate_size=128), [({}, 1.0)]),
    # a base in several safetensors files (SHARDED): the converter takes the tensors file by
    # file, in the index's order
    "llama_sharded_spm": ("LlamaForCausalLM", "spm", "float16", False, dict(intermediate_size=128), [({}, 1.0)]),
    # tied embeddings with a LoRA on embed_tokens (the merged embedding is also the output
    # layer), and named chat templates in tokenizer_config.json (CHAT_TEMPLATES: the
    # converter writes `tokenizer.chat_template.NAME` and the list of names)
    "qwen2_tied_templates_bpe": (
        "Qwen2ForCausalLM", "qwen2", "bfloat16", True, dict(intermediate_size=128),
        [(dict(target_modules=["q_proj", "v_proj", "embed_tokens"]), 1.0)],
    ),
    # q/k/v/o and MLP biases: the converter permutes q_proj.bias and k_proj.bias like the
    # rows of their weights (1-D tensors, F32 in every type)
    "llama_bias_spm": (
        "LlamaForCausalLM", "spm", "bfloat16", False, dict(intermediate_size=128, attention_bias=True, mlp_bias=True),
        [({}, 1.0)],
    ),
}

# Special tokens added to a case's tokenizer after its base vocabulary (ids from the
# tokenizer's size up), and listed with the control tokens in tokenizer_config.json's
# "added_tokens_decoder" as transformers 4 wrote it (most published models; transformers 5
# keeps them in tokenizer.json only). The converter's SentencePiece path reads that table
# over the tokenizer.model.
ADDED_SPECIAL_TOKENS = {"mistral_spm": ["<|im_start|>", "<|im_end|>"]}


# Special tokens named in a case's tokenizer_config.json only (as a hand-edited config has
# them): a pad token, a model-specific `*_token` and an extra special token.
NAMED_SPECIAL_TOKENS = {"llama_named_bpe": dict(pad_token="[PAD]", image_token="<image>", extra_special_tokens=["<tool>"])}

# Bases saved in shards of at most this size (save_pretrained's max_shard_size).
SHARDED = {"llama_sharded_spm": "60KB"}

# Chat templates named in a case's tokenizer_config.json (a list, as transformers 4 saved
# several), with no chat_template.jinja beside it.
CHAT_TEMPLATES = {
    "qwen2_tied_templates_bpe": [
        dict(name="default", template="{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"),
        dict(name="tool_use", template="{{ tools | tojson }}{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    ],
}

# Other tokenizer_config.json settings of a case (None: the key left out).
TOKENIZER_SETTINGS = {"qwen2_prefix_bpe": dict(add_prefix_space=True), "llama_spm_json": dict(unk_token=None)}


# tokenizer_config.json settings, the special_tokens_map.json and the added_tokens.json of a
# case saved the old way. transformers 5 adds the table's tokens first (<new> not special,
# <x1> special: the config's extra list names it), takes the map's pad_token over the
# config's, the map's model-specific tokens before the config's (with the config's value for
# a key both name), the config's extra list with the map's appended, and ignores the map's
# deprecated additional_special_tokens then.
LEGACY_SPECIAL_TOKENS_MAP = {
    "llama_legacy_bpe": (
        dict(pad_token="<cfg-pad>", image_token="<i>", audio_token="<a>", extra_special_tokens=["<x1>"]),
        dict(pad_token="[PAD]", video_token=dict(content="<vid>", lstrip=False), image_token="<img>",
             extra_special_tokens=["<tool>", "<x1>"], additional_special_tokens=["<not-added>"]),
        {"<x1>": 128257, "<new>": 128256},
    )
}


def write_legacy_special_tokens_map(base: Path, config: dict, legacy: dict, table: dict):
    path = base / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("added_tokens_decoder", None)  # (transformers wrote none before 4.34)
    cfg.update(config)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    (base / "special_tokens_map.json").write_text(json.dumps(legacy, indent=2) + "\n")
    (base / "added_tokens.json").write_text(json.dumps(table, indent=2) + "\n")


def update_tokenizer_config(base: Path, settings: dict):
    path = base / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for key, value in settings.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_added_tokens_decoder(tok, base: Path):
    path = base / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["added_tokens_decoder"] = {
        str(i): dict(content=t.content, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        for i, t in sorted(tok.added_tokens_decoder.items())
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")

SUPPORTED = ("llama_spm", "llama_spm_json", "llama_bpe", "mistral_spm", "qwen2_bpe", "qwen3_bpe", "llama_bias_spm", "llama_named_bpe",
             "llama_legacy_bpe", "llama3_tied_bpe", "qwen2_yarn_bpe", "llama_sharded_spm", "qwen2_tied_templates_bpe")


def _config(arch: str, vocab_size: int, tied: bool, tok, extra: dict):
    import transformers

    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kw.update(extra)
    if kw["vocab_size"] < vocab_size:
        kw["vocab_size"] = vocab_size
    return config_cls(**kw)


def build_model(arch: str, config, seed: int):
    """Random weights in f32; norm weights and biases perturbed (they start at 1 and 0)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_adapter(model, out: Path, overrides: dict, seed: int, b_scale=0.05):
    """A PEFT LoRA adapter on `model` (f32, left unchanged), random A and B
    (init_lora_weights=False), B scaled so the merged model stays a sane model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = dict(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False, lora_dropout=0.0)
    cfg.update(overrides)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type="CAUSAL_LM", **cfg))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file()


def generate_cases(root: Path, stack: GgufStack, names=None) -> dict[str, Case]:
    """Write the bases and adapters of CASE_SPECS (or `names` of them) under root."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    stack.import_paths()
    root.mkdir(parents=True, exist_ok=True)
    spm_file = train_spm(root / "spm")
    tokenizers = {}

    def tokenizer(kind):
        if kind not in tokenizers:
            if kind in ("spm", "spm-json"):
                tokenizers[kind] = spm_tokenizer(spm_file)
            elif kind == "fresh-bpe":
                tokenizers[kind] = fresh_bpe_tokenizer()
            else:
                tokenizers[kind] = bpe_tokenizer(kind, stack)
        return tokenizers[kind]

    cases = {}
    for seed, (name, (arch, kind, dtype, tied, extra, adapter_specs)) in enumerate(CASE_SPECS.items()):
        if names is not None and name not in names:
            continue
        tok = tokenizer(kind)
        if name in ADDED_SPECIAL_TOKENS:
            tok = copy.deepcopy(tok)
            tok.add_special_tokens({"additional_special_tokens": ADDED_SPECIAL_TOKENS[name]})
        pre = known_pre_tokenizer(tok, stack) if kind not in ("spm", "spm-json") else "default"
        want_pre = {"spm": "default", "spm-json": "default", "llama-bpe": "llama-bpe", "qwen2": "qwen2", "fresh-bpe": None}[kind]
        if pre != want_pre:
            raise RuntimeError(f"{name}: the converter's table names this {kind} tokenizer {pre!r}, not {want_pre!r}")
        config = _config(arch, len(tok), tied, tok, extra)
        model = build_model(arch, config, seed=100 + seed)
        base = root / "bases" / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = copy.deepcopy(model).to(getattr(torch, dtype))
            stored.config.dtype = getattr(torch, dtype)
            stored.save_pretrained(base, **({"max_shard_size": SHARDED[name]} if name in SHARDED else {}))
            if name in SHARDED and len(list(base.glob("*.safetensors"))) < 2:
                raise RuntimeError(f"{name}: save_pretrained wrote one weights file, not shards")
            tok.save_pretrained(base)
            if kind == "spm":
                shutil.copy(spm_file, base / "tokenizer.model")
            if name in ADDED_SPECIAL_TOKENS:
                write_added_tokens_decoder(tok, base)
            if name in NAMED_SPECIAL_TOKENS:
                update_tokenizer_config(base, NAMED_SPECIAL_TOKENS[name])
            if name in CHAT_TEMPLATES:
                update_tokenizer_config(base, dict(chat_template=CHAT_TEMPLATES[name]))
                (base / "chat_template.jinja").unlink(missing_ok=True)
            if name in TOKENIZER_SETTINGS:
                update_tokenizer_config(base, TOKENIZER_SETTINGS[name])
            if name in LEGACY_SPECIAL_TOKENS_MAP:
                write_legacy_special_tokens_map(base, *LEGACY_SPECIAL_TOKENS_MAP[name])
            adapters = []
            for i, (overrides, weight) in enumerate(adapter_specs):
                path = root / "adapters" / f"{name}_{i}"
                make_adapter(model, path, overrides, seed=1000 + 10 * seed + i)
                adapters.append((path, weight))
        cases[name] = Case(name, arch, kind, dtype, tied, base, adapters, want_pre)
    return cases


def adapter_args(adapters) -> list[str]:
    args = []
    for path, w in adapters:
        args += ["--adapter", f"{path}:{w!r}" if w != 1.0 else str(path)]
    return args
