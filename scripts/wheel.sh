#!/usr/bin/env bash
# Build the lorafs wheel from this repository into target/wheels and print its path.
#
# The wheel holds the `lorafs` binary and the `lorafs` Python package (python/lorafs), the
# way ruff and uv ship theirs; installing it needs no Rust toolchain:
#     pip install "$(bash scripts/wheel.sh)"
# Building it needs Rust and Python 3. maturin, pinned in scripts/requirements-build.txt, is
# installed once by scripts/venv.sh into a small cached virtualenv of its own.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=$(bash "$here/venv.sh" "$here/requirements-build.txt" build)
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
