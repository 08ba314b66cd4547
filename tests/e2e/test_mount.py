"""`lorafs mount`: the mounted directory loads in transformers as PEFT's merge, and serves the
same bytes as `lorafs materialize`. Needs /dev/fuse and mount rights (CI: root); a mount that
fails is a failing test, never a skip."""

import errno
import os
import random
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import files_of

CASES = {
    "f32-all_linear": ("f32", ["all_linear"]),
    "f16-embed_head": ("f16", ["embed_head"]),
    "bf16-patterns": ("bf16", ["patterns"]),
    "bf16_sharded-rslora": ("bf16_sharded", ["rslora"]),
    "bf16_sharded-weighted": ("bf16_sharded", [("ckpt1", 0.5), ("ckpt2", 1.5), ("ckpt3", -0.25)]),
    "f16-mixed": ("f16", ["attn", ("rslora", 0.75), "patterns", ("embed_head", 2.0)]),
}


def assert_same_tree(mnt: Path, out: Path):
    """Same file names and sizes, byte-identical contents, and safe_open reads the same
    tensors (names, dtypes, shapes, bits) and metadata from both."""
    from safetensors import safe_open

    assert files_of(mnt) == files_of(out)
    for rel in files_of(out):
        assert (mnt / rel).stat().st_size == (out / rel).stat().st_size, rel
        assert (mnt / rel).read_bytes() == (out / rel).read_bytes(), rel
        if rel.endswith(".safetensors"):
            with safe_open(str(mnt / rel), "pt") as a, safe_open(str(out / rel), "pt") as b:
                assert a.metadata() == b.metadata(), rel
                assert sorted(a.keys()) == sorted(b.keys()), rel
                for k in a.keys():
                    x, y = a.get_tensor(k), b.get_tensor(k)
                    assert x.dtype == y.dtype and x.shape == y.shape, (rel, k)
                    assert x.view(-1).view(torch.uint8).equal(y.view(-1).view(torch.uint8)), (rel, k)


def random_reads(mnt: Path, out: Path, seed: int, count: int = 300):
    """pread at random offsets and lengths (across tensor boundaries, past the end) through
    the mount equals the same range of the materialized file."""
    rng = random.Random(seed)
    names = [r for r in files_of(out) if r.endswith(".safetensors")]
    for _ in range(count):
        rel = rng.choice(names)
        data = (out / rel).read_bytes()
        off = rng.randrange(0, len(data) + 64)
        length = rng.choice([1, 2, 3, 7, 100, 4096, 65536 + 5, 1 << 20])
        fd = os.open(mnt / rel, os.O_RDONLY)
        try:
            got = os.pread(fd, length, off)
        finally:
            os.close(fd)
        assert got == data[off : off + length], (rel, off, length)


@pytest.mark.parametrize("case", list(CASES))
def test_mount_matches_peft_and_materialize(e2e, scratch, mounter, case):
    base, spec = CASES[case]
    adapters = e2e.adapters(spec)
    mnt = mounter(e2e.base(base), adapters)
    stats = e2e.check_merged(mnt, base, adapters)
    print(f"mount {case}: {stats}")
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base(base), out, adapters)
    assert_same_tree(mnt, out)
    random_reads(mnt, out, seed=zlib.crc32(case.encode()))


def test_mount_concurrent_reads(e2e, scratch, mounter):
    """Several threads reading through one mount (small cache: evictions) see the right bytes."""
    adapters = e2e.adapters([("ckpt1", 0.5), ("ckpt2", 1.5)])
    mnt = mounter(e2e.base("bf16_sharded"), adapters, "--cache-size", "64KiB")
    out = scratch / "merged"
    e2e.lorafs.materialize(e2e.base("bf16_sharded"), out, adapters)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: random_reads(mnt, out, seed=s, count=100), range(8)))
    assert_same_tree(mnt, out)


def test_mount_is_read_only(e2e, mounter):
    mnt = mounter(e2e.base("f16"), e2e.adapters(["attn"]))
    target = next(mnt.glob("*.safetensors"))
    with pytest.raises(OSError) as err:
        with open(target, "r+b") as f:
            f.write(b"x")
    assert err.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    with pytest.raises(OSError):
        (mnt / "new-file").write_bytes(b"x")
    assert not (mnt / "new-file").exists()


def _server_pids(mnt: Path):
    """Processes whose command line names this mountpoint (the lorafs server we started)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a == str(mnt).encode() for a in argv) and any(b"lorafs" in a for a in argv[:1]):
            pids.append(int(p.name))
    return pids


def test_unmount_ends_the_server(e2e, lorafs, mounter):
    mnt = mounter(e2e.base("bf16"), e2e.adapters(["all_linear"]))
    assert os.path.ismount(mnt)
    # the mount outlives the `lorafs mount` command (it daemonized)
    assert files_of(mnt)
    pids = _server_pids(mnt)
    assert pids, f"no lorafs server process found for {mnt}"
    p = lorafs.run("unmount", mnt, timeout=30)
    assert p.returncode == 0, p.stderr
    assert not os.path.ismount(mnt)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not left, f"lorafs server(s) {left} still running after unmount"
    assert list(mnt.iterdir()) == []


def test_unmount_not_a_mount(lorafs, scratch):
    p = lorafs.run("unmount", scratch, timeout=30)
    assert p.returncode != 0
    assert "lorafs: error" in p.stderr
