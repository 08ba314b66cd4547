#!/usr/bin/env bash
# Run every test: Rust (unit, integration, mounted, kernels; once more with the scalar
# kernel forced) and the end-to-end tests against transformers and PEFT.
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

echo "== end-to-end tests (transformers, peft)"
venv=$(bash scripts/venv.sh)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/python" -m pytest tests/e2e -q
