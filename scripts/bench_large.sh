#!/usr/bin/env bash
# A model of about 60 % of RAM, read whole through the mount twice, with the base read
# through the page cache and with O_DIRECT (--direct-io never|always; auto picks always
# here). Base and merged pages together exceed RAM, so with buffered reads they evict each
# other and the second pass re-reads and re-merges; with O_DIRECT the merged pages stay
# cached and the second pass is served from memory.
# Baseline in the same run: dd of the base files cold from disk. Needs root (mount,
# drop_caches). The model (written by examples/synth_model.rs, no Python) is deleted after.
#
#   bash scripts/bench_large.sh [DIR] [FRACTION_OF_RAM]     (defaults: /tmp/lorafs-large 0.6)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-/tmp/lorafs-large}
fraction=${2:-0.6}
cargo build --release --quiet --manifest-path "$repo/Cargo.toml" --example synth_model --bin lorafs
lorafs="$repo/target/release/lorafs"

ram=$(awk '/MemTotal/ {printf "%.0f", $2 * 1024}' /proc/meminfo)
# Llama-7B shapes: one layer is 202 M parameters, 2 bytes each in F16; embeddings 262 M.
layers=$(python3 -c "print(max(1, round(($ram * $fraction / 2 - 262e6) / 202e6)))")
trap 'umount -l "$dir/mnt" 2>/dev/null || true; rm -rf "$dir"' EXIT
if [ ! -f "$dir/base/config.json" ]; then
    "$repo/target/release/examples/synth_model" "$dir" --layers "$layers" --hidden 4096 \
        --intermediate 11008 --heads 32 --kv-heads 32 --rank 16 --shard-gib 4 2>/dev/null
fi
size=$(du -cb "$dir"/base/*.safetensors | tail -1 | cut -f1)
echo "model: $layers layers, $((size / 1000000)) MB of F16 = $(python3 -c "print(round($size / $ram * 100))") % of RAM ($((ram / 1000000)) MB)"

read_all() { # prints seconds to read every shard under $1
    local start=$(date +%s.%N)
    for f in "$1"/*.safetensors; do dd if="$f" of=/dev/null bs=1M status=none; done
    python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')"
}
mb_s() { python3 -c "print(round($size / $1 / 1e6))"; }

sync; echo 3 > /proc/sys/vm/drop_caches
t=$(read_all "$dir/base")
echo "baseline: dd of the base from disk (cold): $t s, $(mb_s "$t") MB/s"

mkdir -p "$dir/mnt"
for mode in never always; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    "$lorafs" mount "$dir/base" "$dir/mnt" --adapter "$dir/adapter" --direct-io "$mode"
    t1=$(read_all "$dir/mnt")
    c1=$(awk '/^bytes_computed/ {print int($2 / 1000000)}' "$dir/mnt/.lorafs-stats")
    cached=$(awk '/^Cached/ {print int($2 / 1024)}' /proc/meminfo)
    t2=$(read_all "$dir/mnt")
    pid=$(awk '/^pid/ {print $2}' "$dir/mnt/.lorafs-stats")
    rss=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$pid/status")
    c2=$(awk '/^bytes_computed/ {print int($2 / 1000000)}' "$dir/mnt/.lorafs-stats")
    budget=$(awk '/^cache_budget/ {print int($2 / 1048576)}' "$dir/mnt/.lorafs-stats")
    factors=$(awk '/^factor_bytes/ {print int($2 / 1048576)}' "$dir/mnt/.lorafs-stats")
    echo "--direct-io $mode: pass 1 $t1 s ($(mb_s "$t1") MB/s, merged $c1 MB, page cache after: $cached MiB)," \
         "pass 2 $t2 s ($(mb_s "$t2") MB/s, merged $((c2 - c1)) MB);" \
         "server peak RSS $rss MiB (cache budget $budget MiB + factors $factors MiB)"
    "$lorafs" unmount "$dir/mnt"
done
