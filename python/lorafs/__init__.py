"""lorafs: a base model plus LoRA adapters, used as if they had been merged.

This package is a Python API over the ``lorafs`` command that the same wheel installs: each
function runs the command (nothing is implemented twice), checks the types of its
arguments first, and raises :class:`LorafsError` with the command's message when it fails.

Mount the merged model and load it::

    import lorafs
    from transformers import AutoModelForCausalLM

    with lorafs.mount("org/base", adapters=["./lora-math", ("./lora-chat", 0.5)],
                      cache_size="2GiB") as m:          # a temporary mount point
        model = AutoModelForCausalLM.from_pretrained(m.path)
        print(m.stats())                                 # the server's counters, a dict
    # Unmounted here. The model still maps the mount's files: the mount was detached
    # lazily, and its server exits once the model is gone.

Many merged models in one mount, changed while it serves::

    with lorafs.mount("org/base", views={"math": ["./lora-math"],
                                         "mix": [("./lora-math", 0.5), ("./lora-chat", 0.5)]}) as m:
        m.add_view("chat", ["./lora-chat"])
        m.set_view("mix", [("./lora-math", 0.3), ("./lora-chat", 0.7)])
        print(m.views())
        m.remove_view("chat")

Write the merged model to disk, or look at the merge plan::

    lorafs.materialize("org/base", "./merged", adapters=["./lora"], dtype="bf16")
    plan = lorafs.inspect("org/base", adapters=["./lora"])      # a dict

``python -m lorafs ARGS`` runs the command itself. The executable is the one installed with
this package (:func:`find_lorafs_bin`; ``LORAFS_BIN`` overrides it). docs/PYTHON.md in the
repository has the whole story: installing, the mount's lifecycle, errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from lorafs import _command as _cmd
from lorafs._command import AdapterSpec, Adapters, LorafsError, PathArg, Size
from lorafs._find import find_lorafs_bin
from lorafs._mount import Mount, mount, unmount

__all__ = [
    "AdapterSpec",
    "Adapters",
    "LorafsError",
    "Mount",
    "PathArg",
    "Size",
    "__version__",
    "find_lorafs_bin",
    "inspect",
    "materialize",
    "mount",
    "unmount",
]


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return "unknown"
    try:
        return version("lorafs")
    except PackageNotFoundError:
        return "unknown"


__version__: str = _version()
"""The version of the installed lorafs distribution ("unknown" when run from a source tree)."""


def materialize(
    base: PathArg,
    out: PathArg,
    *,
    adapters: Adapters,
    dtype: Any = None,
    cache_size: Optional[Size] = None,
    direct_io: Union[str, bool, None] = None,
    force: bool = False,
) -> Path:
    """Write the merged model directory to ``out`` (``lorafs materialize``): the same bytes a
    mount serves, written beside ``out`` and renamed into place only when complete.

    Args:
        base: the base model directory, or a cached repo id ``org/name[@revision]``.
        out: the output directory; it must not exist, unless ``force``.
        adapters: adapter paths (or cached repo ids) or ``(path, weight)`` tuples, in order.
        dtype: store floating tensors as ``"f16"``, ``"bf16"`` or ``"f32"`` (or a
            ``torch.dtype``); default: as in the base.
        cache_size: bytes of merged blocks to cache (int, or a string like ``"64MiB"``).
        direct_io: read the base with O_DIRECT: ``"auto"``, ``"always"``/True, ``"never"``/False.
        force: replace an existing ``out`` (a directory or regular file) once the new one is
            in place.

    Returns:
        ``out``, as a Path (as ``shutil.copytree`` returns its destination).

    Raises:
        LorafsError: the command failed; nothing was left at ``out``. Interrupted (Ctrl-C),
            the command is stopped as Ctrl-C stops it and removes what it wrote.
    """
    base_arg, args = _cmd.inputs(base, adapters)
    args += _cmd.merge_options(cache_size, direct_io, dtype)
    if _cmd.bool_arg(force, "force"):
        args.append("--force")
    out_arg = _cmd.path_arg(out, "out")
    _cmd.run(["materialize", base_arg, out_arg, *args])
    return Path(out_arg)


def inspect(
    base: PathArg,
    *,
    adapters: Adapters = (),
    views: Optional[Mapping[str, Adapters]] = None,
    catalog: Optional[PathArg] = None,
    dtype: Any = None,
    tensors: bool = False,
) -> Dict[str, Any]:
    """The merge plan as a dict (``lorafs inspect ... --json``): the base, each adapter with
    its scales and target modules, the tensors changed (with ``tensors=True``, every merged
    tensor and its contributions); for ``views=``/``catalog=``, the plan of each view. The
    schema is the command's, documented with it.

    Raises:
        LorafsError: the command refused the inputs (the message says which and why).
    """
    base_arg, args = _cmd.inputs(base, adapters)
    args += _cmd.views_options(views, catalog, None)
    args += _cmd.merge_options(None, None, dtype)
    if _cmd.bool_arg(tensors, "tensors"):
        args.append("--tensors")
    plan: Dict[str, Any] = json.loads(_cmd.run(["inspect", base_arg, *args, "--json"]))
    return plan
