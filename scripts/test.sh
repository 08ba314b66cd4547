#!/usr/bin/env bash
# Run every test: Rust (unit, integration, mounted, kernels; once more with the scalar
# kernel forced), then build the wheel and install it into the test virtualenv, and run the
# end-to-end tests (transformers, PEFT, the Python API) against the installed package.
#
# Usage: bash scripts/test.sh            (from anywhere; creates the Python env on first run)
# Mounted tests need root and /dev/fuse; run as root they are required, never skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" = 0 ]; then
    export LORAFS_REQUIRE_MOUNT=1
else
    echo "== not root: the mounted tests of tests/it/mount.rs will pass without mounting" \
         "(as root they are required)"
fi

echo "== cargo build (release)"
cargo build --release --locked
export LORAFS_BIN="$PWD/target/release/lorafs"

echo "== cargo test"
cargo test --release --locked

echo "== cargo test with LORAFS_KERNEL=scalar"
LORAFS_KERNEL=scalar cargo test --release --locked

# FUSE over io_uring (Linux 6.14+) is offered by the fuse module only with its enable_uring
# parameter on (off by default). The passes above ran with it as found: on a default kernel
# they served through /dev/fuse and checked the fallback (tests/it/transport.rs). As root,
# the mounted tests run again over the ring, with the parameter on for the rest of this run
# (so the end-to-end tests below load through the ring too) and set back at exit.
uring=/sys/module/fuse/parameters/enable_uring
if [ "$(id -u)" = 0 ] && [ -w "$uring" ]; then
    uring_was=$(cat "$uring")
    trap 'echo "$uring_was" > "$uring"' EXIT
    echo Y > "$uring"
    echo "== the mounted tests again, over FUSE over io_uring ($uring on until the end)"
    LORAFS_TRANSPORT=uring cargo test --release --locked --test it
else
    echo "== FUSE over io_uring not tested: it needs root and a kernel with $uring"
fi

# Release builds wrap on integer overflow; only the test profile's overflow checks turn
# unchecked arithmetic on hostile sizes into a failure the fuzz targets can see.
echo "== fuzz targets with overflow checks (test profile)"
cargo test --locked --test fuzz

# The crate as it would be published: only the files of Cargo.toml's `include`, built on
# their own (a debug build, in target/package). With
# --allow-dirty: the suite is run on working trees before their changes are committed, and
# what it checks, that the packaged files build, holds for those files as they are.
echo "== cargo package (the published crate builds)"
cargo package --locked --allow-dirty --quiet

echo "== the wheel (scripts/wheel.sh), installed into the test virtualenv"
venv=$(bash scripts/venv.sh)
wheel=$(bash scripts/wheel.sh)
"$venv/bin/pip" install --quiet --force-reinstall --no-deps "$wheel"

# The GGUF tests (tests/e2e/test_gguf.py) compare with llama.cpp's converter and run
# llama-cpp-python: built once from the pinned sdist (minutes), then cached. With
# LORAFS_GGUF_ENV set, a missing stack fails those tests instead of skipping them.
echo "== the llama.cpp stack for the GGUF tests (scripts/gguf-env.sh)"
export LORAFS_GGUF_ENV
LORAFS_GGUF_ENV=$(bash scripts/gguf-env.sh)

# The QLoRA tests (tests/e2e/test_bnb.py) make 4-bit and 8-bit bases with bitsandbytes and
# compare with transformers' dequantize(): bitsandbytes is installed once, with --no-deps, in
# a folder of its own that only those tests put on sys.path (the other tests, and the loads
# of a mount, run without it). With LORAFS_BNB_ENV set, a missing install fails them.
echo "== bitsandbytes for the QLoRA tests (scripts/bnb-env.sh)"
export LORAFS_BNB_ENV
LORAFS_BNB_ENV=$(bash scripts/bnb-env.sh)

# From here on the end-to-end tests run the installed package and its binary, as a user of
# the wheel would (test_python_api.py checks that they do).
echo "== end-to-end tests (transformers, peft), against the installed wheel"
export LORAFS_BIN="$venv/bin/lorafs" LORAFS_E2E_INSTALLED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/python" -m pytest tests/e2e -q
