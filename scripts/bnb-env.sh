#!/usr/bin/env bash
# Print the path of a folder holding bitsandbytes (pinned in scripts/requirements-bnb.txt),
# installed with --no-deps for the main virtualenv's Python: add it to PYTHONPATH.
# Usage: bash scripts/bnb-env.sh     (needs scripts/venv.sh's virtualenv; prints the folder)
#
# Keyed by the hash of scripts/requirements-bnb.txt and of the main requirements, like
# scripts/venv.sh and scripts/gguf-env.sh, in the same cache folder.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
req=$here/requirements-bnb.txt
venv=$(bash "$here/venv.sh")
key=$(cat "$req" "$here/requirements.txt" | sha256sum | cut -c1-16)
cache=${LORAFS_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafs}
env="$cache/bnb-$key"
# One install at a time: a second caller waits for the first instead of deleting its
# half-made folder.
mkdir -p "$cache"
exec 9>"$env.lock"
flock 9
if [ ! -f "$env/.complete" ]; then
    echo "installing bitsandbytes in $env (first run only)" >&2
    rm -rf "$env"
    "$venv/bin/pip" install --quiet --no-deps --target "$env" -r "$req" >&2
    touch "$env/.complete"
fi
echo "$env"
