#!/usr/bin/env bash
# Issue #15's transports compared in one run: FUSE over io_uring (--transport uring) against
# /dev/fuse (--transport dev), on the readings of bench_read.sh at 1 GB scale, each through
# a fresh mount, the two transports interleaved round by round, medians of RUNS (default 5):
#
# 1. page cache: `dd bs=4M` of the ~1 GB merged shard (rank-16 LoRA on every linear layer),
#    base in the page cache, --warm never; against `cat` of the base shard (best of 3).
# 2. pass-through ceiling: the same with an adapter merging one 2048x2048 tensor.
# 3. requests: 20000 reads of 4 KiB with O_DIRECT (each one FUSE request) from the part of
#    the shard the one-tensor adapter leaves alone: what a request costs, in microseconds.
# 4. cold: `dd bs=4M` of the merged shard through a fresh default mount, page cache dropped
#    first; against `dd bs=4M` of the base shard from disk in the same round.
#
# Needs root (mount, drop_caches) and a kernel with FUSE over io_uring (Linux 6.14+): the fuse
# module's enable_uring is turned on for the run and set back as it was at exit. Everything
# is written under DIR (new) and removed after.
#
# Usage: [RUNS=5] bash scripts/bench_transport.sh [DIR]   (default DIR: /tmp/lorafs-transport)
set -euo pipefail
# shellcheck source=scripts/bench-scratch.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-scratch.sh"
uring=/sys/module/fuse/parameters/enable_uring
if [ ! -w "$uring" ]; then
    echo "needs root and a kernel with FUSE over io_uring ($uring)" >&2
    exit 1
fi
bench_scratch "${1:-/tmp/lorafs-transport}"
uring_was=$(cat "$uring")
trap 'echo "$uring_was" > "$uring"; bench_cleanup' EXIT
echo Y > "$uring"
synth="$repo/target/release/examples/synth_model"
echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs"
echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx512f|avx2|fma|f16c' | xargs)"
echo "linux: $(uname -r); lorafs: $("$lorafs" --version | head -n 1)"

secs() { # secs COMMAND...: its wall time in seconds, its output discarded
    local t0 t1
    t0=$(date +%s.%N); "$@" > /dev/null; t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}'
}
dd4m() { dd if="$1" of=/dev/null bs=4M status=none; }
requests() { dd if="$1" of=/dev/null bs=4k skip=100000 count=20000 iflag=direct status=none; }
mount_fresh() { # mount_fresh TRANSPORT ADAPTER [OPTION...]
    mountpoint -q "$mnt" && "$lorafs" unmount "$mnt"
    "$lorafs" mount "$dir/small/base" "$mnt" --adapter "$2" --transport "$1" "${@:3}"
    [ "$(awk '$1 == "transport" {print $2}' "$mnt/.lorafs-stats")" = "$1" ] ||
        { echo "the mount does not serve through $1" >&2; exit 1; }
}

"$synth" "$dir/small" --layers 8 2> /dev/null
"$synth" "$dir/one" --layers 8 --targets q_proj --target-layers 1 --adapter-only 2> /dev/null
base_shard=$(find "$dir/small/base" -name '*.safetensors' | sort | head -n 1)
shard=$(basename "$base_shard")
echo "shard: $(stat -c %s "$base_shard" | awk '{printf "%.2f GB", $1 / 1e9}'); RUNS=${RUNS:-5}"

for _ in $(seq "${RUNS:-5}"); do
    for t in dev uring; do
        drop_caches
        echo "disk $(secs dd4m "$base_shard")"
        drop_caches
        mount_fresh "$t" "$dir/small/adapter"
        echo "cold-$t $(secs dd4m "$mnt/$shard")"
        cat "$base_shard" > /dev/null
        mount_fresh "$t" "$dir/small/adapter" --warm never
        echo "merged-$t $(secs dd4m "$mnt/$shard")"
        mount_fresh "$t" "$dir/one/adapter" --warm never
        echo "pass-$t $(secs dd4m "$mnt/$shard")"
        mount_fresh "$t" "$dir/one/adapter" --warm never
        echo "requests-$t $(secs requests "$mnt/$shard")"
        "$lorafs" unmount "$mnt"
    done
done > "$dir/runs"
cat_s=$(for _ in 1 2 3; do secs cat "$base_shard"; echo; done | sort -n | head -n 1)
med() { awk -v k="$1" '$1 == k {print $2}' "$dir/runs" | median; }
disk_s=$(med disk)
row() { # row NAME KEY BASELINE_S BASELINE_NAME
    local d u
    d=$(med "$2-dev"); u=$(med "$2-uring")
    awk -v n="$1" -v d="$d" -v u="$u" -v b="$3" -v bn="$4" 'BEGIN {
        printf "%s: dev %.3f s (%.2fx %s), uring %.3f s (%.2fx), uring/dev %.2f\n",
            n, d, d / b, bn, u, u / b, u / d }'
}
echo "baselines: cat of the cached base shard $cat_s s (best of 3); dd of the base from disk $disk_s s (median)"
row "page cache, every linear layer merged" merged "$cat_s" "cat"
row "pass-through ceiling, one tensor merged" pass "$cat_s" "cat"
row "cold, every linear layer merged" cold "$disk_s" "dd of the base"
awk -v d="$(med requests-dev)" -v u="$(med requests-uring)" 'BEGIN {
    printf "requests, 4 KiB O_DIRECT: dev %.1f us, uring %.1f us per request, uring/dev %.2f\n",
        d / 20000 * 1e6, u / 20000 * 1e6, u / d }'
