"""Finding the `lorafs` executable that this package runs."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

__all__ = ["find_lorafs_bin"]

_EXE = "lorafs" + (sysconfig.get_config_var("EXE") or "")


def _installed_scripts_dirs() -> list[Path]:
    """The scripts folders where an installer puts the wheel's binary, most likely first.

    As ruff's ``find_ruff_bin``: the scripts folder of the installation scheme whose
    site-packages holds this package (so a package installed in a virtualenv finds that
    virtualenv's ``bin``, whichever interpreter imported it), the running interpreter's and
    the user scheme's scripts folders, and ``bin`` beside the package root (``pip install
    --target DIR`` puts it in ``DIR/bin``).
    """
    package_root = Path(__file__).resolve().parent.parent
    found: list[Path] = []
    for scheme in sysconfig.get_scheme_names():
        try:
            purelib = Path(sysconfig.get_path("purelib", scheme)).resolve()
            platlib = Path(sysconfig.get_path("platlib", scheme)).resolve()
            scripts = sysconfig.get_path("scripts", scheme)
        except (KeyError, OSError):
            continue
        if package_root in (purelib, platlib):
            found.append(Path(scripts))
    found.append(Path(sysconfig.get_path("scripts")))
    if sys.version_info >= (3, 10):
        user_scheme = sysconfig.get_preferred_scheme("user")
    elif os.name == "nt":
        user_scheme = "nt_user"
    else:
        user_scheme = "posix_user"
    found.append(Path(sysconfig.get_path("scripts", scheme=user_scheme)))
    found.append(package_root / "bin")
    return found


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_lorafs_bin() -> str:
    """Return the path of the ``lorafs`` executable the Python API runs.

    ``LORAFS_BIN``, when set, names it (an error if it is not an executable file). Otherwise
    it is the binary that the wheel installed beside this package (the scripts folder of
    its installation, where pip put it), else the first ``lorafs`` on ``PATH`` (for the
    package used from a source tree with a ``cargo install``-ed binary).

    Raises:
        FileNotFoundError: no executable was found; the message says where it looked.
    """
    override = os.environ.get("LORAFS_BIN")
    if override:
        if not _is_executable(Path(override)):
            raise FileNotFoundError(f"LORAFS_BIN={override} is not an executable file")
        return override
    candidates = [folder / _EXE for folder in _installed_scripts_dirs()]
    for candidate in candidates:
        if _is_executable(candidate):
            return str(candidate)
    on_path = shutil.which(_EXE)
    if on_path:
        return on_path
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise FileNotFoundError(
        f"the lorafs executable was not found (looked at {looked} and on PATH); "
        "install the lorafs wheel, or set LORAFS_BIN"
    )
