#!/usr/bin/env bash
# lorafs in one command: build it, set up the pinned Python stack (cached), generate a tiny
# base model + LoRA adapter, mount them as the merged model, load the mount with
# transformers, generate a few tokens, compare with PEFT's merge_and_unload, unmount.
#
#   bash scripts/demo.sh
#
# Needs: Rust (cargo), python3 with venv, and FUSE (/dev/fuse; run as root or with
# fusermount3). The first run downloads the Python stack (scripts/venv.sh, about 6 GB).
# Exits non-zero if the mounted model does not agree with PEFT.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "demo: cargo not found; install Rust from https://rustup.rs and rerun" >&2
    exit 1
fi
if [ ! -e /dev/fuse ]; then
    echo "demo: /dev/fuse is missing (modprobe fuse; in a container, run with --device /dev/fuse --cap-add SYS_ADMIN)" >&2
    exit 1
fi

echo "==> cargo build --release"
(cd "$repo" && cargo build --release --quiet)
bin=${LORAFS_BIN:-$repo/target/release/lorafs}

echo "==> Python environment (scripts/venv.sh)"
venv=$(bash "$here/venv.sh")
echo "    $venv"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$venv/bin/python" "$here/demo.py" --lorafs "$bin" "$@"
