"""The GGUF view against llama.cpp's own converter (issue 13).

The reference for every GGUF lorafs writes is the pinned `convert_hf_to_gguf.py` (from the
llama-cpp-python sdist, scripts/gguf-env.sh) run on `lorafs materialize` of the same base and
adapters with `--outtype TYPE`. lorafs's file must have the same metadata keys in the same
order with the same types and values, except `gguf_compare.GGUF_KEY_EXCEPTIONS` (keys the
converter derives from the directory name), and the same tensors in the same order with the
same names, types, shapes, offsets and bytes.

Needs the llama.cpp stack: $LORAFS_GGUF_ENV (scripts/test.sh builds it and sets it), else the
folder scripts/gguf-env.sh caches it in. When LORAFS_GGUF_ENV is set, a missing stack is a
failure; without it the module is skipped, saying why.

Fixtures (gguf_models.CASE_SPECS): tiny Llama (one with attention and MLP biases), Mistral,
Qwen2 (tied embeddings, two adapters), Qwen3 bases with SentencePiece or real BPE (Llama 3,
Qwen2) tokenizers, special tokens named only in tokenizer_config.json or in a legacy
special_tokens_map.json; a base in several files; tied embeddings with a LoRA on them and
named chat templates; Phi3 (not converted by lorafs) and a Llama with a freshly trained BPE
(pre-tokenizer unknown).
The converter's output is made once per (case, type) per session and shared.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

import gguf_compare as gc
import gguf_models as gm

STACK, STACK_PROBLEM = gm.locate_stack()
REQUIRED = bool(os.environ.get("LORAFS_GGUF_ENV"))

pytestmark = pytest.mark.skipif(STACK is None and not REQUIRED, reason=STACK_PROBLEM or "no llama.cpp stack")

PROMPT = "hello world, the llama merge"


class Store:
    """Everything made once per session under one temporary root: fixtures, materialized
    directories, the converter's references, lorafs's GGUF files, llama.cpp generations."""

    def __init__(self, root: Path, lorafs, cases):
        self.root, self.lorafs, self.cases = root, lorafs, cases
        self._hf, self._ref, self._gguf, self._gen = {}, {}, {}, {}

    def hf_dir(self, case: str) -> Path:
        """`lorafs materialize BASE DIR --adapter ...`: the merged HF directory."""
        if case not in self._hf:
            c = self.cases[case]
            out = self.root / "materialized" / case
            out.parent.mkdir(parents=True, exist_ok=True)
            self.lorafs.materialize(c.base, out, c.adapters)
            self._hf[case] = out
        return self._hf[case]

    def reference(self, case: str, gtype: str) -> Path:
        """convert_hf_to_gguf.py on the materialized directory, --outtype gtype."""
        key = (case, gtype)
        if key not in self._ref:
            out = self.root / "reference" / f"{case}-{gtype}.gguf"
            out.parent.mkdir(parents=True, exist_ok=True)
            proc = STACK.convert(self.hf_dir(case), gtype, out)
            if proc.returncode != 0:
                pytest.fail(f"convert_hf_to_gguf.py --outtype {gtype.lower()} on {case} failed:\n{proc.stderr[-4000:]}")
            self._ref[key] = out
        return self._ref[key]

    def lorafs_gguf(self, case: str, gtype: str) -> Path:
        """`lorafs materialize BASE OUT.gguf --adapter ... --gguf TYPE`, alone in its folder."""
        key = (case, gtype)
        if key not in self._gguf:
            c = self.cases[case]
            folder = self.root / "lorafs" / f"{case}-{gtype}"
            folder.mkdir(parents=True)
            out = folder / f"{case}-{gtype}.gguf"
            self.lorafs.materialize(c.base, out, c.adapters, "--gguf", gtype)
            assert gm_listing(folder) == [out.name], f"materialize left other files: {gm_listing(folder)}"
            self._gguf[key] = out
        return self._gguf[key]

    def generation(self, path: Path) -> dict:
        key = str(path)
        if key not in self._gen:
            self._gen[key] = STACK.generate(path, PROMPT)
        return self._gen[key]


def gm_listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


@pytest.fixture(scope="session")
def stack():
    if STACK is None:
        pytest.fail(f"LORAFS_GGUF_ENV is set but {STACK_PROBLEM}")
    return STACK


@pytest.fixture(scope="session")
def store(stack, lorafs):
    root = Path(tempfile.mkdtemp(prefix="lorafs-e2e-gguf-"))
    try:
        cases = gm.generate_cases(root / "fixtures", stack)
        yield Store(root, lorafs, cases)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def assert_same_as_converter(got: Path, want: Path):
    problems, excepted = gc.gguf_differences(got, want)
    if problems:
        pytest.fail(gc.format_differences(got, want, problems))
    return excepted


def assert_same_bytes(path: Path, want: bytes, seed: int):
    """`path` reads as `want`: whole file, random preads (header, boundaries, past the end),
    and an mmap (shared, populated, as llama.cpp maps a model)."""
    assert os.path.getsize(path) == len(want), f"{path}: size {os.path.getsize(path)}, expected {len(want)}"
    got = Path(path).read_bytes()
    if got != want:
        pytest.fail(f"{path}: whole-file read differs at byte {gc.first_difference(got, want)}")
    rng = random.Random(seed)
    n = len(want)
    ranges = [(0, 4096), (n - 100, 4096), (n, 10), (n // 2, 1)]
    ranges += [(rng.randrange(n), rng.choice([1, 31, 4096, 65536, 1 << 20])) for _ in range(200)]
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, size in ranges:
            off = max(off, 0)
            data = os.pread(fd, size, off)
            if data != want[off : off + size]:
                d = gc.first_difference(data, want[off : off + size])
                pytest.fail(f"{path}: pread({size} bytes at {off}) differs at byte {off + d}")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(fd, n, flags=flags, prot=mmap.PROT_READ) as m:
            for off, size in ranges[4:]:
                if m[off : off + size] != want[off : off + size]:
                    pytest.fail(f"{path}: mmap[{off}:{off + size}] differs")
            if m[:] != want:
                pytest.fail(f"{path}: mmap of the whole file differs at byte {gc.first_difference(m[:], want)}")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# the fixtures and the reference themselves (need only the existing `lorafs materialize`)


@pytest.mark.parametrize("case", gm.SUPPORTED)
def test_converter_reference(store, case):
    """The converter accepts every supported fixture: the tokenizer is recognised as meant,
    the type rules show (Q8_0: 2-D tensors with 32-divisible rows quantized, the rest F16,
    1-D F32), and llama.cpp runs the result."""
    c = store.cases[case]
    for gtype in gm.TYPES:
        g = gc.parse_gguf(store.reference(case, gtype))
        assert g.value("general.architecture") == {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}.get(c.arch, "llama")
        assert g.value("tokenizer.ggml.pre") == c.tokenizer_pre
        assert g.value("tokenizer.ggml.model") == ("llama" if c.tokenizer in ("spm", "spm-json") else "gpt2")
        assert g.value("tokenizer.chat_template"), "no chat template"
        names = [t.name for t in g.tensors]
        assert ("output.weight" in names) != c.tied, names
        if case == "llama3_tied_bpe":  # the converter's own tensor, first
            assert names[0] == "rope_freqs.weight", names[:3]
        if case == "qwen2_yarn_bpe":
            assert g.value("qwen2.rope.scaling.type") == "yarn", g.value("qwen2.rope.scaling.type")
        if case == "llama_spm_json":  # <unk>, named by LlamaTokenizer only, a control token
            assert g.value("tokenizer.ggml.tokens")[0] == "<unk>" and g.value("tokenizer.ggml.token_type")[0] == 3
        if case == "llama_named_bpe":  # appended after the 128256 tokens, as control tokens
            tokens, types = g.value("tokenizer.ggml.tokens"), g.value("tokenizer.ggml.token_type")
            assert tokens[128256:128260] == ["[PAD]", "<image>", "<tool>", "[PAD128259]"], tokens[128256:128260]
            assert types[128256:128260] == [3, 3, 3, 5], types[128256:128260]
        for t in g.tensors:
            if len(t.shape) == 1:
                want = "F32"
            elif gtype == "Q8_0":
                want = "Q8_0" if t.shape[0] % 32 == 0 else "F16"
            else:
                want = gtype
            assert gc.GGML_TYPES.get(t.ggml_type) == want, (gtype, t.name, t.shape, t.ggml_type)
    for gtype in ("F16", "Q8_0"):
        out = store.generation(store.reference(case, gtype))
        assert len(out["tokens"]) == 12 and out["prompt"], out
        again = STACK.generate(store.reference(case, gtype), PROMPT)
        assert again["tokens"] == out["tokens"], "llama.cpp's greedy generation is not deterministic here"


# --------------------------------------------------------------------------------------
# lorafs's GGUF against the converter's


@pytest.mark.parametrize("gtype", gm.TYPES)
@pytest.mark.parametrize("case", gm.SUPPORTED)
def test_materialize_gguf_matches_converter(store, case, gtype):
    got = store.lorafs_gguf(case, gtype)
    excepted = assert_same_as_converter(got, store.reference(case, gtype))
    assert set(excepted) <= gc.GGUF_KEY_EXCEPTIONS


def test_named_chat_templates_reach_the_gguf(store):
    """The named templates of qwen2_tied_templates_bpe are in the converter's file and in
    lorafs's (the comparison with the converter would pass as well if neither had them)."""
    case = "qwen2_tied_templates_bpe"
    for path in (store.reference(case, "F16"), store.lorafs_gguf(case, "F16")):
        g = gc.parse_gguf(path)
        assert g.value("tokenizer.chat_templates") == ["tool_use"], (path, g.value("tokenizer.chat_templates"))
        assert "tools" in g.value("tokenizer.chat_template.tool_use", ""), path
        assert "<|im_start|>" in g.value("tokenizer.chat_template", ""), path


@pytest.mark.parametrize("case", gm.SUPPORTED)
def test_mounted_gguf_matches_converter_and_materialize(store, mounter, case):
    """One mount with every type: each model-TYPE.gguf equals the converter's file (with
    the exceptions) and, byte for byte however it is read, lorafs's materialized file; the
    safetensors files are still there."""
    c = store.cases[case]
    mnt = mounter(c.base, c.adapters, "--gguf", ",".join(gm.TYPES))
    names = gm_listing(mnt)
    for gtype in gm.TYPES:
        assert f"model-{gtype}.gguf" in names, names
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names), names
    for i, gtype in enumerate(gm.TYPES):
        path = mnt / f"model-{gtype}.gguf"
        assert_same_as_converter(path, store.reference(case, gtype))
        assert_same_bytes(path, store.lorafs_gguf(case, gtype).read_bytes(), seed=i)


@pytest.mark.parametrize("case", gm.SUPPORTED)
def test_llama_cpp_generates_from_the_mount(store, mounter, case):
    """llama.cpp maps model-F16.gguf and model-Q8_0.gguf from the mount and generates the
    tokens (and first logits) it generates from the converter's files."""
    c = store.cases[case]
    mnt = mounter(c.base, c.adapters, "--gguf", "F16,Q8_0")
    for gtype in ("F16", "Q8_0"):
        got = STACK.generate(mnt / f"model-{gtype}.gguf", PROMPT)
        want = store.generation(store.reference(case, gtype))
        assert got["prompt"] == want["prompt"]
        assert got["tokens"] == want["tokens"], f"{gtype}: {got['tokens']} from the mount, {want['tokens']} from the converter's file"
        diff = max(abs(a - b) for a, b in zip(got["logits"], want["logits"]))
        assert diff == 0.0, f"{gtype}: first-step logits differ by up to {diff}"


def test_each_view_gets_the_gguf(store, mounter):
    """With views, every view's directory holds the GGUF of its own merge."""
    c = store.cases["llama_spm"]
    adapter = c.adapters[0][0]
    mnt = mounter(c.base, [], "--view", f"full={adapter}", "--view", f"half={adapter}:0.5", "--gguf", "F16")
    assert "model-F16.gguf" not in gm_listing(mnt)
    assert_same_as_converter(mnt / "full" / "model-F16.gguf", store.reference("llama_spm", "F16"))
    half = store.root / "lorafs-views" / "half.gguf"
    half.parent.mkdir(parents=True, exist_ok=True)
    store.lorafs.materialize(c.base, half, [(adapter, 0.5)], "--gguf", "F16")
    # (equal to the materialized file but for the keys a name may set: a view has its own)
    assert_same_as_converter(mnt / "half" / "model-F16.gguf", half)
    problems, _ = gc.gguf_differences(mnt / "half" / "model-F16.gguf", mnt / "full" / "model-F16.gguf")
    assert any(p.startswith("tensor blk.0.attn_q.weight") for p in problems), "the two views have the same weights"


# --------------------------------------------------------------------------------------
# refusals, and the converter on a mount


def test_refuses_an_unsupported_architecture(store, tmp_path):
    """Phi3 (which the converter handles) is refused by name, pointing at the converter;
    nothing is written and nothing mounted."""
    c = store.cases["phi3_spm"]
    out = tmp_path / "phi3.gguf"
    proc = store.lorafs.run("materialize", c.base, out, *gm.adapter_args(c.adapters), "--gguf", "F16")
    assert proc.returncode != 0, proc.stdout
    assert "Phi3ForCausalLM" in proc.stderr and "convert_hf_to_gguf.py" in proc.stderr, proc.stderr
    assert gm_listing(tmp_path) == [], gm_listing(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = store.lorafs.mount(c.base, mnt, c.adapters, "--gguf", "F16")
    try:
        assert proc.returncode != 0, proc.stdout
        assert "Phi3ForCausalLM" in proc.stderr and "convert_hf_to_gguf.py" in proc.stderr, proc.stderr
        assert not os.path.ismount(mnt)
    finally:
        store.lorafs.unmount(mnt)


def test_converter_runs_on_a_mount(store, mounter):
    """What the refusal advises works: convert_hf_to_gguf.py on the mount of an architecture
    lorafs does not convert writes what it writes from a materialized copy, but for the
    keys it takes from the directory name."""
    c = store.cases["phi3_spm"]
    mnt = mounter(c.base, c.adapters)
    out = store.root / "phi3-from-mount.gguf"
    proc = STACK.convert(mnt, "f16", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = store.root / "phi3-from-materialized.gguf"
    proc = STACK.convert(store.hf_dir("phi3_spm"), "f16", ref)
    assert proc.returncode == 0, proc.stderr[-4000:]
    excepted = assert_same_as_converter(out, ref)
    assert set(excepted) == {"general.name"}, excepted


def test_refuses_an_unknown_bpe_pre_tokenizer(store, tmp_path):
    """A freshly trained BPE: the converter refuses it (the fixture is what it claims), and
    lorafs refuses it too, naming the pre-tokenizer and the converter."""
    c = store.cases["llama_fresh_bpe"]
    proc = STACK.convert(store.hf_dir("llama_fresh_bpe"), "f16", tmp_path / "ref.gguf")
    assert proc.returncode != 0 and "BPE pre-tokenizer was not recognized" in proc.stderr, proc.stderr[-2000:]
    out = tmp_path / "out" / "fresh.gguf"
    out.parent.mkdir()
    proc = store.lorafs.run("materialize", c.base, out, *gm.adapter_args(c.adapters), "--gguf", "F16")
    assert proc.returncode != 0, proc.stdout
    assert "pre-tokenizer" in proc.stderr.lower() and "convert_hf_to_gguf.py" in proc.stderr, proc.stderr
    assert gm_listing(out.parent) == []


@pytest.mark.parametrize(
    "tokenizer_class, settings, converter_error",
    [
        # GPTNeoXTokenizer names a pad token the file lacks, <|padding|>: transformers adds
        # it, an id past config.json's vocab_size, and the converter fails on that
        ("GPTNeoXTokenizerFast", {}, "AssertionError"),
        # CohereTokenizer names default special tokens (<PAD>, <UNK>, ...) the file lacks
        ("CohereTokenizerFast", {}, "AssertionError"),
    ],
)
def test_refuses_a_tokenizer_class_it_does_not_model(store, tmp_path, tokenizer_class, settings, converter_error):
    """A class transformers builds itself from tokenizer.json, other than the three lorafs
    models, named in tokenizer_config.json of a Llama: lorafs refuses it by name, writing
    nothing. The converter reads what the class builds, here with special tokens the file
    lacks (a tester's sweep found the file's pipeline taken for the class's where the
    vocabulary has them: another pre-tokenizer with add_prefix_space, a missing pad token)."""
    c = store.cases["llama_bpe"]
    base = tmp_path / "base"
    shutil.copytree(c.base, base)
    gm.update_tokenizer_config(base, {"tokenizer_class": tokenizer_class, **settings})
    hf = tmp_path / "hf"
    proc = store.lorafs.run("materialize", base, hf, *gm.adapter_args(c.adapters))
    assert proc.returncode == 0, proc.stderr
    proc = STACK.convert(hf, "f16", tmp_path / "ref.gguf")
    assert proc.returncode != 0 and converter_error in proc.stderr, proc.stderr[-2000:]
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    proc = store.lorafs.run("materialize", base, out, *gm.adapter_args(c.adapters), "--gguf", "F16")
    assert proc.returncode != 0, proc.stdout
    name = tokenizer_class.removesuffix("Fast")
    assert f'tokenizer_class "{name}"' in proc.stderr and "convert_hf_to_gguf.py" in proc.stderr, proc.stderr
    assert gm_listing(out.parent) == []


@pytest.mark.parametrize("saved_by", ["4.57.1", "5.24.0"])
def test_a_mistral_tokenizer_transformers_patches_is_refused(store, tmp_path, saved_by):
    """A Mistral with Llama 3's tokenizer.json whose settings ask for fix_mistral_regex:
    saved by transformers 4, transformers replaces the pre-tokenizer's split (the converter
    then meets a hash it does not know) and lorafs refuses, naming the setting; saved by
    transformers 5 the file is loaded as it is, and lorafs writes the converter's GGUF."""
    c = store.cases["llama_bpe"]
    base = tmp_path / "base"
    shutil.copytree(c.base, base)
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", transformers_version=saved_by)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    gm.update_tokenizer_config(base, {"fix_mistral_regex": True})
    hf = tmp_path / "hf"
    proc = store.lorafs.run("materialize", base, hf, *gm.adapter_args(c.adapters))
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "ref.gguf"
    converted = STACK.convert(hf, "f16", ref)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    proc = store.lorafs.run("materialize", base, out, *gm.adapter_args(c.adapters), "--gguf", "F16")
    if saved_by.startswith("4."):
        assert converted.returncode != 0, "the converter took the patched tokenizer"
        assert "BPE pre-tokenizer was not recognized" in converted.stderr, converted.stderr[-2000:]
        assert proc.returncode != 0, proc.stdout
        assert "fix_mistral_regex" in proc.stderr and "convert_hf_to_gguf.py" in proc.stderr, proc.stderr
        assert gm_listing(out.parent) == []
    else:
        assert converted.returncode == 0, converted.stderr[-4000:]
        assert proc.returncode == 0, proc.stderr
        excepted = assert_same_as_converter(out, ref)
        assert set(excepted) <= gc.GGUF_KEY_EXCEPTIONS


@pytest.mark.parametrize(
    "case, converter_error, lorafs_error",
    [
        ("qwen2_llama3_bpe", "AssertionError", "vocab_size 128256 is not above the tokenizer's largest id 128256"),
        ("qwen2_prefix_bpe", "BPE pre-tokenizer was not recognized", "is not one llama.cpp knows"),
    ],
)
def test_refuses_what_the_tokenizer_class_leaves_unconvertible(store, tmp_path, case, converter_error, lorafs_error):
    """A qwen2 model's tokenizer is built as Qwen2Tokenizer builds it (its pipeline, its
    default special tokens): the converter fails on these two, and lorafs refuses them,
    writing nothing."""
    c = store.cases[case]
    proc = STACK.convert(store.hf_dir(case), "f16", tmp_path / "ref.gguf")
    assert proc.returncode != 0 and converter_error in proc.stderr, proc.stderr[-2000:]
    out = tmp_path / "out" / f"{case}.gguf"
    out.parent.mkdir()
    proc = store.lorafs.run("materialize", c.base, out, *gm.adapter_args(c.adapters), "--gguf", "F16")
    assert proc.returncode != 0, proc.stdout
    assert lorafs_error in proc.stderr, proc.stderr
    assert gm_listing(out.parent) == []


# --------------------------------------------------------------------------------------
# the model card: README.md's YAML front matter, read by the converter's gguf.Metadata

# name: (README.md of the base, keys the converter must write from it). The base is a copy
# of llama_spm's with this README; the adapter keeps its own README (PEFT's card), which
# neither a materialized copy nor the GGUF view uses.
CARDS = {
    # license with name and link, tags plus pipeline_tag, languages as a list (with the
    # "Norway problem": `- no`), keys the converter ignores
    "license_tags_languages": (
        "---\nlicense: other\nlicense_name: acme-research\nlicense_link: https://example.org/LICENSE\n"
        "tags:\n- text-generation\n- lora\npipeline_tag: text-generation\nlanguage:\n- en\n- fr\n- no\n"
        "library_name: transformers\ninference: false\n---\n\n# A model\n\nSome text with --- in it.\n",
        {"general.license", "general.license.name", "general.license.link", "general.tags", "general.languages"},
    ),
    # single strings: a language, a tag, a base model `org/name`, a dataset id
    "strings": (
        "---\nlicense: apache-2.0\nlanguage: en\ntags: chat\nbase_model: meta-llama/Llama-3.2-1B-Instruct\n"
        "datasets: HuggingFaceH4/ultrachat_200k\n---\n",
        {"general.license", "general.languages", "general.tags", "general.base_model.count",
         "general.base_model.0.name", "general.base_model.0.organization", "general.base_model.0.repo_url",
         "general.dataset.count", "general.dataset.0.name", "general.dataset.0.repo_url"},
    ),
    # lists of base models and datasets: ids with versions, Hugging Face and other URLs,
    # mappings, an entry the converter cannot read (counted, empty); the card's name,
    # author, description, version and source URL; a license list
    "lists_and_names": (
        "---\nmodel_name: Acme Tiny Chat\nmodel_creator: Acme Labs\ndescription: 'A tiny model: for tests'\n"
        "version: v2.1\nurl: https://acme.example/tiny\ndoi: 10.1234/tiny\nlicense: [mit, apache-2.0]\n"
        "base_model:\n- mistralai/Mistral-7B-Instruct-v0.2\n- https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct\n"
        "- https://example.org/models/other\n- {name: Own Base, author: Someone, url: 'https://own.example'}\n"
        "- 42\ndatasets:\n- https://huggingface.co/datasets/tatsu-lab/alpaca\n- org/data-v3\n"
        "- {name: Private, organization: Acme}\nlanguage: [en, de]\n---\nbody\n",
        {"general.name", "general.author", "general.description", "general.version", "general.source.url",
         "general.source.doi", "general.license", "general.base_model.count", "general.base_model.0.version",
         "general.base_model.1.organization", "general.base_model.2.repo_url", "general.base_model.3.author",
         "general.dataset.count", "general.dataset.1.version", "general.dataset.2.organization",
         "general.languages"},
    ),
    # YAML 1.1 as PyYAML reads it: `yes`/`on` booleans, ints, a quoted number, anchors and
    # a merge key, a card size label, tabs (the converter turns them into spaces), CRLF
    "yaml_1_1": (
        "---\r\nlicense: &lic mit\r\nlicense_name: *lic\r\ntags: [1, 2, 3]\r\nlanguage:\r\n\t- en\r\n"
        "size_label: 7B\r\nbase_model:\r\n- <<: {name: Merged, version: '1.0'}\r\n  author: Someone\r\n"
        "datasets:\r\n- on\r\n---\r\n",
        {"general.license", "general.license.name", "general.tags", "general.languages", "general.size_label",
         "general.base_model.count", "general.base_model.0.name", "general.base_model.0.version",
         "general.base_model.0.author", "general.dataset.count"},
    ),
    # no front matter; front matter that is not a mapping; an empty one: only the name
    "no_front_matter": ("# Model\n\nlicense: mit\n---\ntags: [a]\n---\n", set()),
    "not_a_mapping": ("---\n- license\n- mit\n---\n", set()),
    "empty_front_matter": ("---\n---\n# Model\n", set()),
}

CARD_KEYS = ("general.author", "general.description", "general.license", "general.source", "general.base_model",
             "general.dataset", "general.tags", "general.languages", "general.version", "general.organization",
             "general.size_label")


def card_base(store, name: str, readme: str) -> Path:
    """llama_spm's base copied, with `readme` as its README.md."""
    base = store.root / "cards" / name
    if not base.exists():
        shutil.copytree(store.cases["llama_spm"].base, base)
        (base / "README.md").write_bytes(readme.encode())
    return base


def card_keys(path: Path) -> dict:
    return {k.name: k.value for k in gc.parse_gguf(path).keys if k.name.startswith(CARD_KEYS) or k.name == "general.name"}


@pytest.mark.parametrize("card", list(CARDS))
def test_model_card_keys_match_converter(store, mounter, card):
    """The keys the converter takes from README.md's front matter, through materialize and
    a mount: same keys, types, values and order as its file (general.name too when the card
    names the model), the card's keys really there, and the mount's file equal to
    materialize's byte for byte."""
    readme, want_keys = CARDS[card]
    c = store.cases["llama_spm"]
    base = card_base(store, card, readme)
    hf = store.root / "cards-materialized" / card
    hf.parent.mkdir(parents=True, exist_ok=True)
    store.lorafs.materialize(base, hf, c.adapters)
    assert (hf / "README.md").read_bytes() == (base / "README.md").read_bytes(), "a materialized copy has the base's card"
    ref = store.root / "cards-reference" / f"{card}.gguf"
    ref.parent.mkdir(parents=True, exist_ok=True)
    proc = STACK.convert(hf, "F16", ref)
    if proc.returncode != 0:
        pytest.fail(f"convert_hf_to_gguf.py on {card} failed:\n{proc.stderr[-4000:]}")
    ref_keys = card_keys(ref)
    missing = {k for k in want_keys if k not in ref_keys}
    assert not missing, f"the converter did not write {missing} (the fixture is not what it claims): {ref_keys}"
    out = store.root / "cards-lorafs" / card / f"{card}.gguf"
    out.parent.mkdir(parents=True)
    store.lorafs.materialize(base, out, c.adapters, "--gguf", "F16")
    excepted = assert_same_as_converter(out, ref)
    assert set(excepted) <= gc.GGUF_KEY_EXCEPTIONS, excepted
    # The card's keys, with their values, even those the comparison leaves out when they come
    # from the directory name (general.name, general.version): from a card they are equal.
    got_keys = card_keys(out)
    if "general.name" not in want_keys:
        got_keys.pop("general.name", None), ref_keys.pop("general.name", None)
    assert got_keys == ref_keys
    mnt = mounter(base, c.adapters, "--gguf", "F16")
    assert_same_as_converter(mnt / "model-F16.gguf", ref)
    assert_same_bytes(mnt / "model-F16.gguf", out.read_bytes(), seed=7)


@pytest.mark.parametrize(
    "readme, why, converter_error",
    [
        ("---\nlicense: [mit\ntags: a\n---\n", "YAML", "yaml.parser.ParserError"),  # malformed YAML
        ("---\nversion: 1.5\n---\n", "version", "TypeError"),  # a number where the converter writes text
        ("---\ntags: [a, 1]\n---\n", "tags", "same type"),  # a list of mixed types
    ],
    ids=["malformed_yaml", "number_as_text", "mixed_list"],
)
def test_model_card_the_converter_fails_on_is_refused(store, tmp_path, readme, why, converter_error):
    """A card the converter raises on: lorafs refuses the GGUF view, naming README.md,
    through materialize and mount; nothing written, nothing mounted."""
    c = store.cases["llama_spm"]
    base = card_base(store, f"bad-{why}", readme)
    hf = tmp_path / "hf"
    store.lorafs.materialize(base, hf, c.adapters)
    proc = STACK.convert(hf, "F16", tmp_path / "ref.gguf")
    assert proc.returncode != 0, f"the converter accepted the card: {proc.stderr[-2000:]}"
    assert converter_error in proc.stderr, proc.stderr[-2000:]
    out = tmp_path / "out" / "card.gguf"
    out.parent.mkdir()
    proc = store.lorafs.run("materialize", base, out, *gm.adapter_args(c.adapters), "--gguf", "F16")
    assert proc.returncode != 0, proc.stdout
    assert "README.md" in proc.stderr and "convert_hf_to_gguf.py" in proc.stderr, proc.stderr
    assert why in proc.stderr, proc.stderr
    assert gm_listing(out.parent) == []
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = store.lorafs.mount(base, mnt, c.adapters, "--gguf", "F16")
    try:
        assert proc.returncode != 0, proc.stdout
        assert "README.md" in proc.stderr, proc.stderr
        assert not os.path.ismount(mnt)
    finally:
        store.lorafs.unmount(mnt)


def test_cold_map_leaves_a_benchmark_directory_as_it_found_it(store, lorafs_bin, tmp_path):
    """scripts/cold_map.py run in a benchmark's directory that also holds files and a folder
    of the user's named as its own once were: one round, then every file there as it was
    and nothing of its own left (it works in a new directory of its own)."""
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("cold_map.py runs as root (it drops the page cache and mounts)")
    case = store.cases["llama_spm"]
    work = tmp_path / "bench"
    work.mkdir()
    shutil.copytree(case.base, work / "base")
    shutil.copytree(case.adapters[0][0], work / "adapter")
    theirs = {".lorafs-bench": "scratch", "cold-map-disk.gguf": "user's",
              "cold-map.perf": "user's", "cold-map-mnt/notes.txt": "user's"}
    (work / "cold-map-mnt").mkdir()
    for name, text in theirs.items():
        (work / name).write_text(text)
    before = sorted(os.listdir(work))
    script = Path(__file__).resolve().parents[2] / "scripts" / "cold_map.py"
    # The bare mapping, then llama.cpp's load a moment after each mount (--llama --gap).
    for extra, timed in (([], "MAP_SHARED|MAP_POPULATE"), (["--llama", "--gap", "0.05"], "llama_cpp.Llama load")):
        run = subprocess.run([sys.executable, str(script), "--dir", str(work), "--runs", "1", "--lorafs",
                              str(lorafs_bin), *extra, "new="], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert timed in run.stdout and "disk" in run.stdout and "new" in run.stdout, run.stdout
        assert sorted(os.listdir(work)) == before
        assert {name: (work / name).read_text() for name in theirs} == theirs
