"""The Python API (`import lorafs`), as installed from the wheel: mount, load with
transformers, compare with PEFT, unmount; materialize and inspect; views changed live;
errors; the mount's lifecycle (an exception in `with`, a model that outlives the block, an
interpreter that exits or is killed).

scripts/test.sh builds the wheel from the repository, installs it into the test
virtualenv, and sets LORAFS_BIN to the binary it installed with LORAFS_E2E_INSTALLED=1, so
that these tests run the installed package and its binary (test_installed_package_is_the_wheels
checks it). Run by hand: `pip install --force-reinstall --no-deps $(bash scripts/wheel.sh)`
into the venv first."""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import files_of, listing, load_model

try:
    import lorafs
except ImportError as err:  # a failure, not a skip: the API is what is under test
    raise ImportError(
        f"the lorafs package is not installed in {sys.prefix}: "
        "pip install --force-reinstall --no-deps $(bash scripts/wheel.sh)"
    ) from err


def server_exited(pid: int, within: float = 10.0) -> bool:
    """Whether process `pid` is gone (or a zombie waiting to be reaped) within `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def tmp_in_scratch(scratch, monkeypatch):
    """Temporary mount points made by the API go into `scratch`, where the test can see
    that they are removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


# --------------------------------------------------------------------------------------
# the installed package


def test_installed_package_is_the_wheels(monkeypatch):
    """`import lorafs` is the installed wheel's package (in site-packages, not the source
    tree), and the binary it runs is the one the wheel installed beside it."""
    site = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
    package = Path(lorafs.__file__).resolve().parent
    assert package.parent in site, f"lorafs imported from {package}, not from {site}"
    dist = importlib.metadata.distribution("lorafs")
    scripts = [f for f in dist.files if f.name == "lorafs" and f.parent.name == "bin"]
    assert len(scripts) == 1, dist.files
    installed = Path(dist.locate_file(scripts[0])).resolve()
    assert installed.is_file() and os.access(installed, os.X_OK), installed
    monkeypatch.delenv("LORAFS_BIN", raising=False)
    assert Path(lorafs.find_lorafs_bin()).resolve() == installed
    version = subprocess.run([installed, "--version"], capture_output=True, text=True, check=True)
    assert lorafs.__version__ in version.stdout, (lorafs.__version__, version.stdout)
    assert (package / "py.typed").is_file()
    if os.environ.get("LORAFS_E2E_INSTALLED") == "1":
        # scripts/test.sh: every e2e test must run the installed binary.
        monkeypatch.undo()
        assert Path(os.environ["LORAFS_BIN"]).resolve() == installed


def test_python_m_lorafs_runs_the_command():
    ok = subprocess.run([sys.executable, "-m", "lorafs", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("lorafs "), ok
    bad = subprocess.run(
        [sys.executable, "-m", "lorafs", "unmount", "/nonexistent-lorafs-mnt"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.startswith("lorafs: error: "), bad


def test_help_documents_the_package():
    import pydoc

    text = pydoc.render_doc(lorafs, renderer=pydoc.plaintext)
    for word in ["lorafs.mount(", "from_pretrained", "materialize", "LorafsError", "set_view"]:
        assert word in text, word
    for function in [lorafs.mount, lorafs.materialize, lorafs.inspect, lorafs.unmount, lorafs.Mount.stats]:
        assert function.__doc__ and function.__annotations__, function


# --------------------------------------------------------------------------------------
# mount, load, compare with PEFT


def test_mount_loads_as_peft_merge(e2e, tmp_in_scratch):
    adapters = e2e.adapters(["attn", ("rslora", 0.5)])
    spec = [str(adapters[0][0]), (str(adapters[1][0]), 0.5)]  # a str and a (path, weight)
    with lorafs.mount(e2e.base("f16"), adapters=spec, cache_size="2MiB") as m:
        assert m.path.parent == tmp_in_scratch and os.path.ismount(m.path)
        e2e.check_merged(m.path, "f16", adapters)
        stats = m.stats()
        assert isinstance(stats["pid"], int) and isinstance(stats["kernel"], str), stats
        assert stats["bytes_merged"] > 0 and stats["panics_caught"] == 0, stats
        pid = stats["pid"]
    gc.collect()
    assert not m.mounted and not m.path.exists(), "the temporary mount point is left"
    assert listing(tmp_in_scratch) == []
    assert server_exited(pid), f"server {pid} still running after the with block"


def test_every_mount_option_is_a_keyword(e2e, scratch):
    adapters = e2e.adapters(["attn"])
    log = scratch / "server.log"
    mnt = scratch / "given"  # does not exist: made, and removed after
    with lorafs.mount(
        e2e.base("f16"),
        mnt,
        adapters=[adapters[0][0]],
        cache_size=1 << 20,
        base_read_ahead="8MiB",
        dtype=torch.float32,
        direct_io=False,
        warm="never",
        threads=2,
        allow_other=True,
        noexec=True,
        read_ahead_kb=0,
        max_background=32,
        transport="dev",
        log_file=log,
    ) as m:
        assert m.path == mnt and m.created_mountpoint
        assert json.loads((m.path / "config.json").read_text())["dtype"] == "float32"
        assert load_model(m.path).dtype == torch.float32
        options = next(line for line in open("/proc/self/mountinfo") if f" {m.path} " in line)
        assert "allow_other" in options and "noexec" in options.split()[5].split(","), options
        assert m.stats()["read_ahead_budget"] == 8 << 20
        assert m.stats()["transport"] == "dev"
    assert not mnt.exists()
    assert log.stat().st_size > 0, "the server logged nothing to log_file"


# --------------------------------------------------------------------------------------
# the lifecycle


def test_model_outlives_the_with_block(e2e, tmp_in_scratch):
    """transformers keeps the safetensors files mapped for as long as the model lives: the
    plain unmount is busy, leaving the block detaches the mount lazily, the model keeps
    working, and the server exits once the model is gone."""
    adapters = e2e.adapters(["attn"])
    with lorafs.mount(e2e.base("f16"), adapters=[adapters[0][0]]) as m:
        model = load_model(m.path)
        pid = m.stats()["pid"]
        mapped = [line for line in open("/proc/self/maps") if str(m.path) in line]
        assert mapped, "transformers no longer maps the files: see docs/PYTHON.md"
        with pytest.raises(lorafs.LorafsError, match="busy"):
            m.unmount(lazy=False)
        assert m.mounted
    assert not m.path.exists()
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    assert not server_exited(pid, within=0.5), "the server must serve the mapped files"
    del model
    gc.collect()
    assert server_exited(pid), f"server {pid} still running once the model is gone"


def test_exception_inside_with_unmounts(e2e, tmp_in_scratch):
    adapters = [e2e.adapter("attn")]
    with pytest.raises(ZeroDivisionError):
        with lorafs.mount(e2e.base("f16"), adapters=adapters) as m:
            pid = m.stats()["pid"]
            1 / 0
    assert not m.mounted and not m.path.exists()
    assert server_exited(pid)


def test_unmount_failure_does_not_hide_the_exception(e2e, tmp_in_scratch):
    """The mount is gone when the block ends (unmounted by hand), so leaving it fails: that
    is a warning, and the block's own exception is what the caller sees."""
    with pytest.raises(KeyError, match="from the block"), pytest.warns(RuntimeWarning, match="not mounted"):
        with lorafs.mount(e2e.base("f16"), adapters=[e2e.adapter("attn")]) as m:
            lorafs.unmount(m.path)
            raise KeyError("from the block")
    os.rmdir(m.path)  # the mount point the API made, left because the unmount failed


def test_a_dead_server_is_still_cleaned_up(e2e, tmp_in_scratch):
    """The server killed under the block (the mount answers ENOTCONN): leaving the block
    still unmounts and removes the mount point."""
    with lorafs.mount(e2e.base("f16"), adapters=[e2e.adapter("attn")]) as m:
        pid = m.stats()["pid"]
        os.kill(pid, signal.SIGKILL)
        assert server_exited(pid)
        with pytest.raises(OSError):
            os.listdir(m.path)
    assert not m.path.exists() and listing(tmp_in_scratch) == []


def test_given_mount_point_is_kept(e2e, scratch):
    mnt = scratch / "mnt"
    mnt.mkdir()
    with lorafs.mount(e2e.base("f16"), mnt, adapters=[e2e.adapter("attn")]) as m:
        assert not m.created_mountpoint and "config.json" in listing(mnt)
    assert mnt.is_dir() and listing(mnt) == []


def test_without_with(e2e, tmp_in_scratch):
    """unmount() by hand; a Mount dropped without it is unmounted when collected (with a
    ResourceWarning); one still mounted when the interpreter exits is unmounted then."""
    m = lorafs.mount(e2e.base("f16"), adapters=[e2e.adapter("attn")])
    assert repr(m).endswith("mounted>") and os.fspath(m) == str(m.path)
    m.unmount()
    m.unmount()  # once is enough; again is nothing
    assert not m.path.exists()

    m = lorafs.mount(e2e.base("f16"), adapters=[e2e.adapter("attn")])
    path = m.path
    with pytest.warns(ResourceWarning, match="implicitly unmounting"):
        del m
        gc.collect()
    assert not path.exists()

    script = (
        "import sys, lorafs\n"
        "m = lorafs.mount(sys.argv[1], adapters=[sys.argv[2]])\n"
        "print(m.path, m.stats()['pid'], flush=True)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, e2e.base("f16"), e2e.adapter("attn")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_in_scratch)},
    )
    assert child.returncode == 0, child.stderr
    path, pid = child.stdout.split()
    assert not os.path.exists(path), "an interpreter that exits must unmount and remove its mount point"
    assert server_exited(int(pid))


def test_mount_of_a_killed_interpreter_is_cleaned_by_lorafs_unmount(e2e, lorafs_bin, tmp_in_scratch):
    script = (
        "import sys, time, lorafs\n"
        "m = lorafs.mount(sys.argv[1], adapters=[sys.argv[2]])\n"
        "print(m.path, m.stats()['pid'], flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, e2e.base("f16"), e2e.adapter("attn")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_in_scratch)},
    )
    try:
        path, pid = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert os.path.ismount(path), "the server outlives the interpreter that started it"
    assert "config.json" in listing(path)
    done = subprocess.run([lorafs_bin, "unmount", path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(path) and server_exited(int(pid))
    os.rmdir(path)  # the killed interpreter's temporary mount point (empty: rmdir only)


# --------------------------------------------------------------------------------------
# materialize, inspect


def test_materialize_equals_the_command(e2e, scratch):
    adapters = e2e.adapters([("ckpt1", 0.5), ("ckpt2", 1.5)])
    by_api = scratch / "api"
    got = lorafs.materialize(e2e.base("bf16_sharded"), by_api, adapters=adapters, dtype="f32")
    assert got == by_api
    by_cli = scratch / "cli"
    e2e.lorafs.materialize(e2e.base("bf16_sharded"), by_cli, adapters, "--dtype", "f32")
    assert files_of(by_api) == files_of(by_cli)
    for rel in files_of(by_cli):
        assert (by_api / rel).read_bytes() == (by_cli / rel).read_bytes(), rel
    with pytest.raises(lorafs.LorafsError, match="exists"):
        lorafs.materialize(e2e.base("bf16_sharded"), by_api, adapters=adapters, dtype="f32")
    lorafs.materialize(e2e.base("bf16_sharded"), by_api, adapters=adapters[:1], force=True)
    assert load_model(by_api).dtype == torch.bfloat16


def test_inspect_is_the_commands_json(e2e, lorafs_bin):
    adapters = [(e2e.adapter("attn"), 1.0), (e2e.adapter("rslora"), 0.5)]
    plan = lorafs.inspect(e2e.base("f16"), adapters=adapters)
    assert isinstance(plan, dict) and plan
    cli = subprocess.run(
        [lorafs_bin, "inspect", e2e.base("f16"), "--adapter", adapters[0][0], "--adapter",
         f"{adapters[1][0]}:0.5", "--json"],
        capture_output=True, text=True, check=True,
    )
    assert plan == json.loads(cli.stdout)
    text = json.dumps(plan)
    assert str(e2e.adapter("rslora")) in text and "0.5" in text, text[:2000]
    views = lorafs.inspect(e2e.base("f16"), views={"a": [adapters[0][0]], "b": adapters})
    assert [v["name"] for v in views["views"]] == ["a", "b"], views


# --------------------------------------------------------------------------------------
# views


def test_views_changed_live(e2e, scratch, tmp_in_scratch):
    a, b, c = (e2e.adapter(n) for n in ("ckpt1", "ckpt2", "ckpt3"))
    api = lorafs
    with api.mount(e2e.base("f16"), views={"a": [a], "mix": [(a, 0.5), (b, 0.5)]}) as m:
        assert [v["name"] for v in m.views()] == ["a", "mix"]
        assert {v["source"] for v in m.views()} == {"named"}
        m.add_view("c", [c])
        m.set_view("mix", [(b, 0.25), (c, 0.75)])
        views = {v["name"]: v for v in m.views()}
        assert sorted(views) == ["a", "c", "mix"]
        assert [(x["dir"], x["weight"]) for x in views["mix"]["adapters"]] == [(str(b), 0.25), (str(c), 0.75)]
        want = scratch / "want"
        e2e.lorafs.materialize(e2e.base("f16"), want, [(b, 0.25), (c, 0.75)])
        for rel in files_of(want):
            assert (m.path / "mix" / rel).read_bytes() == (want / rel).read_bytes(), rel
        m.remove_view("c")
        assert listing(m.path) == ["a", "mix"]
        with pytest.raises(api.LorafsError) as err:
            m.add_view("bad", [scratch / "no-such-adapter"])
        assert "no-such-adapter" in str(err.value)
        assert listing(m.path) == ["a", "mix"]


def test_catalog(e2e, scratch, tmp_in_scratch):
    import shutil

    catalog = scratch / "outputs"
    for step, name in ((100, "ckpt1"), (200, "ckpt2")):
        shutil.copytree(e2e.adapter(name), catalog / "run1" / f"checkpoint-{step}")
    with lorafs.mount(e2e.base("f16"), catalog=catalog, factor_cache="64MiB") as m:
        views = m.views()
        assert [v["name"] for v in views] == ["run1/checkpoint-100", "run1/checkpoint-200"]
        assert {v["source"] for v in views} == {"catalog"}
        assert "config.json" in listing(m.path / "run1" / "checkpoint-200")


# --------------------------------------------------------------------------------------
# errors


def test_errors_carry_the_commands_message(e2e, scratch, tmp_in_scratch):
    api = lorafs
    missing = scratch / "no-such-adapter"
    with pytest.raises(api.LorafsError) as err:
        api.mount(e2e.base("f16"), adapters=[missing])
    e = err.value
    assert str(missing) in str(e) and not str(e).startswith("lorafs:"), str(e)
    assert e.message == str(e) and e.returncode == 1 and e.command[1] == "mount"
    assert f"lorafs: error: {e.message}" in e.stderr
    assert listing(tmp_in_scratch) == [], "a failed mount left its temporary mount point"

    with pytest.raises(api.LorafsError, match="no-such-base"):
        api.materialize(scratch / "no-such-base", scratch / "out", adapters=[e2e.adapter("attn")])
    assert not (scratch / "out").exists()

    busy = scratch / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(api.LorafsError, match="not empty"):
        api.mount(e2e.base("f16"), busy, adapters=[e2e.adapter("attn")])
    assert listing(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"

    with pytest.raises(api.LorafsError, match="unknown dtype") as err:  # clap's own error
        api.materialize(e2e.base("f16"), scratch / "out", adapters=[e2e.adapter("attn")], dtype="f64")
    assert err.value.returncode == 2 and not (scratch / "out").exists()
    assert listing(tmp_in_scratch) == ["busy"]


BAD_ARGUMENTS = {
    "adapters int": (TypeError, dict(adapters=5)),
    "weight str": (TypeError, dict(adapters=[("a", "0.5")])),
    "cache_size float": (TypeError, dict(adapters=["a"], cache_size=1.5)),
    "cache_size negative": (ValueError, dict(adapters=["a"], cache_size=-1)),
    "warm word": (ValueError, dict(adapters=["a"], warm="sometimes")),
    "threads zero": (ValueError, dict(adapters=["a"], threads=0)),
    "allow_other str": (TypeError, dict(adapters=["a"], allow_other="yes")),
    "noexec int": (TypeError, dict(adapters=["a"], noexec=1)),
    "dtype int": (TypeError, dict(adapters=["a"], dtype=16)),
    "views list": (TypeError, dict(views=[("a", ["x"])])),
    "view comma": (ValueError, dict(views={"a": ["x,y"]})),
    "nothing to merge": (ValueError, dict()),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_fail_before_anything_runs(scratch, monkeypatch, case):
    marker = scratch / "ran"
    fake = scratch / "fake-lorafs"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LORAFS_BIN", str(fake))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    error, kwargs = BAD_ARGUMENTS[case]
    with pytest.raises(error):
        lorafs.mount("base", **kwargs)
    assert not marker.exists()
    assert listing(scratch) == ["fake-lorafs"]
