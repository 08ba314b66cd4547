#!/usr/bin/env bash
# Build the lorafs wheel from this repository into target/wheels and print its path.
#
# The wheel holds the `lorafs` binary and the `lorafs` Python package (python/lorafs), the
# way ruff and uv ship theirs; installing it needs no Rust toolchain:
#     pip install "$(bash scripts/wheel.sh)"
# Building it needs Rust and Python 3. maturin, pinned in scripts/requirements-build.txt, is
# installed once into a small virtualenv in a cache folder outside the clone, keyed by the
# hash of that file (as scripts/venv.sh does for the test stack).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
req="$here/requirements-build.txt"
key=$(sha256sum "$req" | cut -c1-16)
cache=${LORAFS_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafs}
venv="$cache/build-$key"
if [ ! -x "$venv/bin/maturin" ] || [ ! -f "$venv/.complete" ]; then
    echo "creating the build virtualenv $venv (first run only)" >&2
    mkdir -p "$cache"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet -r "$req" >&2
    touch "$venv/.complete"
fi
out="$repo/target/wheels"
# Only this build's wheel is printed: maturin names the file it wrote on its last line of
# output ("📦 Built wheel to PATH"); older wheels in target/wheels are left as they are.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$venv/bin/maturin" build --release --locked --manifest-path "$repo/Cargo.toml" \
        --out "$out" 2>&1 | tee "$log" >&2; then
    echo "wheel.sh: maturin build failed" >&2
    exit 1
fi
wheel=$(sed -n 's/.*Built wheel to //p' "$log" | tail -n 1)
if [ -z "$wheel" ] || [ ! -f "$wheel" ]; then
    echo "wheel.sh: maturin did not say which wheel it built (see its output above)" >&2
    exit 1
fi
echo "$wheel"
