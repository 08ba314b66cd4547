"""`lorafs materialize` against PEFT's merge_and_unload, one adapter at a time."""

import json
from pathlib import Path

import pytest

from conftest import files_of

BASES = ["f32", "f16", "bf16", "bf16_sharded"]
SINGLE = ["all_linear", "attn", "rslora", "patterns", "embed_head", "bf16_factors"]


def same_layout(base: Path, out: Path):
    """The merged directory keeps the base's files: same names, and every file that is not
    a safetensors shard (config, tokenizer, index) byte-identical."""
    names = files_of(base)
    got = files_of(out)
    assert got == names
    for rel in names:
        if not rel.endswith(".safetensors"):
            assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("adapter", SINGLE)
def test_one_adapter(e2e, scratch, base, adapter):
    adapters = e2e.adapters([adapter])
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base(base), out, adapters)
    same_layout(e2e.base(base), out)
    stats = e2e.check_merged(out, base, adapters)
    print(f"{base}/{adapter}: {stats}")


@pytest.mark.parametrize("base", ["f32", "bf16"])
def test_one_adapter_weighted(e2e, scratch, base):
    adapters = e2e.adapters([("patterns", 0.3)])
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base(base), out, adapters)
    e2e.check_merged(out, base, adapters)


def test_sharded_index_kept(e2e, scratch):
    base = e2e.base("bf16_sharded")
    out = scratch / "merged"
    e2e.lorafs.materialize(base, out, e2e.adapters(["all_linear"]))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert all((out / s).is_file() for s in shards)


@pytest.mark.parametrize("base", ["f32", "bf16"])
def test_saved_embedding_layers(e2e, scratch, base):
    adapters = e2e.adapters(["embed_saved"])
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base(base), out, adapters)
    e2e.check_merged(out, base, adapters)


def test_force(e2e, scratch):
    """An existing output is refused without --force (and left alone), replaced with it."""
    out = scratch / "merged"
    out.mkdir()
    (out / "keep").write_text("mine")
    base, adapters = e2e.base("f16"), e2e.adapters(["attn"])
    args = ["materialize", base, out, *e2e.lorafs.adapter_args(adapters)]
    p = e2e.lorafs.run(*args)
    assert p.returncode != 0
    assert "exists" in p.stderr and "--force" in p.stderr, p.stderr
    assert [x.name for x in out.iterdir()] == ["keep"]
    e2e.lorafs.run(*args, "--force", check=True)
    assert not (out / "keep").exists()
    assert sorted(x.name for x in scratch.iterdir()) == ["merged"]
    e2e.check_merged(out, "f16", adapters)
