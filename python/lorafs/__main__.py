"""``python -m lorafs ARGS...`` runs the ``lorafs`` command with ARGS, as ``lorafs ARGS...``."""

from __future__ import annotations

import os
import subprocess
import sys

from lorafs._find import find_lorafs_bin


def main() -> None:
    """Replace this process by ``lorafs`` with the same arguments (POSIX), or run it and
    exit with its status (elsewhere)."""
    binary = find_lorafs_bin()
    argv = [binary, *sys.argv[1:]]
    if sys.platform == "win32":
        sys.exit(subprocess.run(argv).returncode)
    os.execv(binary, argv)


if __name__ == "__main__":
    main()
