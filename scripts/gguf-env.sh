#!/usr/bin/env bash
# Print the path of the llama.cpp test stack, creating it once: a folder holding
#   site/      llama-cpp-python (built from its sdist), sentencepiece, diskcache, installed
#              with --no-deps for the main virtualenv's Python (add it to PYTHONPATH), and
#   llama.cpp/ the sdist's vendored llama.cpp sources: convert_hf_to_gguf.py, conversion/,
#              gguf-py/ and models/ggml-vocab-*.gguf (the converter the GGUF view must match).
# Usage: bash scripts/gguf-env.sh [--dir]   (needs scripts/venv.sh's virtualenv; prints the
#        folder; with --dir, builds nothing)
#
# Keyed by the hash of scripts/requirements-gguf.txt and of the main requirements, like
# scripts/venv.sh, in the same cache folder.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
req=$here/requirements-gguf.txt
venv=$(bash "$here/venv.sh")
# llama.cpp built for AVX2 + FMA + F16C, not for the building CPU (GGML_NATIVE): the same
# code on every x86-64 machine CI may run on, and a cached build never meets a CPU that
# lacks what it was compiled for. (Built native on a Xeon with AMX, this llama.cpp crashed
# with SIGSEGV in its AMX matrix multiply generating from Q8_0 files, the converter's own
# included.) Built without pip's wheel cache, which would hand back a wheel built with
# other options from the same sdist.
cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
[ "$(uname -m)" = x86_64 ] || cmake_args=""
key=$( (cat "$req" "$here/requirements.txt"; echo "$cmake_args --no-cache-dir") | sha256sum | cut -c1-16)
cache=${LORAFS_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafs}
env="$cache/gguf-$key"
if [ "${1:-}" = --dir ]; then # where it is (or would be), nothing built
    echo "$env"
    exit 0
fi
# One build at a time: a second caller (scripts/test.sh while a developer's run builds)
# waits for the first instead of deleting its half-built folder.
mkdir -p "$cache"
exec 9>"$env.lock"
flock 9
if [ ! -f "$env/.complete" ]; then
    echo "building the llama.cpp test stack in $env (first run only: minutes)" >&2
    rm -rf "$env"
    mkdir -p "$env/sdist"
    version=$(sed -n 's/^llama-cpp-python==//p' "$req")
    # The sdist from PyPI's simple index, checked against the sha256 the index gives
    # (`pip download` would run its build backend just to read its metadata).
    sdist="$env/sdist/llama_cpp_python-$version.tar.gz"
    "$venv/bin/python" - "$version" "$sdist" <<'PY'
import hashlib, re, sys, urllib.request
version, dest = sys.argv[1:]
name = f"llama_cpp_python-{version}.tar.gz"
with urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/") as r:
    page = r.read().decode()
url, digest = re.search(rf'href="([^"#]*/{re.escape(name)})#sha256=([0-9a-f]+)"', page).groups()
urllib.request.urlretrieve(url, dest)
with open(dest, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != digest:
        sys.exit(f"{dest}: sha256 differs from PyPI's index")
PY
    tar -xzf "$sdist" -C "$env/sdist"
    mv "$env/sdist/llama_cpp_python-$version/vendor/llama.cpp" "$env/llama.cpp.tmp"
    # Build llama-cpp-python from that same tarball (--find-links), with cmake and ninja
    # from PyPI through build isolation.
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$venv/bin/pip" install --quiet --no-deps --no-cache-dir \
        --target "$env/site" --find-links "$env/sdist" -r "$req" >&2
    rm -rf "$env/sdist/llama_cpp_python-$version"
    mv "$env/llama.cpp.tmp" "$env/llama.cpp"
    touch "$env/.complete"
fi
echo "$env"
