"""A running mount: :func:`mount` starts it, :class:`Mount` controls and ends it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, List, Mapping, Optional, Type, Union

from lorafs import _command as cmd
from lorafs._command import Adapters, LorafsError, PathArg, Size

__all__ = ["Mount", "mount", "unmount"]


def unmount(mountpoint: PathArg, *, lazy: bool = False) -> None:
    """Unmount the lorafs mount at ``mountpoint`` (``lorafs unmount MOUNTPOINT``); its server
    exits. Works on any lorafs mount, including one left by an interpreter that was killed.

    Args:
        mountpoint: the mount point.
        lazy: detach the mount even while a file on it is open or mapped (``lorafs unmount
            --lazy``, as ``umount -l``): it leaves the directory tree at once, programs that
            hold its files (a loaded model maps its safetensors) keep reading them, and the
            server exits when the last is closed. Without it a busy mount is an error.

    Raises:
        LorafsError: not a lorafs mount, not mounted, or busy (and not ``lazy``).
    """
    args = ["unmount", cmd.path_arg(mountpoint, "mountpoint")]
    if cmd.bool_arg(lazy, "lazy"):
        args.append("--lazy")
    cmd.run(args)


def _release(path: str, remove_dir: bool, owner_pid: int, implicit: bool) -> None:
    """The finalizer of a :class:`Mount` that was not unmounted: detach it and remove the
    mount point the API made. Holds no reference to the Mount. A forked child that inherits
    the object does nothing: the mount is its parent's."""
    if os.getpid() != owner_pid:
        return
    if implicit:
        warnings.warn(f"implicitly unmounting lorafs mount {path}", ResourceWarning, stacklevel=2)
    try:
        unmount(path, lazy=True)
    except (LorafsError, OSError) as err:
        # Unmounted already (`lorafs unmount` by hand), or the interpreter is exiting and
        # nobody is left to tell: say it once, on stderr.
        warnings.warn(f"lorafs mount {path} was not unmounted: {err}", RuntimeWarning, stacklevel=2)
    if remove_dir:
        with contextlib.suppress(OSError):
            os.rmdir(path)


class Mount:
    """A running lorafs mount, as returned by :func:`mount`.

    Use it as a context manager: leaving the ``with`` block unmounts it (even on an
    exception) and removes the mount point if :func:`mount` made it. Otherwise call
    :meth:`unmount`; a Mount that is garbage collected or still mounted when the
    interpreter exits is unmounted then (with a ``ResourceWarning``, as
    ``tempfile.TemporaryDirectory`` does), so keep a reference for as long as you use it.
    The mount's server is its own process: a mount left by an interpreter that was killed
    stays, and ``lorafs unmount MOUNTPOINT`` (or :func:`unmount`) ends it.

    ``os.fspath(m)`` and ``str(m)`` are ``str(m.path)``, so a Mount can be given wherever a
    path is taken (``AutoModelForCausalLM.from_pretrained(m)``).

    Attributes:
        path: the mount point, absolute.
        created_mountpoint: whether :func:`mount` made the mount point (it then removes it
            after unmounting, with ``rmdir``: never anything else).
    """

    path: Path
    created_mountpoint: bool

    def __init__(self, path: Path, *, created_mountpoint: bool) -> None:
        self.path = path
        self.created_mountpoint = created_mountpoint
        self._mounted = True
        self._finalizer = weakref.finalize(
            self, _release, str(path), created_mountpoint, os.getpid(), True
        )

    def __repr__(self) -> str:
        state = "mounted" if self._mounted else "unmounted"
        return f"<lorafs.Mount {str(self.path)!r} {state}>"

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __enter__(self) -> "Mount":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Unmount (lazily: a model loaded from the mount keeps working) and remove the
        mount point :func:`mount` made. If the block raised, a failure to unmount is only
        warned about, so that it does not hide the block's exception."""
        if not self._mounted:
            return
        try:
            self.unmount()
        except (LorafsError, OSError) as err:
            if exc is None:
                raise
            # Said once, here; the finalizer would only fail the same way again.
            self._finalizer.detach()
            warnings.warn(f"lorafs mount {self.path} was not unmounted: {err}", RuntimeWarning)

    def unmount(self, *, lazy: bool = True) -> None:
        """Unmount, then remove the mount point if :func:`mount` made it.

        Args:
            lazy: if a file on the mount is still open or mapped, detach it anyway (the
                default): a model loaded from the mount maps its safetensors files for as long
                as it lives, keeps working, and the server exits once the model (and every
                other user of the files) is gone. ``lazy=False`` makes a busy mount an error.

        Raises:
            LorafsError: the command failed (with ``lazy=False``: the mount is busy).
        """
        if not self._mounted:
            return
        unmount(self.path, lazy=lazy)
        self._mounted = False
        self._finalizer.detach()
        if self.created_mountpoint:
            os.rmdir(self.path)

    @property
    def mounted(self) -> bool:
        """False once :meth:`unmount` (or leaving the ``with`` block) has unmounted it."""
        return self._mounted

    def stats(self) -> Dict[str, Any]:
        """The counters of the running mount, as a dict (``lorafs stats MOUNTPOINT --json``):
        cache hits and misses, bytes computed and passed through, the kernel in use, the
        server's pid, panics caught, and so on (the schema is in docs/PYTHON.md)."""
        counters: Dict[str, Any] = json.loads(cmd.run(["stats", str(self.path), "--json"]))
        return counters

    def views(self) -> List[Dict[str, Any]]:
        """The views of a mount made with ``views=`` or ``catalog=`` (``lorafs view ls
        --json``): a list of ``{"name", "spec", "adapters": [{"dir", "weight"}], "source":
        "named" | "catalog"}``, sorted by name."""
        views: List[Dict[str, Any]] = json.loads(cmd.run(["view", "ls", str(self.path), "--json"]))
        return views

    def add_view(self, name: str, adapters: Adapters) -> None:
        """Add view ``name`` (a directory ``path/name``) merging ``adapters``
        (``lorafs view add``)."""
        self._view_command("add", name, adapters)

    def set_view(self, name: str, adapters: Adapters) -> None:
        """Make view ``name`` merge ``adapters`` instead (``lorafs view set``). Programs that
        opened its files before keep reading the old model; every open after sees the new one."""
        self._view_command("set", name, adapters)

    def remove_view(self, name: str) -> None:
        """Remove view ``name`` (``lorafs view rm``)."""
        cmd.run(["view", "rm", str(self.path), "--", cmd.view_name(name)])

    def _view_command(self, verb: str, name: str, adapters: Adapters) -> None:
        spec = cmd.spec_arg(adapters, f"view {name!r}")
        cmd.run(["view", verb, str(self.path), "--", cmd.view_name(name), spec])


def mount(
    base: PathArg,
    mountpoint: Optional[PathArg] = None,
    *,
    adapters: Adapters = (),
    views: Optional[Mapping[str, Adapters]] = None,
    catalog: Optional[PathArg] = None,
    cache_size: Optional[Size] = None,
    base_read_ahead: Optional[Size] = None,
    factor_cache: Optional[Size] = None,
    dtype: Any = None,
    direct_io: Union[str, bool, None] = None,
    warm: Union[str, bool, None] = None,
    threads: Optional[int] = None,
    allow_other: bool = False,
    noexec: bool = False,
    read_ahead_kb: Optional[int] = None,
    max_background: Optional[int] = None,
    transport: Optional[str] = None,
    log_file: Optional[PathArg] = None,
) -> Mount:
    """Mount ``base`` merged with ``adapters`` (or as ``views``) read-only, as
    ``lorafs mount`` does, and return the running :class:`Mount` once it is ready.

    Every input is checked before anything is mounted: a bad adapter mounts nothing.

    Args:
        base: the base model directory, or a repo id ``org/name[@revision]`` already in the
            local Hugging Face cache.
        mountpoint: an empty directory; made (and removed after) if it does not exist; a
            new temporary directory if None.
        adapters: LoRA adapter directories (or cached repo ids), each a path or a
            ``(path, weight)`` tuple, merged in order into one model at the mount point.
        views: many merged models in one mount: ``{name: adapters}``, each at
            ``mountpoint/name`` (``--view``). Not with ``adapters``.
        catalog: a directory whose every adapter (up to 4 levels down) is a view at its
            relative path, watched while mounted (``--catalog``).
        cache_size: bytes of merged blocks kept in memory, an int or a string like
            ``"2GiB"`` (default 64MiB).
        base_read_ahead: bytes of the base read ahead of a sequential reader, as
            ``cache_size`` (default 64MiB; 0 reads only what is asked).
        factor_cache: bytes of adapter factors kept for the views (default 4GiB).
        dtype: store floating tensors as ``"f16"``, ``"bf16"`` or ``"f32"`` (or a
            ``torch.dtype``); default: as in the base.
        direct_io: read the base with O_DIRECT: ``"auto"`` (default), ``"always"``/True or
            ``"never"``/False.
        warm: merge the whole model into the page cache in the background once mounted:
            ``"auto"`` (default), ``"always"``/True or ``"never"``/False.
        threads: threads serving requests (default: the number of cores, at least 2).
        allow_other: let other users read the mount.
        noexec: mount ``noexec``: no file in the mount can be executed, whatever its mode.
        read_ahead_kb: kernel read-ahead of the mount in KiB (root only; 0 keeps 128 KiB).
        max_background: FUSE's ``max_background``, background requests the kernel keeps
            in flight (default 64).
        transport: how requests reach the server: ``"auto"`` (default: FUSE over io_uring
            where the kernel offers it, else ``/dev/fuse``), ``"uring"`` or ``"dev"``.
        log_file: where the server appends its log (default: discarded).

    Raises:
        LorafsError: the command refused the inputs or could not mount; nothing is mounted.
        TypeError, ValueError: an argument of the wrong type or shape; nothing ran.
    """
    base_arg, args = cmd.inputs(base, adapters)
    args += cmd.views_options(views, catalog, factor_cache)
    if len(args) == 0:
        raise ValueError("mount needs adapters=, views= or catalog=")
    if (views or catalog is not None) and cmd.adapter_list(adapters):
        raise ValueError("adapters= makes one model at the mount point; give views= or catalog= instead")
    args += cmd.merge_options(cache_size, None, dtype)
    if base_read_ahead is not None:
        args += ["--base-read-ahead", cmd.size_arg(base_read_ahead, "base_read_ahead")]
    args += _mount_options(direct_io, warm, threads, allow_other, read_ahead_kb, log_file)
    if cmd.bool_arg(noexec, "noexec"):
        args.append("--noexec")
    if max_background is not None:
        args += ["--max-background", cmd.count_arg(max_background, "max_background", 1)]
    if transport is not None:
        args += ["--transport", _transport_arg(transport)]
    path, created = _mountpoint(mountpoint)
    try:
        cmd.run(["mount", base_arg, str(path), *args])
    except BaseException as err:
        if not isinstance(err, LorafsError):
            # Interrupted while the server was starting: it may have mounted all the same.
            with contextlib.suppress(LorafsError, OSError):
                unmount(path, lazy=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    return Mount(path, created_mountpoint=created)


def _mount_options(
    direct_io: Union[str, bool, None],
    warm: Union[str, bool, None],
    threads: Optional[int],
    allow_other: bool,
    read_ahead_kb: Optional[int],
    log_file: Optional[PathArg],
) -> List[str]:
    args: List[str] = []
    if direct_io is not None:
        args += ["--direct-io", cmd.when_arg(direct_io, "direct_io")]
    if warm is not None:
        args += ["--warm", cmd.when_arg(warm, "warm")]
    if threads is not None:
        args += ["--threads", cmd.count_arg(threads, "threads", 1)]
    if cmd.bool_arg(allow_other, "allow_other"):
        args.append("--allow-other")
    if read_ahead_kb is not None:
        args += ["--read-ahead-kb", cmd.count_arg(read_ahead_kb, "read_ahead_kb", 0)]
    if log_file is not None:
        args += ["--log-file", os.path.abspath(cmd.path_arg(log_file, "log_file"))]
    return args


TRANSPORTS = ("auto", "uring", "dev")


def _transport_arg(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"transport must be one of {TRANSPORTS}, not {type(value).__name__}")
    if value not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {value!r}")
    return value


def _mountpoint(mountpoint: Optional[PathArg]) -> "tuple[Path, bool]":
    """The absolute mount point, and whether it was made here (a new temporary directory
    for None; the directory itself, not its parents, for one that does not exist)."""
    if mountpoint is None:
        return Path(tempfile.mkdtemp(prefix="lorafs-")), True
    path = Path(os.path.abspath(cmd.path_arg(mountpoint, "mountpoint")))
    try:
        path.mkdir()
    except FileExistsError:
        return path, False
    return path, True
