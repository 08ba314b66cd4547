"""Inputs lorafs must refuse: a clear message, a non-zero exit, and nothing written (no
output directory, no temporary leftovers, no mount)."""

import os

import pytest

from conftest import listing

BAD = {
    # (fixture key in manifest["bad"], words the message must contain)
    "ia3": ["IA3", "LoRA"],
    "pickle_only": ["adapter_model.bin", "pickle"],
}


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("position", ["alone", "second"])
def test_materialize_refuses(e2e, lorafs, scratch, bad, position):
    bad_dir = e2e.m["bad"][bad]
    adapters = [(bad_dir, 1.0)]
    if position == "second":
        adapters = e2e.adapters(["attn"]) + adapters
    out = scratch / "merged"
    before = listing(scratch)
    inputs = [e2e.base("f16")] + [d for d, _ in adapters]
    inputs_before = [listing(d) for d in inputs]
    p = lorafs.run("materialize", e2e.base("f16"), out, *lorafs.adapter_args(adapters))
    assert p.returncode != 0
    assert p.stderr.startswith("lorafs: error"), p.stderr
    for word in BAD[bad]:
        assert word in p.stderr, f"{word!r} not in {p.stderr!r}"
    assert str(bad_dir) in p.stderr, p.stderr
    assert "panicked" not in p.stderr and "RUST_BACKTRACE" not in p.stderr
    assert not out.exists()
    assert listing(scratch) == before
    # nothing written into the inputs either
    assert [listing(d) for d in inputs] == inputs_before


@pytest.mark.parametrize("bad", sorted(BAD))
def test_inspect_refuses(e2e, lorafs, bad):
    p = lorafs.run("inspect", e2e.base("bf16"), "--adapter", e2e.m["bad"][bad])
    assert p.returncode != 0
    for word in BAD[bad]:
        assert word in p.stderr, p.stderr


@pytest.mark.parametrize("bad", sorted(BAD))
def test_mount_refuses(e2e, lorafs, scratch, bad):
    mnt = scratch / "mnt"
    mnt.mkdir()
    try:
        p = lorafs.mount(e2e.base("bf16"), mnt, [(e2e.m["bad"][bad], 1.0)], timeout=60)
        assert p.returncode != 0
        for word in BAD[bad]:
            assert word in p.stderr, p.stderr
        assert not os.path.ismount(mnt)
        assert listing(mnt) == []
    finally:
        lorafs.unmount(mnt)


def test_missing_adapter_dir(e2e, lorafs, scratch):
    out = scratch / "merged"
    missing = scratch / "no-such-adapter"
    p = lorafs.run("materialize", e2e.base("f16"), out, "--adapter", missing)
    assert p.returncode != 0
    assert str(missing) in p.stderr, p.stderr
    assert not out.exists()


def test_adapter_for_another_model(e2e, lorafs, scratch):
    """An adapter whose shapes do not fit the base is an error naming the tensor, never
    silently skipped."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = e2e.adapter("attn")
    bad = scratch / "wrong-shape"
    shutil.copytree(src, bad)
    state = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("q_proj.lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)
    save_file(state, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    assert json.loads((bad / "adapter_config.json").read_text())["peft_type"] == "LORA"
    out = scratch / "merged"
    p = lorafs.run("materialize", e2e.base("f16"), out, "--adapter", bad)
    assert p.returncode != 0
    assert "q_proj" in p.stderr and "shape" in p.stderr, p.stderr
    assert not out.exists()


def run_script(script, *args):
    """Run scripts/`script` (Python with this interpreter, a shell script with bash)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    runner = ["bash"] if script.endswith(".sh") else [sys.executable]
    return subprocess.run([*runner, str(repo / "scripts" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script, args", [("bench_mount.py", ["--dir", "DIR"]),
                                          ("bench_views.py", ["--dir", "DIR"]),
                                          ("bench_gguf.py", ["--dir", "DIR"]),
                                          ("cold_map.py", ["--dir", "DIR", "new="]),
                                          ("bench_read.sh", ["DIR"])])
def test_a_benchmark_never_writes_into_or_removes_a_directory_it_did_not_make(tmp_path, script, args):
    """A directory of the user's named as the benchmark's (DIR in `args`): refused before
    anything runs, left as it was (the benchmarks remove their scratch directory when done;
    cold_map.py works in one a benchmark left)."""
    if script == "bench_gguf.py" and os.geteuid() != 0:
        pytest.skip("bench_gguf.py refuses to run as anyone but root before it reads --dir")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    run = run_script(script, *(mine if a == "DIR" else a for a in args))
    assert run.returncode != 0 and "was not made by a lorafs benchmark" in run.stderr, run.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
