#!/usr/bin/env bash
# Print the path of a Python virtualenv holding scripts/requirements.txt, creating it once.
# Usage: bash scripts/venv.sh [REQUIREMENTS NAME]   (another pinned file, in a virtualenv
# named NAME-<hash>: scripts/wheel.sh keeps maturin apart from the test stack this way)
#
# The stack (torch with its CUDA wheels, transformers, peft) is about 6 GB, so it lives in a
# cache folder outside the clone, keyed by the hash of the pinned requirements: a second run
# on the same machine, or CI after a developer session, starts in seconds.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
req=${1:-$here/requirements.txt}
name=${2:-venv}
key=$(sha256sum "$req" | cut -c1-16)
cache=${LORAFS_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafs}
venv="$cache/$name-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "creating Python virtualenv $venv from $req (first run only)" >&2
    mkdir -p "$cache"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet -r "$req" >&2
    touch "$venv/.complete"
fi
echo "$venv"
