"""Running the ``lorafs`` command, and turning Python arguments into its arguments.

Everything the API does is a run of the command: this module only checks the types of the
arguments (so a wrong type fails before anything runs), spells them as the command line
does, and turns a failed run into :class:`LorafsError`. Values the command itself checks
(an adapter that does not exist, a size it cannot parse) are left to it, so that there is
one implementation of each rule and one wording of each error.
"""

from __future__ import annotations

import numbers
import os
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, List, Optional, Tuple, Union

from lorafs._find import find_lorafs_bin

__all__ = [
    "AdapterSpec",
    "Adapters",
    "LorafsError",
    "PathArg",
    "Size",
    "run",
]

PathArg = Union[str, os.PathLike[str]]
"""A filesystem path (``str`` or ``os.PathLike``), or for a base or adapter a repo id
``org/name[@revision]`` already in the local Hugging Face cache."""

AdapterSpec = Union[PathArg, Tuple[PathArg, float]]
"""An adapter: a path (or cached repo id), merged at weight 1, or a ``(path, weight)`` pair.
A string ``"DIR:WEIGHT"`` is read as the command reads ``--adapter DIR:WEIGHT``."""

Adapters = Union[AdapterSpec, Sequence[AdapterSpec]]
"""One adapter, or a sequence of them, applied in order."""

Size = Union[int, str]
"""A byte count: an ``int`` of bytes, or a string as the command takes it (``"2GiB"``)."""

WHEN_VALUES = ("auto", "always", "never")


class LorafsError(RuntimeError):
    """A ``lorafs`` command failed.

    ``str(err)`` is the command's error message: its ``lorafs: error: ...`` line without the
    prefix (for an argument the command line rejects, its ``error: ...`` line).

    Attributes:
        message: the error message, as ``str(err)``.
        command: the command that ran, as a list (the executable first).
        returncode: its exit status (negative: killed by that signal).
        stderr: everything it wrote to stderr.
    """

    def __init__(self, message: str, command: Sequence[str], returncode: int, stderr: str = ""):
        super().__init__(message)
        self.message = message
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.message, self.command, self.returncode, self.stderr))


def error_message(stderr: str, returncode: int) -> str:
    """The message of a failed run: the last ``lorafs: error:`` line, else clap's first
    ``error:`` line (a rejected argument), else the last line written, else the status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("lorafs: error: "):
            return line[len("lorafs: error: ") :]
    for line in lines:
        if line.startswith("error: "):
            return line[len("error: ") :]
    if lines:
        return lines[-1]
    if returncode < 0:
        return f"lorafs was killed by signal {-returncode}"
    return f"lorafs exited with status {returncode}"


def _stop(process: "subprocess.Popen[str]") -> None:
    """Stop a run interrupted on the Python side (Ctrl-C in a notebook, an exception in
    another thread) as Ctrl-C stops it on a terminal, so that it cleans up after itself
    (``materialize`` removes what it wrote); kill it only if it does not exit."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run(args: Sequence[str]) -> str:
    """Run ``lorafs ARGS`` and return its stdout; raise :class:`LorafsError` if it fails."""
    command = [find_lorafs_bin(), *args]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="replace",
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        _stop(process)
        raise
    if process.returncode != 0:
        raise LorafsError(
            error_message(stderr, process.returncode), command, process.returncode, stderr
        )
    return stdout


# --------------------------------------------------------------------------------------
# arguments


def path_arg(value: Any, what: str) -> str:
    """A path argument as a string. A relative path that starts with ``-`` gets ``./`` in
    front, so that the command cannot take it for an option."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), not {type(value).__name__}")
    text = os.fspath(value)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ValueError(f"{what} is an empty path")
    return "./" + text if text.startswith("-") else text


def adapter_arg(value: Any) -> str:
    """One adapter as ``--adapter`` takes it: ``DIR`` or ``DIR:WEIGHT``."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise TypeError(f"an adapter tuple is (path, weight), not {value!r}")
        path, weight = value
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"adapter weight must be a number, not {type(weight).__name__}")
        arg = f"{path_arg(path, 'adapter')}:{float(weight)!r}"
        if os.path.exists(arg):
            # The command takes an argument that names an existing path as that path.
            raise ValueError(
                f"adapter ({os.fspath(path)!r}, {weight!r}) is ambiguous: {arg!r} is itself "
                "an existing path; rename it or give the adapter another way"
            )
        return arg
    if isinstance(value, (str, os.PathLike)):
        return path_arg(value, "adapter")
    raise TypeError(
        f"an adapter is a path or a (path, weight) tuple, not {type(value).__name__}"
    )


def adapter_list(value: Any, what: str = "adapters") -> List[str]:
    """``adapters=``: one adapter, or a sequence of them."""
    if isinstance(value, (str, os.PathLike, tuple)) and not _is_adapter_tuple_list(value):
        return [adapter_arg(value)]
    if isinstance(value, (Mapping, set, frozenset)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{what} must be a sequence of paths or (path, weight) tuples, "
            f"not {type(value).__name__}"
        )
    return [adapter_arg(item) for item in value]


def _is_adapter_tuple_list(value: Any) -> bool:
    """A tuple of adapters (``("a", ("b", 0.5))``) rather than one ``(path, weight)``."""
    return (
        isinstance(value, tuple)
        and not (len(value) == 2 and isinstance(value[1], numbers.Real))
        and all(isinstance(item, (str, os.PathLike, tuple)) for item in value)
    )


def spec_arg(value: Any, what: str) -> str:
    """A view's adapters as the command's SPEC: ``ADAPTER[:WEIGHT]``, comma-separated."""
    items = adapter_list(value, what)
    if not items:
        raise ValueError(f"{what}: a view needs at least one adapter")
    for item in items:
        if "," in item:
            raise ValueError(f"{what}: {item!r} contains a comma, which a view spec cannot hold")
    return ",".join(items)


def view_name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a view name must be a str, not {type(value).__name__}")
    if "=" in value:
        raise ValueError(f"view name {value!r} contains '='")
    return value


def view_args(views: Optional[Mapping[str, Adapters]]) -> List[str]:
    if views is None:
        return []
    if not isinstance(views, Mapping):
        raise TypeError(f"views must be a mapping of name to adapters, not {type(views).__name__}")
    args: List[str] = []
    for name, adapters in views.items():
        args += ["--view", f"{view_name(name)}={spec_arg(adapters, f'view {name!r}')}"]
    return args


def size_arg(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{what} must be an int of bytes or a str like '2GiB', not {type(value).__name__}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{what} must not be negative, not {value}")
    return str(value)


def count_arg(value: Any, what: str, minimum: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, not {value}")
    return str(value)


def when_arg(value: Any, what: str) -> str:
    """``auto``/``always``/``never``; ``True`` is always and ``False`` never."""
    if isinstance(value, bool):
        return "always" if value else "never"
    if not isinstance(value, str):
        raise TypeError(f"{what} must be 'auto', 'always', 'never' or a bool, not {type(value).__name__}")
    if value not in WHEN_VALUES:
        raise ValueError(f"{what} must be 'auto', 'always' or 'never', not {value!r}")
    return value


def dtype_arg(value: Any) -> str:
    """A dtype name as the command takes it (``"bf16"``, ``"float16"``...), or a
    ``torch.dtype`` (``torch.bfloat16``), named without importing torch."""
    if isinstance(value, str):
        return value
    torch_names = {"torch.float16": "f16", "torch.bfloat16": "bf16", "torch.float32": "f32"}
    if type(value).__module__ == "torch" and str(value) in torch_names:
        return torch_names[str(value)]
    raise TypeError(f"dtype must be 'f16', 'bf16', 'f32' or a torch floating dtype, not {value!r}")


def bool_arg(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return value


def merge_options(
    cache_size: Optional[Size], direct_io: Union[str, bool, None], dtype: Any
) -> List[str]:
    """The options every command that opens a base takes."""
    args: List[str] = []
    if cache_size is not None:
        args += ["--cache-size", size_arg(cache_size, "cache_size")]
    if direct_io is not None:
        args += ["--direct-io", when_arg(direct_io, "direct_io")]
    if dtype is not None:
        args += ["--dtype", dtype_arg(dtype)]
    return args


def views_options(
    views: Optional[Mapping[str, Adapters]], catalog: Optional[PathArg], factor_cache: Optional[Size]
) -> List[str]:
    """``--view``, ``--catalog`` and ``--factor-cache``."""
    args = view_args(views)
    if catalog is not None:
        args += ["--catalog", path_arg(catalog, "catalog")]
    if factor_cache is not None:
        args += ["--factor-cache", size_arg(factor_cache, "factor_cache")]
    return args


def inputs(base: Any, adapters: Any) -> Tuple[str, List[str]]:
    """The base and its ``--adapter`` options."""
    args: List[str] = []
    for adapter in adapter_list(adapters):
        args += ["--adapter", adapter]
    return path_arg(base, "base"), args

